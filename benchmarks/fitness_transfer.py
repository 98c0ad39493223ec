"""Does the search's fitness rank candidates as held-out text does?

For a finished run (its ``result.json``), the found candidate and the baselines the run started
from are scored by KL to the dense model on these sets of windows: the run's own calibration
windows (what the search minimised); as many held-out windows of the same text (spread over it,
none sharing a token with a calibration window: same kind of text, unseen); the first windows of
each other text shipped for calibration (other kinds of text); and the WikiText-2 test windows of
the evaluation. When EvoPress beats a baseline on the first set but not on the second, the search
fitted its few calibration windows; when it wins on the second but not on the others, the gain is
specific to the calibration text's kind.

Usage::

    python benchmarks/fitness_transfer.py outputs/bench-kinds/gemma3/quantization-3/result.json \
        --candidates evopress uniform --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from doc_sections import command_line


def searched_and_held_out_windows(source, tokenizer, num_samples: int, seq_len: int, seed: int,
                                  count: int) -> tuple:
    """The windows `calibration_windows` draws with these arguments (those the search scored), and
    ``count`` windows of ``seq_len`` tokens of ``source`` spread evenly over the text, none of them
    sharing a token with the first ones; the text is tokenized once for both."""
    from optimum_evo.data import calibration_window_starts, cut_windows, load_texts, tokenize_corpus, window_span

    ids = tokenize_corpus(load_texts(source, "calibration"), tokenizer)
    bos, span = window_span(tokenizer, seq_len)
    starts = calibration_window_starts(ids.numel(), num_samples, span, seed)
    free = [s for s in range(0, ids.numel() - span, span) if all(s + span <= c or c + span <= s for c in starts)]
    if len(free) < count:
        raise ValueError(f"{source!r} has only {len(free)} windows of {seq_len} tokens outside the calibration windows.")
    held_out = [free[i * len(free) // count] for i in range(count)]
    return cut_windows(ids, starts, span, bos), cut_windows(ids, held_out, span, bos)


def score_sets(result: dict, eval_windows: int | None = None, texts=None, text_windows: int = 16,
               candidates=None) -> dict:
    """``{candidate name: {set name: mean per-token KL}}`` for the run's candidates (``candidates``:
    names among ``evopress`` and the run's starting points; default all)."""
    from optimum_evo.data import BUILTIN_TEXTS, EVALUATION_ONLY, evaluation_windows
    from optimum_evo.fitness import TeacherCache, evaluate
    from optimum_evo.loading import load_model, load_tokenizer
    from optimum_evo.methods.registry import run_method

    a = result["arguments"]
    found = {"evopress": result["candidate"], **result["initial_candidates"]}
    unknown = sorted(set(candidates or ()) - set(found))
    if unknown:
        raise SystemExit(f"{unknown} are not candidates of this run; it has {sorted(found)}.")
    found = {k: v for k, v in found.items() if not candidates or k in candidates}
    if texts is None:
        texts = [t for t, text in BUILTIN_TEXTS.items()
                 if text.packaged and t not in EVALUATION_ONLY and t != a["dataset"]]
    tok = load_tokenizer(result["model"])
    n, seq = a["num_samples"], a["seq_len"]
    searched, held_out = searched_and_held_out_windows(a["dataset"], tok, n, seq, a["seed"], n)
    sets = {"calibration (searched)": searched, "calibration text, held out": held_out}
    for t in texts:
        sets[t] = evaluation_windows(t, tok, seq, text_windows)
    sets["WikiText-2 test (evaluation)"] = evaluation_windows(a["eval_dataset"], tok, a["eval_seq_len"],
                                                              eval_windows or a["eval_windows"])
    dense = load_model(result["model"], torch.float32)
    teachers = {name: TeacherCache.build(dense, w, "topk", a["top_k"], progress=False) for name, w in sets.items()}
    del dense
    method = run_method({**a, "compression": result["compression"]})
    out = {}
    for name, cand in found.items():
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
    p.add_argument("--candidates", nargs="*", default=None, help="evopress and starting points to score "
                   "(default: all)")
    p.add_argument("--texts", nargs="*", default=None, help="other texts (default: every other shipped "
                   "calibration text)")
    p.add_argument("--text-windows", type=int, default=16, help="windows of each other text")
    p.add_argument("--eval-windows", type=int, default=None, help="default: the run's own")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None, help="write the table (markdown) here as well")
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    result = json.loads(Path(ns.result).read_text())
    scores = score_sets(result, ns.eval_windows, ns.texts, ns.text_windows, ns.candidates)
    text = markdown(scores, command_line(__file__, argv))
    print(text)
    if ns.output:
        Path(ns.output).write_text(text)
        Path(ns.output).with_suffix(".json").write_text(json.dumps(scores, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
