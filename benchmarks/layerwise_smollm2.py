"""Sparsity and quantization benchmark: EvoPress vs uniform, OWL (sparsity), DP and best-of-N random.

For every target, one EvoPress search with all baselines in the same code path; writes a markdown
table (command, machine, date, database build time / disk size, search time) to
``docs/layerwise-benchmark.md``.

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sparsity", type=float, nargs="*", default=[0.5, 0.6, 0.7])
    p.add_argument("--bits", type=float, nargs="*", default=[2.5, 3.0, 4.0])
    p.add_argument("--preset", default="fast")
    p.add_argument("--generations", type=int, default=None)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--output", default="outputs/bench-layerwise")
    p.add_argument("--doc", default="docs/layerwise-benchmark.md")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is faster when other jobs share the cores)")
    ns = p.parse_args(argv)
    if ns.threads:
        import torch

        torch.set_num_threads(ns.threads)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# Sparsity and quantization benchmark: {ns.model}", "",
             f"- Command: `{command}`", f"- Date: {datetime.date.today().isoformat()}; machine: {machine()}",
             "- Evaluation: WikiText-2 test, first N windows of 512 tokens, float32; KL = mean per-token "
             "KL(dense || model), top-512.", "- Quantization budget column: average bits over the searched "
             "linears (effective bits with scales and zeros in parentheses); GPTQ group size 128, asymmetric.", ""]
    runs = [("quantization", t) for t in ns.bits] + [("sparsity", t) for t in ns.sparsity]
    for kind, target in runs:
        out = Path(ns.output) / f"{kind}-{target}"
        args = SearchArguments(model=ns.model, compression=kind, target=target, preset=ns.preset,
                               generations=ns.generations, eval_windows=ns.eval_windows, output_dir=str(out),
                               compare_baselines=True, save_model=False)
        report = run_search(args)
        db, t = report["database"], report["timings"]
        lines += [f"## {kind}, target {target}", "",
                  f"Database: {db['build_seconds']} s to build, {db['disk_bytes'] / 1e6:.1f} MB on disk, bytes per "
                  f"weight per level {json.dumps({k: round(v, 3) for k, v in db['bytes_per_weight'].items()})}. "
                  f"Search: {report['search']['generations']} generations, {t['search_seconds']:.0f} s, "
                  f"{report['search']['tokens'] / 1e6:.2f}M candidate-tokens. "
                  f"Baseline settings: {report['baseline_settings'] or '-'}.", "",
                  "| target | method | WikiText-2 ppl | KL | budget |", "|---|---|---|---|---|",
                  *rows_markdown(report), ""]
        print("\n".join(lines[-(len(report['results']) + 4):]), flush=True)
        if ns.doc:  # after every run, so finished runs survive an interrupted benchmark
            Path(ns.doc).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
