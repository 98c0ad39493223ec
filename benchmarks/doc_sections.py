"""Benchmark tables in the docs: one section per run key, between ``<!-- KEY:start -->`` and
``<!-- KEY:end -->`` markers, replaced in place by a rerun and appended when new (the text around
the markers is kept)."""

from __future__ import annotations

from pathlib import Path


def write_section(doc: Path, key: str, text: str) -> None:
    """Put ``text`` between the markers of ``key`` in ``doc`` (created when missing)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    body = doc.read_text() if doc.exists() else ""
    block = f"{start}\n\n{text}\n{end}"
    if start in body and end in body:
        body = body[: body.index(start)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip("\n") + ("\n\n" if body else "") + block + "\n"
    doc.write_text(body)
