"""Benchmark tables in the docs: one section per run key, between ``<!-- KEY:start -->`` and
``<!-- KEY:end -->`` markers, replaced in place by a rerun and appended when new (the text around
the markers is kept), and the command line each table records."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def command_line(script: str, argv=None) -> str:
    """How to rerun ``script`` (a file of ``benchmarks/``, from the repository root) with ``argv``
    (default: this process's arguments), quoted so that a shell reads it back as typed."""
    args = list(sys.argv[1:] if argv is None else argv)
    return "python " + shlex.join([f"benchmarks/{Path(script).name}", *args])


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
