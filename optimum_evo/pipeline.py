"""The end-to-end job: load, calibrate, search, evaluate, compress, save, report.

Example:
    >>> from optimum_evo.pipeline import SearchArguments, run_search
    >>> args = SearchArguments(model="smollm2", compression="depth", target=0.25, output_dir="out")
    >>> result = run_search(args)                                  # doctest: +SKIP
    >>> result["evopress"]["perplexity"]                           # doctest: +SKIP
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import BUILTIN_TEXTS, EVALUATION_ONLY, calibration_windows, evaluation_windows
from .fitness import KLObjective, TeacherCache, evaluate
from .models import resolve_model
from .search import EvolutionarySearch, SearchConfig, random_candidate
from .search.checkpoint import atomic_write_json
from .search.config import PRESETS

logger = logging.getLogger(__name__)

COMPRESSIONS = ("depth", "sparsity", "quantization")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_BITS = (2, 3, 4, 5, 6, 8)


@dataclass
class SearchArguments:
    """Everything a search run needs; invalid values fail here, before any model is loaded.

    Args:
        model: embedded name (``"smollm2"``, ``"gemma3"``), local folder or Hub id.
        compression: ``"depth"``, ``"sparsity"`` or ``"quantization"``.
        target: depth: fraction of sub-blocks to drop; sparsity: fraction of weights to prune
            (over the searched linears); quantization: average bits (e.g. 3.0, 2.5).
        output_dir: where the compressed model, ``result.json``, plots and the checkpoint go.
        mode: depth units, ``"separate"`` (attention and MLP) or ``"block"``.
        preset: ``"fast"`` (CPU), ``"paper"`` (reference defaults) or ``"superfast"``.
        generations, offspring: override the preset.
        confirm_tokens: re-score a child that beat the parent on this many fresh tokens before
            accepting it (overrides the preset; see :class:`~optimum_evo.search.SearchConfig`).
        calibration: calibration text (built-in name, file, ...; see :mod:`optimum_evo.data`).
        num_samples, seq_len: calibration pool of ``num_samples`` windows of ``seq_len`` tokens.
        fitness: ``"topk"`` or ``"full"`` teacher cache; ``top_k`` its K.
        evaluation: evaluation text (default WikiText-2 test); ``eval_windows`` windows of
            ``eval_seq_len`` tokens (``None`` = the whole text).
        init: ``"baselines"`` starts from the best (by KL) of ShortGPT and sliding-window cosine,
            per sub-block and per whole block,
            ``"random"`` from the best of ``random_candidates`` random candidates (the paper).
        compare_baselines: also evaluate ShortGPT, sliding-window cosine and best-of-N random.
        search_dtype: dtype of the model scored during the search (``"auto"`` picks the faster
            of float32 and bfloat16 on this machine); ``eval_dtype`` for the final evaluation.
        reuse_prefix: reuse the parent's activations of the unchanged prefix of a child.
        levels: quantization bit widths (default 2,3,4,5,6,8); ``group_size`` of GPTQ.
        sparsity_step: sparsity levels are spaced by this fraction of the median linear's weights,
            ``max_offset`` steps either side of the target.
        modules: regular expression (``re.search`` on the module name, e.g. ``r"mlp"`` or
            ``r"layers\\.(0|1)\\."``) restricting the sparsity / quantization search to some linears of
            the decoder blocks (default: all of them); the others stay dense.
        database_dir: level database folder (default: a cache folder keyed by model, calibration
            and settings, reused by later runs).
        seed: seed of calibration sampling and of the search.
        lora_correction: rank of LoRA error-correction adapters computed after a sparsity or
            quantization search (0 = none); saved in ``model/lora-correction/`` (see
            :mod:`optimum_evo.correction`). ``lora_method`` ``"eora"`` or ``"svd"``,
            ``lora_inputs`` ``"dense"``, ``"compressed"`` or ``"auto"``, ``lora_train_steps`` of KL distillation
            (0 = closed form only) at ``lora_learning_rate``; ``lora_param_budget``: total adapter
            parameters, allocated over the linears where they remove the most error (ranks capped
            at ``lora_correction``; ``None`` = that rank everywhere).
    """

    model: str = "smollm2"
    compression: str = "depth"
    target: float = 0.25
    output_dir: str | None = None
    mode: str = "separate"
    preset: str = "fast"
    generations: int | None = None
    offspring: int | None = None
    confirm_tokens: int | None = None
    calibration: object = "brown"
    num_samples: int = 128
    seq_len: int = 512
    fitness: str = "topk"
    top_k: int = 512
    evaluation: object = "wikitext2"
    eval_windows: int | None = 40
    eval_seq_len: int = 512
    init: str = "baselines"
    random_candidates: int = 16
    compare_baselines: bool = False
    search_dtype: str = "auto"
    eval_dtype: str = "float32"
    reuse_prefix: bool = True
    levels: tuple | None = None
    group_size: int = 128
    sparsity_step: float = 0.05
    max_offset: int = 5
    modules: str | None = None
    database_dir: str | None = None
    save_model: bool = True
    lora_correction: int = 0
    lora_method: str = "eora"
    lora_inputs: str = "dense"
    lora_train_steps: int = 0
    lora_learning_rate: float = 5e-4
    lora_param_budget: int | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"Unknown compression {self.compression!r}; choose one of {COMPRESSIONS}.")
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)):
            raise ValueError(f"target must be a number, got {self.target!r}.")
        if self.compression == "quantization":
            self.levels = tuple(sorted(int(b) for b in (self.levels or DEFAULT_BITS)))
            if not all(1 <= b <= 8 for b in self.levels) or len(set(self.levels)) != len(self.levels):
                raise ValueError(f"levels must be distinct bit widths in 1..8, got {self.levels}.")
            if not self.levels[0] <= self.target <= self.levels[-1]:
                raise ValueError(
                    f"target must be an average bit width within the levels {self.levels} "
                    f"(e.g. 3.0 or 2.5), got {self.target!r}."
                )
            if self.group_size < 0:
                raise ValueError(f"group_size must be >= 0 (0 = one group per row), got {self.group_size}.")
        elif not 0 < self.target < 1:
            what = "the sub-blocks to drop" if self.compression == "depth" else "the weights to prune"
            raise ValueError(f"target must be a fraction in (0, 1) of {what} (e.g. 0.25), got {self.target!r}.")
        if self.modules is not None:
            try:
                re.compile(self.modules)
            except (re.error, TypeError) as e:
                raise ValueError(f"modules must be a regular expression over module names, got {self.modules!r}: {e}.")
        if not 0 < self.sparsity_step < 1 or self.max_offset < 1:
            raise ValueError("sparsity_step must be in (0, 1) and max_offset >= 1.")
        if self.mode not in ("separate", "block"):
            raise ValueError(f"mode must be 'separate' or 'block', got {self.mode!r}.")
        if self.preset not in PRESETS:
            raise ValueError(f"Unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}.")
        for name in ("num_samples", "seq_len", "top_k", "eval_seq_len", "random_candidates"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.seq_len < 2:
            raise ValueError("seq_len must be at least 2 tokens.")
        for name in ("generations", "offspring", "eval_windows", "confirm_tokens"):
            value = getattr(self, name)
            if value is not None and int(value) < (0 if name == "generations" else 1):
                raise ValueError(f"{name} must be positive, got {value!r}.")
        if self.lora_correction:
            if int(self.lora_correction) < 0 or self.lora_train_steps < 0:
                raise ValueError("lora_correction (a rank) and lora_train_steps must be >= 0.")
            if self.lora_param_budget is not None and (isinstance(self.lora_param_budget, bool) or not isinstance(
                    self.lora_param_budget, int) or self.lora_param_budget <= 0):
                raise ValueError(f"lora_param_budget must be a positive number of adapter parameters, got "
                                 f"{self.lora_param_budget!r}.")
            if self.compression == "depth":
                raise ValueError("lora_correction applies to sparsity and quantization: a depth-pruned model has "
                                 "no per-linear compression residual to correct.")
            if self.lora_method not in ("eora", "svd") or self.lora_inputs not in ("dense", "compressed", "auto"):
                raise ValueError("lora_method must be 'eora' or 'svd' and lora_inputs 'dense', 'compressed' or "
                                 "'auto'.")
        if self.fitness not in ("topk", "full"):
            raise ValueError(f"fitness must be 'topk' or 'full', got {self.fitness!r}.")
        if self.init not in ("baselines", "random"):
            raise ValueError(f"init must be 'baselines' or 'random', got {self.init!r}.")
        if self.search_dtype not in ("auto", *DTYPES) or self.eval_dtype not in DTYPES:
            raise ValueError(f"dtypes must be one of {list(DTYPES)} (search_dtype may also be 'auto').")
        if isinstance(self.calibration, str) and self.calibration in EVALUATION_ONLY:
            raise ValueError(
                f"calibration={self.calibration!r} is the evaluation text; calibrate on "
                f"{sorted(set(BUILTIN_TEXTS) - EVALUATION_ONLY)} or your own text."
            )
        if isinstance(self.calibration, (list, tuple)) and not any(str(t).strip() for t in self.calibration):
            raise ValueError("The calibration text is empty: give at least one non-empty document.")
        if isinstance(self.calibration, str) and Path(self.calibration).is_file() \
                and not Path(self.calibration).read_text(errors="replace").strip():
            raise ValueError(f"The calibration file {self.calibration!r} is empty.")

    def search_config(self) -> SearchConfig:
        return SearchConfig.from_preset(self.preset, self.compression, generations=self.generations,
                                        offspring=self.offspring, confirm_tokens=self.confirm_tokens,
                                        seed=self.seed)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("calibration", "evaluation"):
            if not isinstance(d[key], (str, type(None))):
                d[key] = f"<{type(getattr(self, key)).__name__}>"
        return d


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
        timings[dtype] = time.perf_counter() - start
    return min(timings, key=timings.get)


def _hash_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def _load_model(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval()


def _database_root(args: SearchArguments, identity: dict) -> Path:
    if args.database_dir:
        return Path(args.database_dir)
    from .models import default_cache_root

    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_root().parent / "databases" / f"{args.compression}-{key}"


def _layerwise_setup(args, path, model, search_model, calib, progress):
    """Open or build the level database and make the search space (sparsity / quantization)."""
    import statistics

    from .compressors.calibrate import linear_modules
    from .compressors.database import LevelDatabase, full_settings
    from .modeling import find_decoder_layout
    from .spaces.layerwise import QuantizationSpace, SparsitySpace

    identity = {"model": str(path), "config": _config_hash(model), "calibration": _hash_tensor(calib),
                "weights": _weights_hash(model)}
    if args.modules is not None:
        identity["modules"] = args.modules
    if args.compression == "quantization":
        levels, settings = list(args.levels), {"group_size": args.group_size}
    else:
        layout = find_decoder_layout(model)
        sizes = [m.weight.numel() for layer in layout.layers for m in linear_modules(layer).values()]
        step = max(1, round(args.sparsity_step * statistics.median(sizes)))
        identity["sparsity_levels"] = {"target": args.target, "step": step, "max_offset": args.max_offset}
        levels = lambda name, shape: SparsitySpace.level_fractions(shape[0] * shape[1], args.target, step,  # noqa: E731
                                                                   args.max_offset)
        settings = None
    root = _database_root(args, {**identity, "kind": args.compression, "levels": str(args.levels),
                                 "settings": full_settings(args.compression, settings)})
    start = time.perf_counter()
    select = (lambda name: re.search(args.modules, name) is not None) if args.modules is not None else None
    db = LevelDatabase.open_or_build(root, model, calib, args.compression, levels, settings, identity,
                                     modules=select, progress=progress)
    if not db.modules:
        raise ValueError(f"modules={args.modules!r} selects none of the decoder blocks' linear layers.")
    build = time.perf_counter() - start

    def make_space(m):
        if args.compression == "quantization":
            return QuantizationSpace(m, db, args.target)
        info = identity["sparsity_levels"]
        return SparsitySpace(m, db, args.target, info["step"], info["max_offset"])

    return db, make_space(search_model), make_space, build


def _config_hash(model) -> str:
    return hashlib.sha256(model.config.to_json_string().encode()).hexdigest()[:16]


def _weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:: max(1, p.numel() // 4096)].numpy().tobytes())
    return h.hexdigest()[:16]


def _depth_baselines(space, search_model, calib) -> dict:
    from .spaces.depth import residual_states, shortgpt_candidate, sliding_window_cosine_candidate

    states = residual_states(search_model, calib[: min(8, len(calib))], space)
    baselines = {"shortgpt": shortgpt_candidate(space, states), "sliding_cosine": sliding_window_cosine_candidate(space, states)}
    if space.mode == "separate":  # the classic whole-block variants fit the same budget
        baselines["shortgpt_blocks"] = shortgpt_candidate(space, states, blocks=True)
        baselines["sliding_cosine_blocks"] = sliding_window_cosine_candidate(space, states, blocks=True)
    return baselines


def _best_by_kl(objective, candidates: dict, calib, tokens: int, seed: int, progress: bool, desc: str):
    """Score named candidates on one seeded minibatch; return (best name, scores)."""
    n = min(len(calib), max(1, -(-tokens // calib.shape[1])))
    ids = sorted(random.Random(seed).sample(range(len(calib)), n))
    scores = {name: objective.score([c], ids)[0]
              for name, c in tqdm(candidates.items(), desc=desc, disable=not progress, dynamic_ncols=True)}
    return min(scores, key=scores.get), scores


def _layerwise_baselines(args, space, objective, calib) -> dict:
    from .spaces.layerwise import dp_candidate, owl_candidate

    baselines = {"uniform": space.uniform(), "dp": dp_candidate(space)}
    if args.compression == "sparsity":
        grid = {f"owl(lambda={lam},M={m})": owl_candidate(space, lam, m)
                for lam in (0.02, 0.05, 0.08, 0.1, 0.15, 0.2) for m in (3, 5, 7, 10)}
        first_name = {}
        for name, cand in grid.items():  # identical profiles from different settings: score once
            first_name.setdefault(cand, name)
        grid = {name: cand for cand, name in first_name.items()}
        best, _ = _best_by_kl(objective, grid, calib, 2048, args.seed + 3, args.progress, "OWL grid")
        baselines["owl"] = grid[best]
        baselines["owl_setting"] = best
    return baselines


@dataclass
class SearchOutcome:
    """What :func:`search_loaded` found: the report, the best candidate, the search space bound to
    the model that was passed in (restored to dense) and, for sparsity / quantization, the level
    database (``space.profile(best)`` gives ``{module name: level}``)."""

    report: dict
    best: tuple
    space: object
    db: object
    history: list


def run_search(args: SearchArguments) -> dict:
    """Run a full EvoPress job (see :class:`SearchArguments`) and return the result dict that is
    also written to ``output_dir/result.json``."""
    from transformers import AutoTokenizer

    from .plotting import plot_depth_profile, plot_fitness, plot_layer_levels

    t0 = time.perf_counter()
    out = Path(args.output_dir) if args.output_dir else None
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = _load_model(path, DTYPES[args.eval_dtype])
    outcome = search_loaded(args, model, tokenizer, path)
    report = outcome.report
    description = report["profile"]
    if out:
        out.mkdir(parents=True, exist_ok=True)
        if args.compression == "depth":
            num_layers = report["num_layers"]
            plot_depth_profile(description, num_layers, out / "profile.png",
                               title=f"EvoPress depth profile ({description['dropped_sub_blocks']} sub-blocks dropped)")
        else:
            ylabel = "bits" if args.compression == "quantization" else "sparsity"
            plot_layer_levels(report["levels"], out / "profile.png", ylabel,
                              title=f"EvoPress {args.compression} profile (target {args.target})")
        initial = report["search"].get("initial_scores")
        plot_fitness(outcome.history, out / "fitness.png", initial=min(initial) if initial else None)
        if args.save_model:
            # The same EvoPress checkpoint as from_pretrained(..., quantization_config=EvoPressConfig(...)):
            # packed mixed-bit linears, exact zeros, removed blocks and sub-block stand-ins; reload
            # with `import optimum_evo` + from_pretrained (exports: --export).
            from .integrations.transformers.config import EvoPressConfig
            from .integrations.transformers.quantizer import apply_search_outcome, mark_compressed

            config = EvoPressConfig.from_search_arguments(args)
            apply_search_outcome(model, config, outcome)
            mark_compressed(model, config)
            model.save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
            report["saved_model"] = {"path": str(out / "model"), "format": "evopress",
                                     **{k: v for k, v in config.profile.items() if k != "modules"}}
            if args.lora_correction:
                from .correction.pipeline_step import lora_correction_step

                lora_correction_step(args, model, path, report, out / "model")
        report["timings"]["total_seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(out / "result.json", report)
    else:
        report["timings"]["total_seconds"] = round(time.perf_counter() - t0, 1)
    return report


def search_loaded(args: SearchArguments, model, tokenizer, path=None, evaluate_models: bool = True) -> SearchOutcome:
    """The search of :func:`run_search` on an already loaded ``model`` (float32 or bfloat16, on
    the CPU) and its ``tokenizer``: calibrate, (build or reuse the level database,) search,
    evaluate. ``path`` names the model in caches and the report (default ``args.model``). The
    model is left dense; nothing is written except the checkpoint / teacher cache under
    ``args.output_dir`` and the database. ``evaluate_models=False`` skips the held-out evaluation
    (``report["results"]`` is then empty).

    Example:
        >>> outcome = search_loaded(SearchArguments(compression="depth", target=0.25), model, tok)  # doctest: +SKIP
        >>> outcome.space.compress(model, outcome.best)                                           # doctest: +SKIP
    """
    from .spaces.depth import DepthSpace

    timings: dict = {}
    out = Path(args.output_dir) if args.output_dir else None
    path = path if path is not None else args.model
    calib = calibration_windows(args.calibration, tokenizer, args.num_samples, args.seq_len, args.seed)
    eval_ids = (evaluation_windows(args.evaluation, tokenizer, args.eval_seq_len, args.eval_windows)
                if evaluate_models else None)

    eval_dtype = model.dtype
    search_dtype = fastest_dtype() if args.search_dtype == "auto" else DTYPES[args.search_dtype]
    search_model = model if search_dtype == eval_dtype else copy.deepcopy(model).to(search_dtype)
    db = None
    if args.compression == "depth":
        space = DepthSpace(search_model, args.target, args.mode)

        def make_space(m):
            return space if m is search_model else DepthSpace(m, args.target, args.mode)

        cfg = args.search_config().resolve_generations(space.level_space.num_units, 2 * space.num_drop)
    else:
        db, space, make_space, timings["database_seconds"] = _layerwise_setup(
            args, path, model, search_model, calib, args.progress)
        cfg = args.search_config()

    # Teacher cache (persisted in the output folder so a resumed run does not recompute it).
    start = time.perf_counter()
    manifest = {"model": str(path), "config": _config_hash(model), "windows": _hash_tensor(calib),
                "mode": args.fitness, "top_k": args.top_k, "dtype": str(search_dtype)}
    teacher = TeacherCache.load(out / "cache" / "teacher", manifest) if out else None
    if teacher is None:
        teacher = TeacherCache.build(search_model, calib, args.fitness, args.top_k, progress=args.progress)
        if out:
            teacher.save(out / "cache" / "teacher", manifest)
    timings["teacher_seconds"] = time.perf_counter() - start
    objective = KLObjective(search_model, calib, teacher, space, reuse_prefix=args.reuse_prefix)

    # Baselines, in the same code path (same space, same objective).
    start = time.perf_counter()
    if args.compression == "depth":
        baselines = _depth_baselines(space, search_model, calib)
    else:
        baselines = _layerwise_baselines(args, space, objective, calib)
    notes = {k: baselines.pop(k) for k in [k for k in baselines if k.endswith("_setting")]}
    timings["baseline_seconds"] = time.perf_counter() - start
    heuristics = list(dict.fromkeys(baselines.values()))  # deduplicated, in order
    reference = next(iter(baselines.values()))
    randoms = space_random(space, reference, args.random_candidates, args.seed + 1)
    if args.compare_baselines or args.init == "random":
        start = time.perf_counter()
        named = {f"random_{i}": c for i, c in enumerate(randoms)}
        best, _ = _best_by_kl(objective, named, calib, cfg.init_tokens, args.seed + 2, args.progress,
                              "Best-of-N random baseline")
        baselines[f"random_best_of_{args.random_candidates}"] = named[best]
        timings["random_baseline_seconds"] = time.perf_counter() - start

    initial = heuristics if args.init == "baselines" else randoms
    engine = EvolutionarySearch(space.level_space, objective, cfg, checkpoint_dir=out / "checkpoint" if out else None,
                                progress=args.progress)
    objective.reset_stats()
    start = time.perf_counter()
    result = engine.run(initial)
    timings["search_seconds"] = time.perf_counter() - start
    best = result.best
    search_stats = objective.stats()
    space.restore(search_model)
    del objective, teacher

    # Evaluation on held-out text, in eval dtype.
    eval_space = make_space(model)
    eval_space.restore(model)
    rows = {}
    if evaluate_models:
        eval_teacher = TeacherCache.build(model, eval_ids, "topk", args.top_k, progress=False)
        rows["dense"] = evaluate(model, eval_ids, eval_teacher, progress=args.progress, desc="Evaluating dense")
        to_eval = {"evopress": best, **(baselines if args.compare_baselines else {})}
        for name, cand in to_eval.items():
            eval_space.apply(model, cand)
            rows[name] = evaluate(model, eval_ids, eval_teacher, progress=args.progress, desc=f"Evaluating {name}")
            rows[name].update(eval_space.describe(cand))
        eval_space.restore(model)
    total_params = sum(p.numel() for p in model.parameters())
    for r in rows.values():
        r.setdefault("parameters", total_params)

    description = eval_space.describe(best)
    report = {
        "model": str(path),
        "compression": args.compression,
        "arguments": args.to_dict(),
        "search_config": cfg.to_dict(),
        "search_dtype": str(search_dtype).replace("torch.", ""),
        "num_layers": len(eval_space.layout) if args.compression == "depth" else None,
        "profile": description,
        "candidate": list(best),
        "initial_candidates": {name: list(c) for name, c in baselines.items()},
        "baseline_settings": notes,
        "search": {**result.to_dict(), "work": search_stats},
        "evaluation": {"text": args.to_dict()["evaluation"], "windows": int(eval_ids.shape[0]),
                       "seq_len": args.eval_seq_len, "dtype": str(eval_dtype).replace("torch.", "")}
        if evaluate_models else None,
        "results": rows,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    if db is not None:
        report["database"] = {"path": str(db.root), "bytes_per_weight": db.bytes_per_weight(),
                              "disk_bytes": sum(f.stat().st_size for f in db.root.rglob("*") if f.is_file()),
                              "build_seconds": db.manifest.get("build_seconds")}
        report["levels"] = eval_space.profile(best)
    return SearchOutcome(report, best, eval_space, db, result.history)


def space_random(space, reference, n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [random_candidate(space.level_space, reference, rng) for _ in range(n)]


def _budget_text(report: dict, r: dict) -> str:
    kind = report.get("compression", "depth")
    if kind == "quantization":
        return f"{r['average_bits']:.2f} bit" if "average_bits" in r else "16 bit"
    if kind == "sparsity":
        return f"{r['sparsity']:.1%}" if "sparsity" in r else "0%"
    return f"{r.get('dropped_sub_blocks', 0)} dropped"


def format_table(report: dict) -> str:
    """Before/after table of a report: perplexity, KL, parameters / budget and time."""
    rows = report["results"]
    times = report["timings"]
    lines = [f"{'model':<24} {'ppl':>10} {'KL':>8} {'params (M)':>11} {'budget':>12}", "-" * 69]
    for name, r in rows.items():
        kl = f"{r['kl']:.4f}" if "kl" in r else "-"
        lines.append(f"{name:<24} {r['perplexity']:>10.2f} {kl:>8} {r['parameters'] / 1e6:>11.1f} "
                     f"{_budget_text(report, r):>12}")
    lines.append("-" * 69)
    lines.append(
        f"search {times.get('search_seconds', 0):.0f} s ({report['search']['generations']} generations, "
        f"{report['search']['tokens'] / 1e6:.2f}M candidate-tokens), teacher {times.get('teacher_seconds', 0):.0f} s"
        + (f", database {times['database_seconds']:.0f} s" if "database_seconds" in times else "")
        + f", total {times.get('total_seconds', 0):.0f} s"
    )
    p = report["profile"]
    if "dropped_attention" in p:
        lines.append(f"dropped attention: {p['dropped_attention']}")
        lines.append(f"dropped MLP:       {p['dropped_mlp']}")
    return "\n".join(lines)
