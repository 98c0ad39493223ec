"""Does the search's fitness rank candidates as held-out text does?

For a finished run (its ``result.json``), the found candidate and every baseline the run started
from are scored by KL to the dense model on three sets of windows: the run's own calibration
windows (what the search minimised), fresh windows of the same calibration text (another seed:
same domain, unseen), and the WikiText-2 test windows of the evaluation. When EvoPress beats a
baseline on the first set but not on the second, the search fitted its few calibration windows;
when it wins on the second but not the third, the calibration text differs from the evaluation's.

Usage::

    python benchmarks/fitness_transfer.py outputs/bench-kinds/gemma3/quantization-3/result.json --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def score_sets(result: dict, fresh_seed: int = 1, eval_windows: int | None = None) -> dict:
    """``{candidate name: {set name: mean per-token KL}}`` for the run's candidates."""
    from optimum_evo.data import calibration_windows, evaluation_windows
    from optimum_evo.fitness import TeacherCache, evaluate
    from optimum_evo.loading import load_model, load_tokenizer
    from optimum_evo.methods.registry import run_method

    a = result["arguments"]
    tok = load_tokenizer(result["model"])
    sets = {"calibration (searched)": calibration_windows(a["dataset"], tok, a["num_samples"], a["seq_len"], a["seed"]),
            f"calibration text, seed {fresh_seed} (unseen)": calibration_windows(
                a["dataset"], tok, a["num_samples"], a["seq_len"], fresh_seed),
            "WikiText-2 test (evaluation)": evaluation_windows(a["eval_dataset"], tok, a["eval_seq_len"],
                                                               eval_windows or a["eval_windows"])}
    dense = load_model(result["model"], torch.float32)
    teachers = {name: TeacherCache.build(dense, w, "topk", a["top_k"], progress=False) for name, w in sets.items()}
    del dense
    method = run_method({**a, "compression": result["compression"]})
    candidates = {"evopress": result["candidate"], **result["initial_candidates"]}
    out = {}
    for name, cand in candidates.items():
        model = load_model(result["model"], torch.float32)
        method.materialize(model, method.space_from_report(model, result), tuple(cand))
        out[name] = {s: evaluate(model, w, teachers[s], progress=False)["kl"] for s, w in sets.items()}
        print(name, {k: round(v, 4) for k, v in out[name].items()}, flush=True)
    return out


def markdown(scores: dict, command: str) -> str:
    sets = list(next(iter(scores.values())))
    lines = [f"- Command: `{command}`", "", "| candidate | " + " | ".join(f"KL, {s}" for s in sets) + " |",
             "|---|" + "---|" * len(sets)]
    best = {s: min(r[s] for r in scores.values()) for s in sets}
    for name, row in scores.items():
        cells = [f"**{row[s]:.4f}**" if row[s] == best[s] else f"{row[s]:.4f}" for s in sets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", help="a finished run's result.json")
    p.add_argument("--fresh-seed", type=int, default=1)
    p.add_argument("--eval-windows", type=int, default=None, help="default: the run's own")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None, help="write the table (markdown) here as well")
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    result = json.loads(Path(ns.result).read_text())
    scores = score_sets(result, ns.fresh_seed, ns.eval_windows)
    text = markdown(scores, "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    print(text)
    if ns.output:
        Path(ns.output).write_text(text)
        Path(ns.output).with_suffix(".json").write_text(json.dumps(scores, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
