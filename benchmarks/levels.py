"""Level builders measured by the uniform models they make: one level database per builder (the same
database a search with these settings reuses), then every uniform level of it evaluated on the
evaluation windows (perplexity and KL to the dense model). Results are appended to
``OUTPUT/levels.jsonl`` (one JSON line per uniform model) as they finish.

Usage::

    python benchmarks/levels.py --model smollm2 --builder signround --levels 3 --builder-iters 50 \\
        --threads 1 --output outputs/bench-levels

Every option after the known ones goes to `SearchArguments` (``--group-sizes 64,128``, ``--mse 2.4``,
``--desc-act``, ``--num-samples 64``, ...).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from doc_sections import command_line


def uniform_rows(ctx, bits_list, tag: str) -> list:
    """Evaluate the uniform ``b``-bit model at the database's group size (and every other group size
    of the database) for each ``b`` of ``bits_list``."""
    from optimum_evo.fitness import TeacherCache, evaluate
    from optimum_evo.methods.quantization import QuantizationSpace

    model, db = ctx.model, ctx.database
    teacher = TeacherCache.build(model, ctx.evaluation, "topk", ctx.args.top_k, progress=False)
    rows = []
    for bits in bits_list:
        space = QuantizationSpace(model, db, float(bits), cache=False)
        start = list(space.uniform())
        pairs = sorted({space.level_pair(i, j) for i in range(space.num_modules)
                        for j in range(len(space.unit_levels[i])) if space.level_pair(i, j)[0] == bits})
        for _, group in pairs:
            cand = list(start)
            for i in range(space.num_modules):
                cand[i] = next(j for j in range(len(space.unit_levels[i])) if space.level_pair(i, j) == (bits, group))
            t = time.perf_counter()
            space.apply(model, cand)
            r = evaluate(model, ctx.evaluation, teacher, progress=False)
            space.restore(model)
            rows.append({"tag": tag, "bits": bits, "group_size": group, "perplexity": r["perplexity"], "kl": r["kl"],
                         "effective_bits": space.effective_bits(cand), "eval_seconds": time.perf_counter() - t})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--builder", default="gptq")
    p.add_argument("--levels", default="3", help="bit widths of the database, comma-separated")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default=None, help="name of the rows (default: the builder and its settings)")
    p.add_argument("--output", default="outputs/bench-levels")
    ns, rest = p.parse_known_args(argv)
    torch.set_num_threads(ns.threads)
    from transformers import HfArgumentParser

    from optimum_evo.methods import get_method
    from optimum_evo.pipeline import stages
    from optimum_evo.pipeline.context import RunContext
    from optimum_evo.settings import SearchArguments

    (args,) = HfArgumentParser(SearchArguments).parse_args_into_dataclasses(
        ["--model", ns.model, "--compression", "quantization", "--target", ns.levels.split(",")[0],
         "--levels", *ns.levels.split(","), "--builder", ns.builder, "--eval-windows", str(ns.eval_windows), "--no_progress",
         "--search-dtype", "float32", *rest])
    ctx = RunContext(args=args, method=get_method("quantization"), path=args.model)
    start = time.perf_counter()
    stages.load(ctx)
    stages.calibrate(ctx)
    ctx.search_model, ctx.search_dtype = ctx.model, ctx.model.dtype
    ctx.method.prepare(ctx)
    build = time.perf_counter() - start
    tag = ns.tag or " ".join([ns.builder] + rest)
    rows = uniform_rows(ctx, [int(b) for b in ns.levels.split(",")], tag)
    out = Path(ns.output)
    out.mkdir(parents=True, exist_ok=True)
    command = command_line(__file__, argv)
    with open(out / "levels.jsonl", "a") as f:
        for r in rows:
            r.update(model=ns.model, command=command, date=datetime.date.today().isoformat(),
                     database_seconds=ctx.database.manifest.get("build_seconds"), prepare_seconds=build,
                     database=str(ctx.database.root), threads=ns.threads,
                     num_samples=args.num_samples, seq_len=args.seq_len)
            f.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
