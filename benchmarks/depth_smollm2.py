"""Depth-pruning benchmark: EvoPress vs ShortGPT, sliding-window cosine and best-of-N random.

Runs one EvoPress search (fast preset by default) with every baseline in the same code path and
writes a markdown table (with the command, machine and date) to ``docs/benchmarks/depth.md``.

Usage::

    python benchmarks/depth_smollm2.py --output outputs/bench-depth [--model smollm2] [--target 0.25]

Diagnostic only (never a result): ``--oracle-calibration`` calibrates on the WikiText-2 *test* text
that follows the evaluation windows, to measure what in-domain calibration would change.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

from doc_sections import command_line

from optimum_evo.pipeline import SearchArguments, run_search

ORACLE_SKIP = 0.15  # fraction of WikiText-2 test lines left out of the oracle calibration text


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}"


def markdown(report: dict, command: str, extra: str = "") -> str:
    rows = report["results"]
    args = report["arguments"]
    names = {"dense": "dense", "evopress": "**EvoPress**", "shortgpt": "ShortGPT (block influence)",
             "sliding_cosine": "sliding-window cosine"}
    lines = [
        f"# Depth pruning benchmark: {Path(report['model']).name}, {args['target']:.0%} of sub-blocks",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.date.today().isoformat()}; machine: {machine()}",
        f"- Budget: {report['profile']['dropped_sub_blocks']} sub-blocks dropped "
        f"({len(report['profile']['dropped_attention'])} attention + {len(report['profile']['dropped_mlp'])} MLP) "
        f"of {2 * report['num_layers']}; mode `{args['mode']}`.",
        f"- Calibration: {args['num_samples']} x {args['seq_len']} tokens of `{args['calibration']}`; fitness "
        f"{args['fitness']} KL (K={args['top_k']}); search dtype {report['search_dtype']}.",
        f"- Evaluation: WikiText-2 test, first {report['evaluation']['windows']} windows of "
        f"{report['evaluation']['seq_len']} tokens, {report['evaluation']['dtype']}; KL = mean per-token "
        "KL(dense || model) on the same windows (top-512).",
        f"- Search: preset `{args['preset']}` {report['search_config']}; "
        f"{report['search']['generations']} generations, {report['search']['tokens'] / 1e6:.2f}M candidate-tokens, "
        f"{report['timings']['search_seconds']:.0f} s search + {report['timings']['teacher_seconds']:.0f} s teacher cache "
        f"+ {report['timings']['baseline_seconds']:.0f} s baselines.",
        "",
        "| method | WikiText-2 ppl | KL | params (M) | dropped attention | dropped MLP |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        name = names.get(key, key.replace("random_best_of_", "best-of-") + " random" if key.startswith("random") else key)
        lines.append(
            f"| {name} | {r['perplexity']:.2f} | {r.get('kl', 0):.4f} | {r['parameters'] / 1e6:.1f} | "
            f"{r.get('dropped_attention', '-')} | {r.get('dropped_mlp', '-')} |"
        )
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def oracle_calibration_file(model: str, eval_windows: int, seq_len: int, out: Path) -> Path:
    """Write the WikiText-2 test lines after the first ``ORACLE_SKIP`` of them to ``out`` and check
    that the evaluation windows (the first ``eval_windows * seq_len`` tokens) lie wholly in the
    skipped part, so the oracle never calibrates on the evaluated tokens."""
    from transformers import AutoTokenizer

    from optimum_evo.data import builtin_text_path, join_corpus
    from optimum_evo.embedded_models import resolve_model

    lines = builtin_text_path("wikitext2").read_text(encoding="utf-8").splitlines()
    cut = int(len(lines) * ORACLE_SKIP)
    tok = AutoTokenizer.from_pretrained(resolve_model(model))
    evaluated = tok(join_corpus(lines), add_special_tokens=True,
                    return_offsets_mapping=True)["offset_mapping"][: eval_windows * seq_len]
    skipped_chars = len(join_corpus(lines[:cut]))
    if evaluated[-1][1] > skipped_chars:
        raise SystemExit(f"The evaluation windows reach character {evaluated[-1][1]}, beyond the {skipped_chars} "
                         f"characters left out of the oracle calibration text; raise ORACLE_SKIP.")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines[cut:]) + "\n", encoding="utf-8")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--target", type=float, default=0.25)
    p.add_argument("--preset", default="fast")
    p.add_argument("--generations", type=int, default=None)
    p.add_argument("--init", default="baselines", choices=["baselines", "random"])
    p.add_argument("--calibration", default="brown", help="calibration text (built-in name or file)")
    p.add_argument("--oracle-calibration", action="store_true",
                   help="diagnostic: calibrate on the WikiText-2 test text after the evaluation windows")
    p.add_argument("--no-baselines", dest="compare_baselines", action="store_false",
                   help="evaluate EvoPress and dense only")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--no-prefix-reuse", dest="reuse_prefix", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--confirm-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 when another job shares the 2 cores: oversubscription is slow)")
    p.add_argument("--output", default="outputs/bench-depth")
    p.add_argument("--doc", default="docs/benchmarks/depth.md", help="markdown table to (over)write; '' = none")
    ns = p.parse_args(argv)
    if ns.oracle_calibration and ns.doc:
        raise SystemExit("--oracle-calibration calibrates on the evaluation text (a diagnostic, never a result): it does "
                         f"not write the benchmark table; pass --doc '' (got --doc {ns.doc!r}).")
    if ns.threads:
        import torch

        torch.set_num_threads(ns.threads)
    calibration = ns.calibration
    if ns.oracle_calibration:
        calibration = str(oracle_calibration_file(ns.model, ns.eval_windows, 512,
                                                  Path(ns.output) / "oracle-calibration.txt"))
    args = SearchArguments(model=ns.model, target=ns.target, preset=ns.preset, generations=ns.generations,
                           confirm_tokens=ns.confirm_tokens, init=ns.init, dataset=calibration,
                           eval_windows=ns.eval_windows, reuse_prefix=ns.reuse_prefix, seed=ns.seed,
                           output_dir=ns.output, compare_baselines=ns.compare_baselines, save_model=False)
    report = run_search(args)
    command = command_line(__file__, argv)
    text = markdown(report, command)
    print(text)
    if ns.doc:
        Path(ns.doc).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.doc).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
