"""The stages of an EvoPress run, each a function of the `RunContext`.

| stage | does |
|---|---|
| ``load`` | resolve the model, load it (evaluation dtype) and its tokenizer |
| ``calibrate`` | calibration windows; evaluation windows (unless ``eval_windows=0``) |
| ``prepare`` | the search model (search dtype), the method's shared work (level database), the search spaces and the engine settings |
| ``fitness`` | the dense teacher cache (persisted in ``output_dir/cache/teacher``) and the KL objective |
| ``initialize`` | the method's baselines and, when asked for, best-of-N random candidates |
| ``search`` | the evolutionary search (checkpointed in ``output_dir/checkpoint``) |
| ``refine`` | the method's improvement of the found candidate's weights at its levels (quantization: ``retune``) |
| ``evaluate`` | held-out perplexity and KL of dense, EvoPress and (optionally) the baselines |
| ``summarize`` | the run report |
| ``materialize`` | compress the model in place with the found candidate; the checkpoint record |
| ``export`` | plugin-free formats (``export=[...]``) into ``output_dir/export-FORMAT`` |
| ``correct`` | LoRA error correction (``lora_correction=RANK``), reusing the run's dense model, calibration windows and teacher caches |
| ``save`` | the EvoPress checkpoint in ``output_dir/model``, the plots and ``result.json`` |
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time

import torch

from ..data import calibration_windows, evaluation_windows
from ..fitness import KLObjective, TeacherCache, best_by_kl, evaluate as evaluate_model
from ..search import EvolutionarySearch
from ..search.checkpoint import atomic_write_json
from .context import RunContext
from .memory import prefix_cache_budget

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fastest_dtype(size: int = 768, repeats: int = 6) -> torch.dtype:
    """float32 or bfloat16, whichever multiplies matrices faster on this CPU (bf16 is ~2x faster
    with AMX/AVX512-BF16 kernels and slower without them)."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(512, size, dtype=dtype)
        b = torch.randn(size, 4 * size, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
            if timings and time.perf_counter() - start > min(timings.values()):
                break  # already slower than a whole run of a faster dtype: without bf16 kernels one product takes seconds
        timings[dtype] = time.perf_counter() - start
    return min(timings, key=timings.get)


def local_search_dtype(ctx: RunContext) -> torch.dtype:
    """This process's search dtype: ``args.search_dtype``; for ``"auto"``, on an accelerator (cuda, xpu,
    mps...) the model's own dtype (the search scores the model itself, no copy), on a CPU
    `fastest_dtype` (timed once per run; the memory check and the search use the same answer)."""
    if ctx.search_dtype is None:
        if ctx.args.search_dtype != "auto":
            ctx.search_dtype = DTYPES[ctx.args.search_dtype]
        elif ctx.model is not None and next(ctx.model.parameters()).device.type not in ("cpu", "meta"):
            ctx.search_dtype = ctx.model.dtype
        else:
            ctx.search_dtype = fastest_dtype()
    return ctx.search_dtype


def _hash_tensor(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def check_exports(ctx: RunContext) -> None:
    """Refuse, before anything loads, an export format that cannot hold what the method makes."""
    from ..exporters import get_exporter

    for fmt in ctx.args.export or []:
        reason = get_exporter(fmt).refusal(ctx.method)
        if reason:
            raise ValueError(reason)


def _refuse_compressed(path: str) -> None:
    """A search needs a dense model: refuse a folder without weights and a checkpoint that is already
    quantized / compressed."""
    import json
    from pathlib import Path

    folder = Path(path)
    if folder.is_dir() and not any(any(folder.glob(p)) for p in ("*.safetensors", "pytorch_model*.bin")):
        raise ValueError(f"Model directory {path!r} has a config.json but no weights (model.safetensors); save the "
                         "model with save_pretrained, or point to the folder that holds its weights.")
    config = folder / "config.json"
    qc = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    if not qc:
        return
    method = qc.get("quant_method")
    if method == "evopress":
        base = (qc.get("metrics") or {}).get("model")
        raise ValueError(f"{path} is an EvoPress checkpoint (already compressed, {qc.get('compression')}); search the "
                         f"dense model it was made from{f' ({base})' if base else ''}.")
    raise ValueError(f"{path} is a {method} checkpoint (already quantized); EvoPress searches a dense model: point "
                     "--model at the original one.")


def load(ctx: RunContext) -> None:
    from ..embedded_models import resolve_model
    from ..loading import load_model, load_tokenizer

    ctx.path = resolve_model(ctx.args.model)
    if ctx.model is None:
        _refuse_compressed(ctx.path)
    if ctx.tokenizer is None:
        ctx.tokenizer = load_tokenizer(ctx.path)
    if ctx.model is None:
        ctx.model = load_model(ctx.path, DTYPES[ctx.args.eval_dtype])


def check_memory(ctx: RunContext) -> None:
    """Print what the run will allocate and stop early when the model's device cannot hold it
    (`optimum_evo.pipeline.memory`)."""
    from .. import distributed
    from ..embedded_models import default_cache_root
    from .memory import check

    args = ctx.args
    root = args.database_dir or (default_cache_root().parent / "databases")
    ctx.memory_needs = check(args, ctx.model, ctx.method, local_search_dtype(ctx), database_root=root,
                             show=args.progress and distributed.is_main())


def calibrate(ctx: RunContext) -> None:
    args = ctx.args
    ctx.calibration = calibration_windows(args.dataset, ctx.tokenizer, args.num_samples, args.seq_len, args.seed)
    if args.eval_windows != 0:
        ctx.evaluation = evaluation_windows(args.eval_dataset, ctx.tokenizer, args.eval_seq_len, args.eval_windows)


def prepare(ctx: RunContext) -> None:
    args, method = ctx.args, ctx.method
    from .. import distributed

    eval_dtype = ctx.model.dtype
    ctx.search_dtype = distributed.all_gather_objects(local_search_dtype(ctx))[0]  # every process searches in one dtype
    ctx.search_model = ctx.model if ctx.search_dtype == eval_dtype else copy.deepcopy(ctx.model).to(ctx.search_dtype)
    ctx.identity = run_identity(ctx)
    method.prepare(ctx)
    ctx.space = method.build_space(ctx, ctx.search_model)
    ctx.eval_space = ctx.space if ctx.model is ctx.search_model else method.build_space(ctx, ctx.model)
    ctx.search_config = method.search_config(args, ctx.space)


def run_identity(ctx: RunContext) -> dict:
    """What decides a run's result besides the space and the engine settings: the model (config and a
    digest of its weights), the calibration tokens (a digest; it covers the text, ``num_samples``,
    ``seq_len`` and ``seed``, which are named too), the fitness and the search dtype."""
    from ..methods.layerwise import config_hash, weights_hash

    args = ctx.args
    return {"model": str(ctx.path), "model config": config_hash(ctx.model), "model weights": weights_hash(ctx.model),
            "dataset": args.to_dict()["dataset"], "num_samples": args.num_samples, "seq_len": args.seq_len,
            "seed": args.seed, "calibration tokens": _hash_tensor(ctx.calibration), "fitness": args.fitness,
            "top_k": args.top_k, "search_dtype": str(ctx.search_dtype).replace("torch.", "")}


def fitness(ctx: RunContext) -> None:
    args, out = ctx.args, ctx.output_dir
    start = time.perf_counter()
    identity = ctx.identity
    manifest = {"model": identity["model"], "config": identity["model config"], "weights": identity["model weights"],
                "windows": identity["calibration tokens"], "mode": args.fitness, "top_k": args.top_k,
                "dtype": str(ctx.search_dtype)}
    from .. import distributed

    teacher = TeacherCache.load(out / "cache" / "teacher", manifest) if out else None
    if teacher is None:
        teacher = TeacherCache.build(ctx.search_model, ctx.calibration, args.fitness, args.top_k, progress=args.progress)
        if out and distributed.is_main():
            teacher.save(out / "cache" / "teacher", manifest)
    ctx.teacher = teacher
    ctx.timings["teacher_seconds"] = time.perf_counter() - start
    device = next(p for p in ctx.search_model.parameters()).device
    cache_bytes, spill_bytes = prefix_cache_budget(args.prefix_cache_size, device)
    ctx.objective = KLObjective(ctx.search_model, ctx.calibration, teacher, ctx.space, reuse_prefix=args.reuse_prefix,
                                cache_bytes=cache_bytes, spill_bytes=spill_bytes)


def random_candidates(space, reference, n: int, seed: int) -> list:
    """``n`` random candidates with the budget of ``reference`` (seeded)."""
    rng = random.Random(seed)
    return [space.level_space.random_candidate(reference, rng) for _ in range(n)]


def initialize(ctx: RunContext) -> None:
    args = ctx.args
    start = time.perf_counter()
    baselines, ctx.baseline_notes = ctx.method.baselines(ctx)
    ctx.timings["baseline_seconds"] = time.perf_counter() - start
    heuristics = list(dict.fromkeys(baselines.values()))  # deduplicated, in order
    reference = next(iter(baselines.values()))
    randoms = random_candidates(ctx.space, reference, args.random_candidates, args.seed + 1)
    if args.compare_baselines or args.init == "random":
        start = time.perf_counter()
        named = {f"random_{i}": c for i, c in enumerate(randoms)}
        best, _ = best_by_kl(ctx.objective, named, ctx.search_config.init_tokens, args.seed + 2, args.progress,
                             "Best-of-N random baseline")
        baselines[f"random_best_of_{args.random_candidates}"] = named[best]
        ctx.timings["random_baseline_seconds"] = time.perf_counter() - start
    ctx.baselines = baselines
    ctx.initial = heuristics if args.init == "baselines" else randoms
    if args.init_from is not None:  # an earlier result: a baseline of its own and a starting point
        from ..settings import init_report_path

        seed = ctx.method.seed_candidate(ctx, json.loads(init_report_path(args.init_from).read_text()), reference)
        baselines["init_from"] = seed
        ctx.initial = list(dict.fromkeys([*ctx.initial, seed]))


def search(ctx: RunContext) -> None:
    out = ctx.output_dir
    from .. import distributed

    engine = EvolutionarySearch(ctx.space.level_space, ctx.objective, ctx.search_config,
                                checkpoint_dir=out / "checkpoint" if out else None,
                                progress=ctx.args.progress and distributed.is_main(), identity=ctx.identity,
                                write_checkpoints=distributed.is_main())
    ctx.objective.reset_stats()
    start = time.perf_counter()
    ctx.result = engine.run(ctx.initial)
    ctx.timings["search_seconds"] = time.perf_counter() - start
    parts = distributed.all_gather_objects(ctx.objective.stats())  # every process's share of the work
    work = {k: sum(p[k] for p in parts) for k in ("window_scores", "parent_cache_hits", "decoder_layer_forwards",
                                                  "decoder_layer_forwards_without_reuse")}
    naive = work["decoder_layer_forwards_without_reuse"]
    ctx.report["search_work"] = {**work, "compute_saved": round(1 - work["decoder_layer_forwards"] / naive, 4)
                                 if naive else 0.0, "processes": len(parts),
                                 # per process: each holds its own prefix cache
                                 "prefix_cache_peak_bytes": max(p["prefix_cache_peak_bytes"] for p in parts),
                                 "prefix_cache_budget_bytes": parts[0]["prefix_cache_budget_bytes"]}
    ctx.space.restore(ctx.search_model)
    ctx.objective = None  # frees the prefix cache
    if not ctx.args.lora_correction:
        ctx.teacher = None  # only the correction reuses it


def refine(ctx: RunContext) -> None:
    start = time.perf_counter()
    extras = ctx.method.refine(ctx)
    if extras:
        ctx.refined = extras
        ctx.timings["refine_seconds"] = time.perf_counter() - start


def evaluate(ctx: RunContext) -> None:
    args, model = ctx.args, ctx.model
    ctx.eval_space.restore(model)
    rows = {}
    if ctx.evaluation is not None:
        ctx.eval_teacher = TeacherCache.build(model, ctx.evaluation, "topk", args.top_k, progress=False)
        rows["dense"] = evaluate_model(model, ctx.evaluation, ctx.eval_teacher, progress=args.progress,
                                       desc="Evaluating dense")
        to_eval = {"evopress": ctx.best, **(ctx.baselines if args.compare_baselines else {})}
        for name, cand in to_eval.items():
            ctx.eval_space.apply(model, cand)
            rows[name] = evaluate_model(model, ctx.evaluation, ctx.eval_teacher, progress=args.progress,
                                        desc=f"Evaluating {name}")
            rows[name].update(ctx.eval_space.describe(cand))
        ctx.eval_space.restore(model)
    total_params = sum(p.numel() for p in model.parameters())
    for r in rows.values():
        r.setdefault("parameters", total_params)
    ctx.rows = rows


def summarize(ctx: RunContext) -> None:
    from ..decoder import find_decoder_layout

    args = ctx.args
    result = ctx.result
    work = ctx.report.pop("search_work", None)
    ctx.report = {
        "model": str(ctx.path),
        "compression": args.compression,
        "arguments": args.to_dict(),
        "search_config": ctx.search_config.to_dict(),
        "search_dtype": str(ctx.search_dtype).replace("torch.", ""),
        "num_layers": len(find_decoder_layout(ctx.model)),
        "profile": ctx.eval_space.describe(ctx.best),
        "candidate": list(ctx.best),
        "initial_candidates": {name: list(c) for name, c in ctx.baselines.items()},
        "baseline_settings": ctx.baseline_notes,
        "search": {**result.to_dict(), "work": work},
        "evaluation": {"text": args.to_dict()["eval_dataset"], "windows": int(ctx.evaluation.shape[0]),
                       "seq_len": args.eval_seq_len, "dtype": str(ctx.model.dtype).replace("torch.", "")}
        if ctx.evaluation is not None else None,
        "results": ctx.rows,
        "timings": {k: round(v, 1) for k, v in ctx.timings.items()},
        "resources_estimate": [{"what": x.what, "bytes": x.bytes, "where": x.where} for x in ctx.memory_needs or []],
        **ctx.method.report_extras(ctx, ctx.best),
        **ctx.refined,
    }


def materialize(ctx: RunContext) -> None:
    from ..record import checkpoint_record, metrics_from_report

    if ctx.args.lora_correction and ctx.dense_model is None:
        ctx.dense_model = copy.deepcopy(ctx.model)  # the correction fits the dense outputs
    ctx.profile = ctx.method.materialize(ctx.model, ctx.eval_space, ctx.best)
    ctx.record = checkpoint_record(ctx.args, ctx.profile, metrics_from_report(ctx.report))


def export(ctx: RunContext) -> None:
    from ..exporters import export as export_model

    for fmt in dict.fromkeys(ctx.args.export or []):
        summary = export_model(ctx.model, ctx.output_dir / f"export-{fmt}", fmt, tokenizer=ctx.tokenizer)
        ctx.report.setdefault("exports", {})[fmt] = summary


def correct(ctx: RunContext) -> None:
    args = ctx.args
    if not args.lora_correction:
        return
    from ..record import metrics_from_report
    from ..correction import adapter_bytes, correct as lora_correct
    from ..correction.peft_io import adopt_adapter

    start = time.perf_counter()
    train = {"max_steps": args.lora_train_steps, "learning_rate": args.lora_learning_rate} \
        if args.lora_train_steps else False
    # the search teacher is the distillation teacher when it is the same top-K cache of the dense model
    same = ctx.teacher is not None and ctx.teacher.mode == "topk" and ctx.search_dtype == ctx.model.dtype
    teacher = ctx.teacher if same else "topk"
    with torch.enable_grad():  # the optional distillation trains
        peft_model = lora_correct(ctx.model, ctx.dense_model, ctx.calibration, rank=args.lora_correction,
                                  param_budget=args.lora_param_budget, method=args.lora_method,
                                  inputs=args.lora_inputs, train=train, top_k=args.top_k, teacher=teacher,
                                  progress=args.progress)
    section = {**peft_model.evopress_correction, "adapter_bytes_float16": adapter_bytes(peft_model)}
    if ctx.rows:
        row = evaluate_model(peft_model.get_base_model(), ctx.evaluation, ctx.eval_teacher, progress=args.progress,
                             desc="Evaluating evopress+lora")
        row["parameters"] = sum(p.numel() for p in peft_model.parameters())
        budget = {k: v for k, v in ctx.rows.get("evopress", {}).items()
                  if k not in ("perplexity", "nll", "tokens", "kl", "parameters")}
        row.update(budget)  # same compressed weights: same bits / sparsity
        ctx.rows["evopress+lora"] = row
    ctx.dense_model = None
    section["seconds"] = round(time.perf_counter() - start, 1)
    ctx.report["lora_correction"] = section
    ctx.peft_model = peft_model
    from ..faults import fault_point

    fault_point("correction.fitted")
    adopt_adapter(peft_model)  # the model itself carries the adapter (transformers' PEFT integration)
    ctx.record["metrics"] = metrics_from_report(ctx.report)
    ctx.record["metrics"]["lora_correction"] = section


def save(ctx: RunContext) -> None:
    args, out, report = ctx.args, ctx.output_dir, ctx.report
    out.mkdir(parents=True, exist_ok=True)
    ctx.method.plot_profile(report, out / "profile.png")
    from ..plotting import plot_fitness

    initial = report["search"].get("initial_scores")
    plot_fitness(ctx.result.history, out / "fitness.png", initial=min(initial) if initial else None)
    if args.save_model and ctx.record is not None:
        from ..checkpoint import save_checkpoint

        folder = save_checkpoint(ctx.model, out / "model", ctx.record, tokenizer=ctx.tokenizer)
        report["saved_model"] = {"path": str(folder), "format": "evopress",
                                 **{k: v for k, v in ctx.profile.items() if k != "modules"}}
        if ctx.peft_model is not None:
            report["lora_correction"]["path"] = str(folder / "lora-correction")


def write_report(ctx: RunContext, seconds: float) -> None:
    ctx.report["timings"]["total_seconds"] = round(seconds, 1)
    if ctx.output_dir:
        atomic_write_json(ctx.output_dir / "result.json", ctx.report)
