"""The end-to-end job: load, calibrate, search, evaluate, compress, save, report.

A run is a sequence of stages (`optimum_evo.pipeline.stages`) over one
`RunContext`:

* `run_search` / `run`: the whole job of ``optimum-evo search`` (loads the model, writes
  ``output_dir``);
* `search_loaded`: the search and evaluation of an already loaded model (nothing is changed
  or written except the checkpoint and caches);
* `compress`: search, then compress a loaded model in place (what
  ``from_pretrained(..., quantization_config=EvoPressConfig(...))`` runs).

Examples:
    >>> from optimum_evo.pipeline import SearchArguments, run_search
    >>> args = SearchArguments(model="smollm2", compression="depth", target=0.25, output_dir="out")
    >>> report = run_search(args)                                  # doctest: +SKIP
    >>> report["results"]["evopress"]["perplexity"]                # doctest: +SKIP
"""

from __future__ import annotations

import time

from .. import distributed
from ..fitness import TeacherCache
from ..methods.registry import run_method
from ..settings import SearchArguments
from . import stages
from .context import RunContext
from .stages import fastest_dtype

__all__ = ["RunContext", "SearchArguments", "compress", "fastest_dtype", "format_table", "run", "run_search",
           "search_loaded"]


def _search(ctx: RunContext) -> RunContext:
    for stage in (stages.check_memory, stages.calibrate, stages.prepare, stages.fitness, stages.initialize, stages.search):
        stage(ctx)
    if distributed.is_main():  # the other processes of a multi-process run only help the search
        for stage in (stages.refine, stages.evaluate, stages.summarize):
            stage(ctx)
    return ctx


def run(args: SearchArguments, model=None, tokenizer=None) -> RunContext:
    """Run a full EvoPress job (see `SearchArguments`) and return its context:
    ``ctx.report`` (also written to ``output_dir/result.json``), ``ctx.model`` (compressed in place
    when ``output_dir`` is set), ``ctx.tokenizer``. ``model`` / ``tokenizer``: already loaded ones
    (``args.model`` then only names the checkpoint). Under ``torchrun`` the processes share the
    search (`optimum_evo.distributed`) and process 0 does the rest."""
    start = time.perf_counter()
    distributed.init_from_env()
    ctx = RunContext(args=args, method=run_method(args), path=args.model, model=model,
                     tokenizer=tokenizer)
    stages.check_exports(ctx)
    stages.load(ctx)
    _search(ctx)
    if not distributed.is_main():
        return ctx
    if ctx.output_dir:
        if args.save_model or args.export or args.lora_correction:
            stages.materialize(ctx)
            stages.export(ctx)
            stages.correct(ctx)
        stages.save(ctx)
    stages.write_report(ctx, time.perf_counter() - start)
    return ctx


def run_search(args: SearchArguments) -> dict:
    """Run a full EvoPress job (see `SearchArguments`) and return the report that
    is also written to ``output_dir/result.json``."""
    return run(args).report


def search_loaded(args: SearchArguments, model, tokenizer, path=None) -> RunContext:
    """The search of `run_search` on an already loaded ``model`` (float32 or bfloat16) and its
    ``tokenizer``: calibrate, (build or reuse the level database,) search, evaluate (unless
    ``args.eval_windows == 0``). ``path`` names the model in caches and the report (default
    ``args.model``). The model is left dense; nothing is written except the checkpoint and teacher
    cache under ``args.output_dir`` and the database.

    Examples:
        >>> ctx = search_loaded(SearchArguments(compression="depth", target=0.25), model, tok)  # doctest: +SKIP
        >>> ctx.method.materialize(model, ctx.eval_space, ctx.best)                           # doctest: +SKIP
    """
    ctx = RunContext(args=args, method=run_method(args), path=str(path if path is not None else args.model),
                     model=model, tokenizer=tokenizer)
    return _search(ctx)


def compress(args: SearchArguments, model, tokenizer, path, search_model=None) -> RunContext:
    """Search (on ``search_model``, default ``model``), then compress ``model`` in place with the
    found candidate and, with ``args.lora_correction``, attach the correction adapter. Returns the
    context; ``ctx.record`` is the checkpoint's ``quantization_config``."""
    work = search_model if search_model is not None else model
    ctx = search_loaded(args, work, tokenizer, path)
    if work is not model:
        ctx.model = model
        ctx.teacher = None  # built on the search model: the correction builds its own
        if args.lora_correction and ctx.evaluation is not None:
            ctx.eval_teacher = TeacherCache.build(model, ctx.evaluation.to(model.device), "topk", args.top_k,
                                                  progress=False)
    stages.materialize(ctx)
    stages.correct(ctx)
    return ctx


def format_table(report: dict) -> str:
    """Before/after table of a report: perplexity, KL, parameters / budget and time."""
    method = run_method({**report.get("arguments", {}), "compression": report["compression"]})
    rows = report["results"]
    times = report["timings"]
    lines = [f"{'model':<24} {'ppl':>10} {'KL':>8} {'params (M)':>11} {'budget':>12}", "-" * 69]
    if not rows:
        lines.append("(no held-out evaluation: eval_windows=0)")
    for name, r in rows.items():
        kl = f"{r['kl']:.4f}" if "kl" in r else "-"
        lines.append(f"{name:<24} {r['perplexity']:>10.2f} {kl:>8} {r['parameters'] / 1e6:>11.1f} "
                     f"{method.budget_text(r):>12}")
    lines.append("-" * 69)
    lines.append(
        f"search {times.get('search_seconds', 0):.0f} s ({report['search']['generations']} generations, "
        f"{report['search']['tokens'] / 1e6:.2f}M candidate-tokens), teacher {times.get('teacher_seconds', 0):.0f} s"
        + (f", database {times['database_seconds']:.0f} s" if "database_seconds" in times else "")
        + f", total {times.get('total_seconds', 0):.0f} s"
    )
    extra = method.summary_lines(report["profile"])
    rates = [h["structure_rate"] for h in report["search"].get("history", []) if "structure_rate" in h]
    if rates:  # a space with sub-trees: how the share of structural moves went
        extra = [*extra, ("structural moves", f"{rates[0]:.0%} of primary moves at the start, {rates[-1]:.0%} at the "
                                               f"end (mean {sum(rates) / len(rates):.0%})")]
    width = max([19] + [len(key) + 1 for key, _ in extra])
    for key, value in extra:
        lines.append(f"{key:<{width}}{value}")
    return "\n".join(lines)
