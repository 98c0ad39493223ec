"""Sparse + quantized levels against plain bit widths at equal stored bits.

Is a level such as "50% sparse + 4 bits" worth adding to a search? Stored as a bitmap of the kept
weights (1 bit per weight) plus 4-bit codes of the kept half, with the same scales and zeros per
group of 128 columns as a dense level, it costs 0.5 * 4 + 1 = 3 bits per weight: a 3-bit level's
codes (the script reports the exact stored bits of each level: scales, zero-points, ragged groups,
and no code for a kept weight that rounds to 0). These levels are the ``sparse-quantization`` kind. This script builds, for every searched linear of the model, the dense levels (GPTQ at 2, 3
and 4 bits) and the sparse + quantized levels (SparseGPT's mask, then GPTQ that keeps the pruned
weights at 0 and compensates their error like a rounding error), all on the same calibration
windows and Hessians (attention-aware value Hessians, group size 128, asymmetric: the quantization
database's defaults). It reports, per level, the stored bits per weight, the mean per-linear
output error (relative to the dense layer's output), the share of linears where a sparse +
quantized level beats the dense level of the same cost, and the WikiText-2 perplexity and KL of
the model with every searched linear at that level. Results go to ``OUTPUT/levels.json`` and, with
``--doc``, to a table in the docs.

``--builder signround`` makes the levels with SignRound instead (block-output tuning of rounding and
clipping, ``--iters`` iterations, each level on the stream of the model quantized at that level
below it: the quantization database's ``signround`` builder), the sparse ones with SparseGPT's mask
taken on that stream's inputs and kept through the tuning.

Usage::

    python benchmarks/sparse_quant_levels.py --model smollm2 --eval-windows 40 --threads 1 \\
        --output outputs/bench-sparse-quant --doc docs/benchmarks/joint.md
    python benchmarks/sparse_quant_levels.py --model smollm2 --builder signround --iters 50 \\
        --levels "3 bits,50% + 4 bits" --threads 1 --output outputs/bench-sparse-quant-signround
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from depth_smollm2 import machine  # noqa: E402
from doc_sections import command_line, write_section  # noqa: E402

GROUP = 128
# (name, sparsity, bits)
LEVELS = [("2 bits", 0.0, 2), ("3 bits", 0.0, 3), ("4 bits", 0.0, 4),
          ("50% + 3 bits", 0.5, 3), ("60% + 4 bits", 0.6, 4), ("50% + 4 bits", 0.5, 4)]
SAME_COST = {"50% + 4 bits": "3 bits"}  # equal stored bits, compared linear by linear


def stored_bits(weights: dict, sparsity: float, bits: int) -> float:
    """Bits per weight the level stores over the linears ``weights`` (``{name: dequantized weight}``),
    as the level database and a checkpoint store them (`optimum_evo.compressors.codecs`): the codes,
    one float16 scale and one ``bits``-bit zero-point per row and group of 128 columns (the last
    group of a row shorter where 128 does not divide it), and when sparse a 1-bit mask with codes
    for the weights that do not read back as 0 only."""
    from optimum_evo.compressors.codecs import stored_bits as level_bits

    total = numel = 0
    for w in weights.values():
        n = w.numel()
        total += level_bits(bits, GROUP, tuple(w.shape))
        if sparsity:
            total += n - (n - int(w.count_nonzero())) * bits  # the mask; no code where the weight is 0
        numel += n
    return total / numel


def build_signround_levels(model, windows, levels: list, iters: int, progress=True) -> tuple:
    """As `build_levels`, with SignRound on per-level streams (see the module docstring)."""
    from optimum_evo.compressors.builders import _propagate
    from optimum_evo.compressors.calibrate import walk_blocks
    from optimum_evo.compressors.database import relative_error
    from optimum_evo.compressors.obs import sparsegpt
    from optimum_evo.compressors.signround import signround_block

    weights = {name: {} for name, _, _ in levels}
    errors = {name: {} for name, _, _ in levels}
    walk = walk_blocks(model, windows, progress=progress, desc="Building levels", attention_aware=True, streams=True)
    for block in walk:
        linears = block.linears()
        names = list(linears)
        dense_h = block.hessians(names)
        targets = block.dense_outputs()
        for name, s, b in levels:
            inputs = block.stream_inputs(name)
            masks = None
            if s:
                H = block.hessians(names, inputs=inputs)
                masks = {n: sparsegpt(linears[n].weight.detach().float(), H[n], s) != 0 for n in names}
            results = signround_block(block.module, inputs, targets, block.kwargs, linears, b, GROUP, iters=iters,
                                      seed=block.index, mask_of=masks)
            for n, q in results.items():
                w = q.dequantize()
                weights[name][f"{block.prefix}.{n}"] = w
                errors[name][f"{block.prefix}.{n}"] = relative_error(linears[n].weight.detach().float(), w, dense_h[n])
            _propagate(block, name, linears, results)
        block.advance()
    return weights, errors


def build_levels(model, windows, levels: list, progress=True) -> tuple:
    """``({level name: {module: dequantized weight}}, {level name: {module: relative error}})`` for
    ``levels`` (entries of `LEVELS`): GPTQ for the plain bit widths (one sweep), SparseGPT's mask
    then masked GPTQ for the sparse ones (one sweep per sparsity)."""
    from optimum_evo.compressors.calibrate import walk_blocks
    from optimum_evo.compressors.database import relative_error
    from optimum_evo.compressors.obs import gptq_levels, sparsegpt_levels

    weights = {name: {} for name, _, _ in levels}
    errors = {name: {} for name, _, _ in levels}
    plain = [(name, b) for name, s, b in levels if not s]
    sparsities = sorted({s for _, s, _ in levels if s})
    walk = walk_blocks(model, windows, progress=progress, desc="Building levels", attention_aware=True)
    for block in walk:
        hessians = block.hessians()
        for n, linear in block.linears().items():
            W, H = linear.weight.detach().float(), hessians[n]
            made = {}
            if plain:
                for (name, _), q in zip(plain, gptq_levels(W, H, [b for _, b in plain], group_size=GROUP)):
                    made[name] = q.dequantize()
            for s, pruned in zip(sparsities, sparsegpt_levels(W, H, sparsities) if sparsities else []):
                of_s = [(name, b) for name, s2, b in levels if s2 == s]
                for (name, _), q in zip(of_s, gptq_levels(W, H, [b for _, b in of_s], group_size=GROUP,
                                                          mask=pruned != 0)):
                    made[name] = q.dequantize()
            for name, w in made.items():
                weights[name][f"{block.prefix}.{n}"] = w
                errors[name][f"{block.prefix}.{n}"] = relative_error(W, w, H)
        block.advance()
    return weights, errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--builder", choices=("gptq", "signround"), default="gptq")
    p.add_argument("--iters", type=int, default=50, help="SignRound iterations (--builder signround)")
    p.add_argument("--levels", default=None, help="comma-separated level names to build (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default="outputs/bench-sparse-quant")
    p.add_argument("--doc", default="", help="markdown file to put the table in (a section keyed "
                   "'sparse-quant-MODEL'); empty: none")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    from optimum_evo.fitness import TeacherCache, evaluate
    from optimum_evo.pipeline import stages
    from optimum_evo.pipeline.context import RunContext
    from optimum_evo.methods import get_method
    from optimum_evo.settings import SearchArguments

    args = SearchArguments(model=ns.model, compression="quantization", target=3.0, num_samples=ns.num_samples,
                           eval_windows=ns.eval_windows, progress=False)
    ctx = RunContext(args=args, method=get_method("quantization"), path=args.model)
    stages.load(ctx)
    stages.calibrate(ctx)
    model = ctx.model
    t = time.perf_counter()
    levels = LEVELS if not ns.levels else [lv for lv in LEVELS if lv[0] in ns.levels.split(",")]
    if not levels:
        raise SystemExit(f"--levels names none of {[name for name, _, _ in LEVELS]}.")
    if ns.builder == "signround":
        weights, errors = build_signround_levels(model, ctx.calibration, levels, ns.iters)
    else:
        weights, errors = build_levels(model, ctx.calibration, levels)
    build_seconds = time.perf_counter() - t
    teacher = TeacherCache.build(model, ctx.evaluation, "topk", args.top_k, progress=False)
    modules = dict(model.named_modules())
    rows = [dict(level="dense", bits=16.0, **{k: v for k, v in evaluate(model, ctx.evaluation, teacher,
                                                                          progress=False).items()
                                              if k in ("perplexity", "kl")})]
    for name, s, b in levels:
        dense = {m: modules[m].weight.detach().clone() for m in weights[name]}
        with torch.no_grad():
            for m, w in weights[name].items():
                modules[m].weight.copy_(w.to(modules[m].weight.dtype))
        r = evaluate(model, ctx.evaluation, teacher, progress=False)
        with torch.no_grad():
            for m, w in dense.items():
                modules[m].weight.copy_(w)
        errs = list(errors[name].values())
        row = dict(level=name, bits=stored_bits(weights[name], s, b), perplexity=r["perplexity"], kl=r["kl"],
                   mean_error=sum(errs) / len(errs))
        if name in SAME_COST and SAME_COST[name] in errors:
            other = errors[SAME_COST[name]]
            row["wins"] = sum(errors[name][m] < other[m] for m in other)
            row["linears"] = len(other)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(ns.output)
    out.mkdir(parents=True, exist_ok=True)
    command = command_line(__file__, argv)
    report = dict(model=ns.model, command=command, machine=machine(), date=datetime.date.today().isoformat(),
                  build_seconds=round(build_seconds, 1), eval_windows=ns.eval_windows, builder=ns.builder,
                  iters=ns.iters if ns.builder == "signround" else None, rows=rows)
    (out / "levels.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    print(text)
    if ns.doc:
        suffix = "" if ns.builder == "gptq" else f"-{ns.builder}"
        write_section(Path(ns.doc), f"sparse-quant-{ns.model}{suffix}", text)
    return 0


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}`", "",
             f"{report['machine']}; {report['date']}; "
             + (f"SignRound levels, {report['iters']} iterations, per-level streams; " if report.get("iters") else
                "GPTQ levels; ")
             + f"levels built in {report['build_seconds']:.0f} s; "
             f"WikiText-2, {report['eval_windows']} windows of 512 tokens; every searched linear at the level.", "",
             "| level | stored bits per weight | mean relative output error per linear | WikiText-2 ppl | KL |",
             "|---|---|---|---|---|"]
    for r in report["rows"]:
        err = f"{r['mean_error']:.4f}" if "mean_error" in r else "-"
        if "wins" in r:
            err += f" (below {SAME_COST[r['level']]} in {r['wins']} / {r['linears']} linears)"
        lines.append(f"| {r['level']} | {r['bits']:.2f} | {err} | {r['perplexity']:.2f} | {r['kl']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
