"""One model, every kind: EvoPress against its baselines at depth, sparsity and bit-width targets.

For each ``KIND:TARGET`` run (``depth:0.25`` = 25% of the sub-blocks dropped, ``sparsity:0.7`` =
70% of the searched linears' weights pruned, ``quantization:3`` = 3 average bits), one EvoPress
search with every baseline of that kind in the same code path (depth: ShortGPT, sliding-window
cosine, their whole-block variants; sparsity: uniform, OWL, DP; quantization: uniform, DP; all:
best-of-N random), on the same calibration windows, evaluated on the same WikiText-2 windows.
Writes one page per model (``docs/benchmarks/<model>.md``): a summary of EvoPress against the
best baseline of each target, then a section per run with its command, machine, date and times.
Finished runs are reused when the script runs again with the same output folder, and the page is
rewritten after every run, so an interrupted benchmark keeps what it finished.

Usage::

    python benchmarks/all_kinds.py --model gemma3 --runs depth:0.25 depth:0.375 sparsity:0.6 \\
        sparsity:0.7 quantization:3 quantization:2.5 --generations 15 --num-samples 32 \\
        --eval-windows 20 --threads 1 --output outputs/bench-kinds
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from depth_smollm2 import machine  # noqa: E402
from doc_sections import command_line  # noqa: E402

from optimum_evo.pipeline import SearchArguments, run_search  # noqa: E402

KINDS = ("depth", "sparsity", "quantization")
TITLES = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3-270M"}


def parse_run(text: str) -> tuple:
    """``"depth:0.25"`` -> ``("depth", 0.25)``, with a clear error for anything else."""
    kind, sep, target = text.partition(":")
    try:
        value = float(target)
    except ValueError:
        value = None
    if not sep or kind not in KINDS or value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not KIND:TARGET with KIND one of {', '.join(KINDS)} and a "
                                         "positive TARGET, e.g. depth:0.25, sparsity:0.7 or quantization:3.")
    return kind, value


def run_name(kind: str, target: float) -> str:
    return f"{kind}-{target:g}"


def target_label(kind: str, target: float) -> str:
    return {"depth": f"depth {target:.1%} of sub-blocks", "sparsity": f"sparsity {target:.0%}",
            "quantization": f"{target:g} bits"}[kind].replace(".0%", "%")


def budget(kind: str, row: dict) -> str:
    """What a row stores, in its kind's unit."""
    if kind == "depth":
        return f"{row.get('dropped_attention', [])} attn, {row.get('dropped_mlp', [])} MLP dropped" \
            if "dropped_sub_blocks" in row else "-"
    if kind == "sparsity":
        return f"{row['sparsity']:.1%}" if "sparsity" in row else "0%"
    return f"{row['average_bits']:.2f} ({row['effective_bits']:.2f} eff.)" if "average_bits" in row else "16"


def summary(reports: dict) -> list:
    """One line per run: EvoPress, the best baseline and their ratio."""
    lines = ["| target | EvoPress | best baseline | its ppl | EvoPress / best | every baseline |",
             "|---|---|---|---|---|---|"]
    for (kind, target), report in reports.items():
        res = report["results"]
        base = {k: v["perplexity"] for k, v in res.items() if k not in ("dense", "evopress")}
        best = min(base, key=base.get)
        every = ", ".join(f"{k} {v:.2f}" for k, v in base.items())
        evo = res["evopress"]["perplexity"]
        lines.append(f"| {target_label(kind, target)} | **{evo:.2f}** | {best} | {base[best]:.2f} | "
                     f"{evo / base[best]:.3f} | {every} |")
    return lines


def section(kind: str, target: float, report: dict, meta: dict) -> list:
    t, s, a = report["timings"], report["search"], report["arguments"]
    lines = [f"### {target_label(kind, target)}", "",
             f"- Command: `{meta.get('command', '?')}`; {meta.get('date', '?')}; {meta.get('machine', '?')}; torch "
             f"threads {meta.get('threads') or 'default'}.",
             f"- Calibration {a['num_samples']} x {a['seq_len']} tokens of `{a['dataset']}`; preset `{a['preset']}`, "
             f"{s['generations']} generations, {s['tokens'] / 1e6:.2f}M candidate-tokens; search {t['search_seconds']:.0f} s, "
             f"teacher cache {t['teacher_seconds']:.0f} s, baselines {t['baseline_seconds']:.0f} s + "
             f"{t.get('random_baseline_seconds', 0):.0f} s random."]
    if report.get("database"):
        db = report["database"]
        lines.append(f"- Level database: {db['build_seconds']} s to build, {db['disk_bytes'] / 1e6:.1f} MB on disk.")
    lines += ["", "| method | WikiText-2 ppl | KL | stores |", "|---|---|---|---|"]
    for name, row in report["results"].items():
        ppl = f"**{row['perplexity']:.2f}**" if name == "evopress" else f"{row['perplexity']:.2f}"
        lines.append(f"| {name} | {ppl} | {row.get('kl', 0.0):.4f} | {budget(kind, row)} |")
    return lines + [""]


def write_doc(doc: Path, model: str, root: Path, runs: list) -> None:
    """(Re)write ``doc`` from every finished run of ``runs`` under ``root``, in the order asked; the
    text below the ``<!-- tables:end -->`` marker (the reading) is kept."""
    reports, metas = {}, {}
    for kind, target in runs:
        out = root / run_name(kind, target)
        if (out / "result.json").exists():
            reports[(kind, target)] = json.loads((out / "result.json").read_text())
            meta = out / "benchmark.json"
            metas[(kind, target)] = json.loads(meta.read_text()) if meta.exists() else {}
    if not reports:
        return
    end = "<!-- tables:end -->"
    old = doc.read_text() if doc.exists() else ""
    tail = old.partition(end)[2] if end in old else "\n"
    first = next(iter(reports.values()))
    dense, a = first["results"]["dense"]["perplexity"], first["arguments"]
    title = TITLES.get(model, model)
    lines = [f"# {title}: depth, sparsity and bit widths", "",
             f"EvoPress on {title} at high-compression targets of each kind, against the baselines of that kind "
             "in the same code path and on the same calibration windows (`benchmarks/all_kinds.py`; each "
             "section below gives its command, machine and date).", "",
             f"- Evaluation: WikiText-2 test, first {a['eval_windows']} windows of {a['eval_seq_len']} tokens, "
             f"{a['eval_dtype']} (dense perplexity {dense:.2f}); KL = mean per-token KL(dense || model), top-512.",
             "- Quantization: GPTQ levels, group size 128, asymmetric; the budget column gives average bits over "
             "the searched linears and, in parentheses, effective bits with scales and zeros.",
             "- Sparsity: SparseGPT levels spaced by 5% around the target. Depth: attention and MLP sub-blocks "
             "dropped separately.", "", "<!-- tables:start -->", "", "## Summary", "",
             "WikiText-2 perplexity; `EvoPress / best` below 1 means EvoPress beats every baseline.", "",
             *summary(reports), "", "## Runs", ""]
    for key, report in reports.items():
        lines += section(*key, report, metas[key])
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines).rstrip() + "\n\n" + end + tail)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3")
    p.add_argument("--runs", nargs="+", type=parse_run,
                   default=[parse_run(r) for r in ("depth:0.25", "depth:0.375", "sparsity:0.6", "sparsity:0.7",
                                                   "quantization:3", "quantization:2.5")])
    p.add_argument("--levels", default=None, help="quantization bit widths, comma-separated (default: the "
                   "method's own)")
    p.add_argument("--preset", default="fast")
    p.add_argument("--generations", type=int, default=None)
    p.add_argument("--calibration", default="brown", help="calibration text: a built-in name or a text file")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--random-candidates", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 when other jobs share the cores)")
    p.add_argument("--output", default="outputs/bench-kinds")
    p.add_argument("--doc", default=None, help="page to write (default docs/benchmarks/<model>.md; '' = none)")
    ns = p.parse_args(argv)
    if ns.threads:
        import torch

        torch.set_num_threads(ns.threads)
    command = command_line(__file__, argv)
    root = Path(ns.output) / Path(ns.model).name
    doc = Path(ns.doc) if ns.doc else (None if ns.doc == "" else Path("docs/benchmarks") / f"{Path(ns.model).name}.md")
    for kind, target in ns.runs:
        out = root / run_name(kind, target)
        if not (out / "result.json").exists():
            print(f"== {run_name(kind, target)}", flush=True)
            levels = [int(x) for x in ns.levels.split(",")] if ns.levels and kind == "quantization" else None
            run_search(SearchArguments(model=ns.model, compression=kind, target=target, levels=levels,
                                       preset=ns.preset, generations=ns.generations, dataset=ns.calibration,
                                       num_samples=ns.num_samples,
                                       eval_windows=ns.eval_windows, random_candidates=ns.random_candidates,
                                       output_dir=str(out), compare_baselines=True, save_model=False))
            (out / "benchmark.json").write_text(json.dumps(
                {"command": command, "date": datetime.date.today().isoformat(), "machine": machine(),
                 "threads": ns.threads}, indent=1))
        if doc is not None:  # after every run, so finished runs survive an interrupted benchmark
            write_doc(doc, Path(ns.model).name, root, ns.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
