"""Why GPTQ needs attention-aware value Hessians: WikiText-2 perplexity of SmolLM2-135M with
every searched linear quantized uniformly, comparing round-to-nearest (RTN), GPTQ with the plain
token-uniform Hessian, and GPTQ with the attention-aware value Hessian
(:mod:`optimum_evo.compressors.calibrate`), at 3 and 4 bits, group size 128, asymmetric.

Rows: all linears RTN; RTN everywhere except ``v_proj`` (GPTQ plain / attention-aware); all GPTQ
(plain / attention-aware v_proj). Writes ``docs/benchmarks/value-hessian.md``.

Usage::

    python benchmarks/value_hessian_smollm2.py --calib-samples 32 --eval-windows 20
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from depth_smollm2 import machine
from doc_sections import command_line
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_evo.compressors import dequantize_codes, find_params, gptq, quantize_codes
from optimum_evo.compressors.calibrate import walk_blocks
from optimum_evo.data import calibration_windows, evaluation_windows
from optimum_evo.fitness import TeacherCache, evaluate
from optimum_evo.embedded_models import resolve_model


def rtn(w: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    out = []
    for g in w.split(group_size, dim=1):
        s, z = find_params(g, bits)
        out.append(dequantize_codes(quantize_codes(g, s, z, bits), s, z))
    return torch.cat(out, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--bits", type=int, nargs="*", default=[4, 3])
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=20)
    p.add_argument("--doc", default="docs/benchmarks/value-hessian.md")
    ns = p.parse_args(argv)
    command = command_line(__file__, argv)
    path = resolve_model(ns.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calib = calibration_windows("brown", tok, ns.calib_samples, 512, 0)
    ev = evaluation_windows("wikitext2", tok, 512, ns.eval_windows)

    # Hessians of every linear: plain, and attention-aware for v_proj (same calibration windows).
    plain, aware = {}, {}
    for block in walk_blocks(model, calib, desc="Plain Hessians"):
        plain.update({f"{block.prefix}.{n}": h for n, h in block.hessians().items()})
    for block in walk_blocks(model, calib, desc="Attention-aware Hessians", attention_aware=True):
        aware.update({f"{block.prefix}.{n}": h for n, h in block.hessians().items() if h.dim() == 3})
    names = list(plain)
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    teacher = TeacherCache.build(model, ev, "topk", 512, progress=False)

    def run(weights: dict) -> dict:
        with torch.no_grad():
            for n in names:
                model.get_submodule(n).weight.copy_(weights[n])
            r = evaluate(model, ev, teacher, progress=False)
            for n in names:
                model.get_submodule(n).weight.copy_(dense[n])
        return r

    rows = [("dense", None, run(dense))]
    for bits in ns.bits:
        R = {n: rtn(dense[n], bits) for n in names}
        G = {n: gptq(dense[n], plain[n], bits).dequantize() for n in names}
        A = {n: gptq(dense[n], aware[n], bits).dequantize() for n in aware}
        variants = {
            "RTN everywhere": R,
            "RTN, GPTQ (plain H) on v_proj": {**R, **{n: G[n] for n in aware}},
            "RTN, GPTQ (attention-aware H) on v_proj": {**R, **A},
            "GPTQ everywhere, plain H": G,
            "GPTQ everywhere, attention-aware v_proj": {**G, **A},
        }
        for name, weights in variants.items():
            rows.append((name, bits, run(weights)))
            print(f"{bits} bit  {name:<42} ppl {rows[-1][2]['perplexity']:.2f}", flush=True)
    lines = ["# GPTQ with attention-aware value Hessians (SmolLM2-135M)", "",
             f"- Command: `{command}`", f"- Date: {datetime.date.today().isoformat()}; machine: {machine()}",
             f"- Calibration: {ns.calib_samples} x 512 Brown tokens; evaluation: WikiText-2 test, first "
             f"{ns.eval_windows} windows of 512, float32; KL = mean per-token KL(dense || model), top-512.",
             "- Group size 128, asymmetric, min-max scales, damping 0.01, all 210 decoder linears.", "",
             "| bits | weights | WikiText-2 ppl | KL |", "|---|---|---|---|"]
    lines += [f"| {b or 16} | {name} | {r['perplexity']:.2f} | {r['kl']:.4f} |" for name, b, r in rows]
    Path(ns.doc).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
