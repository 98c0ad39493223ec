"""Sparsity and quantization benchmark: EvoPress vs uniform, OWL (sparsity), DP and best-of-N random.

For every target, one EvoPress search with all baselines in the same code path; writes a markdown
table (command, machine, date, database build time / disk size, search time) to
``docs/benchmarks/layerwise.md``.

Usage::

    python benchmarks/layerwise_smollm2.py --sparsity 0.5 0.6 0.7 --bits 2.5 3 4 --output outputs/bench-layerwise
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from depth_smollm2 import machine
from doc_sections import command_line

from optimum_evo.pipeline import SearchArguments, run_search


def rows_markdown(report: dict) -> list:
    kind = report["compression"]
    lines = []
    for name, r in report["results"].items():
        if kind == "quantization":
            budget = f"{r['average_bits']:.2f} ({r['effective_bits']:.2f})" if "average_bits" in r else "16"
        else:
            budget = f"{r['sparsity']:.1%}" if "sparsity" in r else "0%"
        lines.append(f"| {report['arguments']['target']} | {name} | {r['perplexity']:.2f} | {r.get('kl', 0):.4f} | {budget} |")
    return lines


MARK_START, MARK_END = "<!-- tables:start -->", "<!-- tables:end -->"


def section(report: dict, meta: dict) -> list:
    db, t = report["database"], report["timings"]
    return [f"## {report['compression']}, target {report['arguments']['target']}", "",
            f"- Command: `{meta.get('command', '?')}`; {meta.get('date', '?')}; {meta.get('machine', '?')}; "
            f"torch threads {meta.get('threads') or 'default'}.",
            f"- Database: {db['build_seconds']} s to build, {db['disk_bytes'] / 1e6:.1f} MB on disk, bytes per "
            f"weight per level {json.dumps({k: round(v, 3) for k, v in db['bytes_per_weight'].items()})}.",
            f"- Search: {report['search']['generations']} generations, {t['search_seconds']:.0f} s, "
            f"{report['search']['tokens'] / 1e6:.2f}M candidate-tokens; teacher cache {t['teacher_seconds']:.0f} s, "
            f"heuristic baselines {t['baseline_seconds']:.0f} s, best-of-N random {t['random_baseline_seconds']:.0f} s.",
            f"- Baseline settings: {report['baseline_settings'] or '-'}.", "",
            "| target | method | WikiText-2 ppl | KL | budget |", "|---|---|---|---|---|",
            *rows_markdown(report), ""]


def _section_key(heading: str) -> tuple:
    """Sort key of a ``## <compression>, target <t>`` heading: quantization first, then sparsity."""
    order = {"quantization": 0, "sparsity": 1}
    kind, _, target = heading[3:].partition(", target ")
    try:
        return order.get(kind, 2), float(target)
    except ValueError:
        return order.get(kind, 2), float("inf")


def _existing_sections(tables: str) -> dict:
    """Sections (heading -> markdown lines) already between the markers of the doc."""
    sections, heading = {}, None
    for line in tables.splitlines():
        if line.startswith("## "):
            heading = line
            sections[heading] = []
        if heading is not None:
            sections[heading].append(line)
    return {h: lines + [""] if lines[-1].strip() else lines for h, lines in sections.items()}


def write_doc(doc: Path, root: Path, model: str) -> None:
    """Write every finished run under ``root`` between the markers of ``doc`` (quantization first,
    then sparsity, by target). Sections of runs that are not under ``root`` (an earlier machine's
    output folder) are kept; text outside the markers is kept."""
    text = doc.read_text() if doc.exists() else ""
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        tables, tail = rest.split(MARK_END, 1)
    else:
        head = (f"# Sparsity and quantization benchmark: {model}\n\n"
                "- Evaluation: WikiText-2 test, first 40 windows of 512 tokens, float32; KL = mean per-token "
                "KL(dense || model), top-512.\n- Quantization budget column: average bits over the searched "
                "linears (effective bits with scales and zeros in parentheses); GPTQ group size 128, asymmetric.\n\n")
        tables, tail = "", "\n"
    sections = _existing_sections(tables)
    for result in root.glob("*/result.json"):
        report = json.loads(result.read_text())
        meta_path = result.parent / "benchmark.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        lines = section(report, meta)
        sections[lines[0]] = lines
    body = [MARK_START, ""]
    for heading in sorted(sections, key=_section_key):
        body += sections[heading]
    body.append(MARK_END)
    doc.write_text(head + "\n".join(body) + tail)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sparsity", type=float, nargs="*", default=[0.5, 0.6, 0.7])
    p.add_argument("--bits", type=float, nargs="*", default=[2.5, 3.0, 4.0])
    p.add_argument("--preset", default="fast")
    p.add_argument("--generations", type=int, default=None)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--output", default="outputs/bench-layerwise")
    p.add_argument("--doc", default="docs/benchmarks/layerwise.md")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is faster when other jobs share the cores)")
    ns = p.parse_args(argv)
    if ns.threads:
        import torch

        torch.set_num_threads(ns.threads)
    command = command_line(__file__, argv)
    runs = [("quantization", t) for t in ns.bits] + [("sparsity", t) for t in ns.sparsity]
    for kind, target in runs:
        out = Path(ns.output) / f"{kind}-{target}"
        args = SearchArguments(model=ns.model, compression=kind, target=target, preset=ns.preset,
                               generations=ns.generations, eval_windows=ns.eval_windows, output_dir=str(out),
                               compare_baselines=True, save_model=False)
        run_search(args)
        (out / "benchmark.json").write_text(json.dumps(
            {"command": command, "date": datetime.date.today().isoformat(), "machine": machine(),
             "threads": ns.threads}, indent=1))
        if ns.doc:  # after every run, so finished runs survive an interrupted benchmark
            write_doc(Path(ns.doc), Path(ns.output), ns.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
