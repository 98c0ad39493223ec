"""Score fixed depth profiles on the *same* calibration tokens: mean per-token KL(dense || profile)
and perplexity.

The search compares candidates on small minibatches; this script settles near-ties between a few
named profiles on a whole calibration pool (every profile sees the same windows).

Usage::

    python benchmarks/depth_profiles_kl.py --calibration brown --seed 0 \\
        --profile "window:attention=12-18;mlp=12-18" \\
        --profile "oracle:attention=6,13-18;mlp=12-18"

``--oracle-calibration`` scores on the WikiText-2 test text after the evaluation windows (the
diagnostic text of ``depth_smollm2.py --oracle-calibration``); ``--wikitext-eval`` on the
evaluation windows themselves (first 40 x 512 tokens), i.e. the benchmark's KL column.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def parse_layers(text: str) -> list:
    """``"6,12-18"`` -> ``[6, 12, 13, ..., 18]``."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return sorted(set(out))


def parse_profile(spec: str) -> tuple:
    """``"name:attention=12-18;mlp=12-18"`` -> ``(name, attention list, mlp list)``."""
    name, _, body = spec.partition(":")
    parts = dict(p.split("=", 1) for p in body.split(";") if p.strip())
    unknown = set(parts) - {"attention", "mlp"}
    if not name or unknown:
        raise SystemExit(f"--profile {spec!r}: expected 'name:attention=...;mlp=...' (unknown keys {sorted(unknown)}).")
    return name, parse_layers(parts.get("attention", "")), parse_layers(parts.get("mlp", ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--target", type=float, default=0.25)
    p.add_argument("--calibration", default="brown")
    p.add_argument("--oracle-calibration", action="store_true")
    p.add_argument("--wikitext-eval", action="store_true")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="append", required=True)
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    profiles = [parse_profile(s) for s in ns.profile]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_evo.data import calibration_windows, evaluation_windows
    from optimum_evo.fitness import TeacherCache, evaluate
    from optimum_evo.embedded_models import resolve_model
    from optimum_evo.methods.depth import DepthSpace

    path = resolve_model(ns.model)
    tok = AutoTokenizer.from_pretrained(path)
    if ns.wikitext_eval:
        windows, source = evaluation_windows("wikitext2", tok, ns.seq_len, 40), "WikiText-2 test, first 40 windows"
    else:
        calibration = ns.calibration
        if ns.oracle_calibration:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from depth_smollm2 import oracle_calibration_file

            calibration = str(oracle_calibration_file(ns.model, 40, 512, Path("outputs/oracle-calibration.txt")))
        windows = calibration_windows(calibration, tok, ns.num_samples, ns.seq_len, ns.seed)
        source = f"{'WikiText-2 test after the evaluation windows' if ns.oracle_calibration else ns.calibration}, " \
                 f"{ns.num_samples} x {ns.seq_len} windows of seed {ns.seed}"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, ns.dtype)).eval()
    space = DepthSpace(model, ns.target)
    start = time.perf_counter()
    teacher = TeacherCache.build(model, windows, "topk", 512)
    rows = []
    for name, attention, mlp in profiles:
        space.apply(model, space.candidate(attention=attention, mlp=mlp))
        r = evaluate(model, windows, teacher, progress=False, per_window=True)
        rows.append((name, attention, mlp, torch.tensor(r["window_kl"]), torch.tensor(r["window_nll"])))
    space.restore(model)
    print(f"\n{source}; top-512 KL, {ns.dtype}; {time.perf_counter() - start:.0f} s\n")
    print(f"| profile | dropped attention | dropped MLP | KL | KL - {rows[0][0]} (+- 2 s.e.) | perplexity "
          f"| NLL - {rows[0][0]} (+- 2 s.e.) |")
    print("|---|---|---|---|---|---|---|")

    def paired(v, base):
        d = v - base
        se = float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0
        return f"{float(d.mean()):+.4f} +- {2 * se:.4f}"

    for name, attention, mlp, kl, nll in rows:
        print(f"| {name} | {attention} | {mlp} | {float(kl.mean()):.4f} | {paired(kl, rows[0][3])} | "
              f"{float(nll.mean().exp()):.2f} | {paired(nll, rows[0][4])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
