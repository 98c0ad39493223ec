"""Search presets: quality against candidate-tokens for several selection schedules.

A preset is a selection schedule (offspring per generation, and the stages that cut them down:
``2@512,1@4096`` keeps the best 2 of the offspring on 512 fresh calibration tokens, then the best
one on 4096 more, which then competes with the parent) and a number of generations. What a user
pays is candidate-tokens (every scored token of every candidate, a forward each); what they get is
the quality of the parent when the search stops. For each schedule this script runs one search on
one calibration set, takes the parent when the candidate-tokens spent cross each of ``--tokens``,
and evaluates those parents on WikiText-2; the table and the plot (``--plot``) show each
schedule's curve, from which the presets are chosen.

Every schedule starts from the same baselines and scores the same calibration windows; searches
are checkpointed (a rerun resumes them, and reuses finished schedules from
``OUTPUT/<schedule>.json``).

Usage::

    python benchmarks/presets.py --model smollm2 --compression quantization --target 3.0 --levels 2,3,4,8 \\
        --schedules "fast=16:2@512,1@4096" "superfast=16:1@512,1@8192" "wide=32:4@512,1@4096" \\
        --tokens 0.125M,0.25M,0.5M,1M --threads 1 --output outputs/bench-presets \\
        --doc docs/benchmarks/presets.md --plot docs/benchmarks/presets-quantization.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_sections import command_line, write_section  # noqa: E402
from depth_smollm2 import machine  # noqa: E402


class _Done(Exception):
    """Raised by the snapshot callback once the last token budget is reached."""


def parse_schedule(text: str):
    """``"name=OFFSPRING:S@T,S@T"`` -> ``(name, offspring, ((S, T), ...))``."""
    from optimum_evo.search import Stage

    try:
        name, rest = text.split("=", 1)
        offspring, stages = rest.split(":", 1)
        pairs = tuple(Stage(int(s), int(t)) for s, t in (p.split("@") for p in stages.split(",")))
        return name.strip(), int(offspring), pairs
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"a schedule is NAME=OFFSPRING:SURVIVORS@TOKENS,...; got {text!r} ({e})")


def parse_tokens(text: str) -> list:
    """``"0.25M,1M,500k"`` -> token counts."""
    scale = {"k": 1e3, "m": 1e6}
    return sorted(int(float(t[:-1]) * scale[t[-1].lower()]) if t[-1].lower() in scale else int(t)
                  for t in text.split(",") if t)


def run_schedule(ctx, name: str, offspring: int, stages: tuple, thresholds: list, out: Path, eval_teacher,
                 command: str) -> dict:
    """One search with this schedule, the parent taken at each threshold, each evaluated."""
    from optimum_evo.fitness import evaluate as evaluate_model
    from optimum_evo.search import EvolutionarySearch
    from optimum_evo.search.checkpoint import atomic_write_json

    path = out / f"{name}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    snaps = {int(k): v for k, v in record.get("snapshots", {}).items()}

    def taken() -> bool:  # every asked budget has its parent (a record may hold budgets not asked now)
        return all(t in snaps for t in thresholds)

    if record.get("done") and taken():
        return record
    config = replace(ctx.search_config, offspring=offspring, stages=stages, generations=100_000)

    def snapshot(generation, entry):
        for t in thresholds:
            if entry["total_tokens"] >= t and t not in snaps:
                snaps[t] = {"generation": generation, "tokens": entry["total_tokens"], "fitness": entry["best_fitness"],
                            "seconds": entry["seconds"], "candidate": entry["parent"]}
                atomic_write_json(path, {"schedule": [offspring, [[s.survivors, s.tokens] for s in stages]],
                                         "snapshots": snaps})
        if taken():
            raise _Done

    if not taken():
        print(f"== {name}: {offspring} offspring, stages {', '.join(f'{s.survivors}@{s.tokens}' for s in stages)}",
              flush=True)
        engine = EvolutionarySearch(ctx.space.level_space, ctx.objective, config, checkpoint_dir=out / name,
                                    progress=True, callback=snapshot, identity=ctx.identity)
        try:
            engine.run(ctx.initial)
        except _Done:
            pass
    model, space = ctx.model, ctx.eval_space
    for t, snap in sorted(snaps.items()):
        if "perplexity" not in snap:
            space.apply(model, tuple(snap["candidate"]))
            snap.update({k: v for k, v in evaluate_model(model, ctx.evaluation, eval_teacher, progress=False).items()
                         if k in ("perplexity", "kl")})
            space.restore(model)
    record = {"schedule": [offspring, [[s.survivors, s.tokens] for s in stages]], "snapshots": snaps, "done": True,
              "command": command}
    atomic_write_json(path, record)
    return json.loads(path.read_text())


def table(results: dict, thresholds: list, start: dict) -> str:
    """One row per schedule, one perplexity (KL) column per token budget (any schedule's; a budget a
    schedule was not run to shows a dash), then generations and seconds at its last budget."""
    def fmt(t):
        return f"{t / 1e6:g}M" if t >= 100_000 else f"{t / 1e3:g}k"

    thresholds = sorted(set(thresholds) | {int(k) for r in results.values() for k in r["snapshots"]})
    lines = ["| schedule (offspring: stages) | " + " | ".join(f"ppl (KL) @ {fmt(t)}" for t in thresholds)
             + " | generations, s @ its last budget |",
             "|---|" + "---|" * (len(thresholds) + 1)]
    best = {t: min((r["snapshots"][str(t)]["perplexity"] for r in results.values() if str(t) in r["snapshots"]),
                   default=None) for t in thresholds}
    for name, r in results.items():
        snaps = {int(k): v for k, v in r["snapshots"].items()}
        offspring, stages = r["schedule"]
        cells = ["–" if t not in snaps else (f"**{snaps[t]['perplexity']:.2f}**" if snaps[t]["perplexity"] == best[t]
                                             else f"{snaps[t]['perplexity']:.2f}") + f" ({snaps[t]['kl']:.4f})"
                 for t in thresholds]
        last_t = max(snaps)
        last = snaps[last_t]
        lines.append(f"| {name} ({offspring}: {', '.join(f'{s}@{t}' for s, t in stages)}) | " + " | ".join(cells)
                     + f" | {last['generation']}, {last['seconds']:.0f} ({fmt(last_t)}) |")
    return "\n".join(lines) + (f"\n\nThe {start['name']} baseline, one of the searches' starting points: perplexity "
                               f"{start['perplexity']:.2f}, KL {start['kl']:.4f}." if start else "")


def plot(results: dict, thresholds: list, start: dict, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for name, r in results.items():
        snaps = sorted((int(k), v) for k, v in r["snapshots"].items())
        ax.plot([t for t, _ in snaps], [v["perplexity"] for _, v in snaps], marker="o", label=name)
    if start:
        ax.axhline(start["perplexity"], color="grey", linestyle=":", label=f"{start['name']} baseline")
    ax.set_xscale("log")
    ax.set_xlabel("candidate-tokens")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--compression", default="quantization")
    p.add_argument("--target", type=float, default=3.0)
    p.add_argument("--levels", default=None, help="comma-separated levels (quantization: bit widths)")
    p.add_argument("--schedules", nargs="+", type=parse_schedule,
                   default=[parse_schedule(s) for s in ("fast=16:2@512,1@4096", "superfast=16:1@512,1@8192",
                                                        "wide=32:4@512,1@4096")])
    p.add_argument("--tokens", type=parse_tokens, default=parse_tokens("0.125M,0.25M,0.5M,1M"))
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default="outputs/bench-presets")
    p.add_argument("--doc", default="docs/benchmarks/presets.md")
    p.add_argument("--plot", default=None, help="PNG of the curves (default: next to the doc)")
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    from optimum_evo.fitness import TeacherCache, evaluate as evaluate_model
    from optimum_evo.methods.registry import run_method
    from optimum_evo.pipeline import stages
    from optimum_evo.pipeline.context import RunContext
    from optimum_evo.settings import SearchArguments

    levels = [float(x) if "." in x else int(x) for x in ns.levels.split(",")] if ns.levels else None
    args = SearchArguments(model=ns.model, compression=ns.compression, target=ns.target, levels=levels,
                           num_samples=ns.num_samples, seq_len=ns.seq_len, eval_windows=ns.eval_windows,
                           search_dtype="float32", save_model=False, compare_baselines=False,
                           output_dir=str(Path(ns.output) / Path(ns.model).name / f"{ns.compression}-{ns.target:g}"))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(args=args, method=run_method(args), path=args.model)
    start = time.perf_counter()
    stages.load(ctx)
    for stage in (stages.calibrate, stages.prepare, stages.fitness, stages.initialize):
        stage(ctx)
    eval_teacher = TeacherCache.build(ctx.model, ctx.evaluation, "topk", args.top_k, progress=False)
    first = {}
    if ctx.baselines:
        name, cand = next(iter(ctx.baselines.items()))
        ctx.eval_space.apply(ctx.model, cand)
        first = {"name": name, **evaluate_model(ctx.model, ctx.evaluation, eval_teacher, progress=False)}
        ctx.eval_space.restore(ctx.model)
    command = command_line(__file__, argv)
    results = {name: run_schedule(ctx, name, offspring, st, ns.tokens, out, eval_teacher, command)
               for name, offspring, st in ns.schedules}
    # schedules finished by other runs into the same folder (e.g. one process per schedule) join the table
    for f in sorted(out.glob("*.json")):
        other = json.loads(f.read_text())
        if f.stem not in results and other.get("done"):
            results[f.stem] = other
    commands = list(dict.fromkeys(r.get("command", command) for r in results.values()))
    text = table(results, ns.tokens, first)
    print(text)
    if ns.doc:
        doc = Path(ns.doc)
        png = Path(ns.plot) if ns.plot else doc.with_name(f"{doc.stem}-{ns.compression}.png")
        plot(results, ns.tokens, first, png, f"{Path(ns.model).name}, {ns.compression} {ns.target:g}")
        rel = os.path.relpath(png, doc.parent)
        head = [f"## {Path(ns.model).name}, {ns.compression} at {ns.target:g}", "",
                "- Command: " + "; ".join(f"`{c}`" for c in commands),
                f"- {datetime.date.today().isoformat()}; {machine()}; torch threads {ns.threads or 'default'}; "
                f"{time.perf_counter() - start:.0f} s for the last command.",
                f"- Calibration {ns.num_samples} x {ns.seq_len} tokens of `brown` (the same windows for every schedule); "
                f"WikiText-2 test, {ns.eval_windows} windows of 512 tokens; perplexity of the parent when the "
                "candidate-tokens spent first reach each column's count.", "", f"![curves]({rel})", ""]
        write_section(doc, f"presets:{Path(ns.model).name}:{ns.compression}-{ns.target:g}",
                      "\n".join(head) + "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
