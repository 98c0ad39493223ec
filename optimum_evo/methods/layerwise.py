"""What sparsity and quantization share: a search over the levels of a level database.

Every searched linear of the decoder blocks is precompressed at every level once
(`LevelDatabase`, built with a level codec); a candidate
picks one level per linear, and applying it swaps only the weights whose level changed (decoded
levels are kept in RAM after first use). `DatabaseMethod` builds or reuses the database
(keyed by model, calibration and settings), makes the spaces, computes the uniform and
dynamic-programming baselines and writes the chosen levels into the model.

Examples:
    >>> db = LevelDatabase.open_or_build("db", model, windows, "quantization", [2, 3, 4, 5, 6, 8])  # doctest: +SKIP
    >>> space = QuantizationSpace(model, db, target_bits=3.0)                                     # doctest: +SKIP
    >>> space.apply(model, space.uniform())                                                       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import torch

from ..compressors.calibrate import linear_modules
from ..compressors.database import LevelDatabase
from ..decoder import find_decoder_layout
from ..search import LevelSpace, Stage
from .base import CompressionMethod

#: The database build's measured working memory over the sum of what it holds (heap the allocator
#: keeps after the block's temporaries are freed): 1.46 on SmolLM2-135M at 32 x 512 tokens.
BUILD_OVERHEAD = 1.5


def profile_linear(model, name: str):
    """The ``nn.Linear`` at ``name`` of ``model`` that a checkpoint's profile names, or
    `CompressedModelError` saying the model has none there."""
    from .base import CompressedModelError

    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise CompressedModelError(f"The EvoPress profile names {name!r}, which this model does not have.") from None
    if not isinstance(linear, torch.nn.Linear):
        raise CompressedModelError(f"The EvoPress profile names {name!r}, a {type(linear).__name__}, not a linear.")
    return linear


def set_submodule(model, name: str, module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model`` (a compressed layer in place of a linear)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _levels_identity(db, unit_levels) -> str:
    """Hash of the level values and of the database's identity (model, calibration, settings)."""
    manifest = getattr(db, "manifest", None) or {}
    identity = {k: v for k, v in manifest.items() if k not in ("modules", "bytes_per_weight", "build_seconds")}
    payload = json.dumps([[[x if isinstance(x, str) else float(x) for x in lv] for lv in unit_levels], identity],
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class DatabaseSpace:
    """Units = linears of a level database; level ``j`` of unit ``i`` = ``unit_levels[i][j]``."""

    def __init__(self, model, db, unit_levels: list, groups: list, step_costs=None, cache: bool = True):
        self.db = db
        self.names = list(db.modules)
        if len(unit_levels) != len(self.names):
            raise ValueError("unit_levels needs one list of levels per database module.")
        self.unit_levels = unit_levels
        self.modules = [model.get_submodule(n) for n in self.names]
        layout = find_decoder_layout(model)
        prefix = layout.path + "."
        self.layer_of_unit = []
        for n in self.names:
            if not n.startswith(prefix):
                raise ValueError(f"Database module {n!r} is not inside the decoder layers {layout.path!r}.")
            self.layer_of_unit.append(int(n[len(prefix):].split(".")[0]))
        self.level_space = LevelSpace(tuple(self.names), tuple(len(lv) for lv in unit_levels), tuple(groups),
                                      step_costs, meaning=_levels_identity(db, unit_levels))
        self.numel = [m.weight.numel() for m in self.modules]
        self._dense = [m.weight.detach().clone() for m in self.modules]
        self._current = [None] * len(self.names)  # None = dense weight loaded
        self._cache: dict = {} if cache else None
        self._refined: tuple = ((), {}, {})  # (candidate, {unit: weight}, {unit: stored tensors})

    def _modules_part(self, cand) -> tuple:
        """The level index of every unit (module) in ``cand`` (spaces with extra genes override it)."""
        return tuple(cand)

    def refine(self, cand, tensors: dict) -> None:
        """Give candidate ``cand`` other stored tensors for some units (``{module name: tensors}``
        in the database's encoding, e.g. `optimum_evo.compressors.retune`'s levels):
        `apply` and `refined_tensors` use them for that candidate only, the levels stay as they are."""
        cand = self._modules_part(cand)
        index = {n: i for i, n in enumerate(self.names)}
        unknown = set(tensors) - set(index)
        if unknown:
            raise ValueError(f"refine: {sorted(unknown)[:3]} are not units of this space.")
        weights = {}
        for name, t in tensors.items():
            i = index[name]
            level = self.unit_levels[i][cand[i]]
            weights[i] = self.db.codec.decode(t, tuple(self.modules[i].weight.shape), level,
                                              self.db.manifest["settings"]).to(self.modules[i].weight.dtype)
        self._refined = (tuple(cand), weights, {index[n]: t for n, t in tensors.items()})
        # units holding earlier refined weights: reloaded by apply, still restored by restore
        self._current = ["stale" if isinstance(c, tuple) else c for c in self._current]

    def refined_tensors(self, cand) -> dict:
        """``{module name: stored tensors}`` that `refine` gave ``cand`` (empty for other candidates)."""
        if self._modules_part(cand) != self._refined[0]:
            return {}
        return {self.names[i]: t for i, t in self._refined[2].items()}

    def weight(self, unit: int, index: int) -> torch.Tensor:
        key = (unit, index)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        w = self.db.weight(self.names[unit], self.unit_levels[unit][index], dtype=self.modules[unit].weight.dtype)
        if self._cache is not None:
            self._cache[key] = w
        return w

    @torch.no_grad()
    def apply(self, model, cand) -> None:
        """Load the candidate's levels into ``model`` (only the units whose level changed)."""
        refined = self._refined[1] if tuple(cand) == self._refined[0] else {}
        for i, idx in enumerate(cand):
            key = ("refined", idx) if i in refined else idx
            if self._current[i] != key:
                self.modules[i].weight.copy_(refined[i] if i in refined else self.weight(i, idx))
                self._current[i] = key

    @torch.no_grad()
    def restore(self, model) -> None:
        """Put the dense weights back."""
        for i, m in enumerate(self.modules):
            if self._current[i] is not None:
                m.weight.copy_(self._dense[i])
                self._current[i] = None

    def profile(self, cand) -> dict:
        """``{module name: level}`` of a candidate."""
        return {name: self.unit_levels[i][idx] for i, (name, idx) in enumerate(zip(self.names, cand))}


# --------------------------------------------------------------------------- baselines
def knapsack(costs: list, errors: list, budget: int, at_most: bool = False) -> list:
    """Exact-budget dynamic programming: choose one option per unit (``costs[i][j]`` >= 0 integer,
    ``errors[i][j]``) so that the costs sum to exactly ``budget`` (with ``at_most``: to at most
    ``budget``) with the least total error. Returns the chosen option index per unit;
    ``ValueError`` if the budget cannot be met."""
    import numpy as np

    inf = np.inf
    # dp[b]: least error of the units so far at cost exactly b (at_most: at most b, so any b starts at 0)
    dp = np.zeros(budget + 1) if at_most else np.full(budget + 1, inf)
    dp[0] = 0.0
    choice = []
    for unit_costs, unit_errors in zip(costs, errors):
        new = np.full(budget + 1, inf)
        arg = np.full(budget + 1, -1, dtype=np.int16)
        for j, (c, e) in enumerate(zip(unit_costs, unit_errors)):
            if c > budget:
                continue
            cand = np.full(budget + 1, inf)
            cand[c:] = dp[: budget + 1 - c] + e
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        choice.append(arg)
    if not np.isfinite(dp[budget]):
        raise ValueError("No assignment fits the budget." if at_most else "No assignment meets the budget exactly.")
    out, b = [], budget
    for unit_costs, arg in zip(reversed(costs), reversed(choice)):
        j = int(arg[b])
        out.append(j)
        b -= unit_costs[j]
    return out[::-1]


def dp_candidate(space: DatabaseSpace) -> tuple:
    """SPDY-style baseline: minimise the sum of per-layer normalized reconstruction errors (from
    the database) under the exact budget of ``space.uniform()``, by dynamic programming (one
    knapsack per switch group)."""
    levels = space.level_space.num_levels
    if hasattr(space, "unit_errors"):  # spaces with units beyond the database's (e.g. budget reserves)
        errors = [space.unit_errors(i) for i in range(space.level_space.num_units)]
    else:
        errors = [[space.db.error(n, lv) for lv in space.unit_levels[i]] for i, n in enumerate(space.names)]
    start = space.uniform()
    out = list(start)
    # One knapsack per switch group, so the result has the search space's exact budget (for
    # quantization: the same average bits inside every group of equal-size layers).
    for g in sorted(set(space.level_space.groups), key=str):
        members = [i for i, gi in enumerate(space.level_space.groups) if gi == g]
        costs = [[space.level_space.cost(i, j) for j in range(levels[i])] for i in members]
        budget = sum(space.level_space.cost(i, start[i]) for i in members)
        for i, j in zip(members, knapsack(costs, [errors[i] for i in members], budget)):
            out[i] = j
    return tuple(out)


def _stages(*pairs) -> tuple:
    return tuple(Stage(s, t) for s, t in pairs)


def _hash_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def config_hash(model) -> str:
    """Short hash of a model's config (part of cache and database identities)."""
    return hashlib.sha256(model.config.to_json_string().encode()).hexdigest()[:16]


def weights_hash(model) -> str:
    """Short hash of a strided sample of every tensor of the model's state dict."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:: max(1, p.numel() // 4096)].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def default_database_root(kind: str, identity: dict) -> Path:
    """The shared cache folder of a database with this identity."""
    from ..embedded_models import default_cache_root

    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_root().parent / "databases" / f"{kind}-{key}"


class DatabaseMethod(CompressionMethod):
    """A method whose levels come from a level database (sparsity, quantization).

    Subclasses set ``codec`` (`codecs`), ``level_label`` (the plot's
    y axis) and implement `database_request` and `make_space`; the uniform and DP
    baselines, the database cache and the report's per-linear levels are shared.
    """

    codec: str
    level_label: str
    correctable = True
    presets = {
        "paper": {},  # set by subclasses
        "superfast": dict(generations=400, offspring=16, stages=_stages((1, 512), (1, 8192)), init_tokens=8192),
        "fast": dict(generations=60, offspring=16, stages=_stages((2, 512), (1, 4096)), init_tokens=8192),
    }

    #: in a joint search (`optimum_evo.methods.joint`) these methods own the linears' levels
    joint_role = "linears"

    def joint_target(self, args):
        """The ``target`` this method's database is built for inside a joint search."""
        raise NotImplementedError

    def level_bytes(self, db, name: str, level, module, dtype) -> int:
        """Bytes the checkpoint stores for linear ``name`` (``module``, dense) at ``level``, in ``dtype``."""
        raise NotImplementedError

    def joint_materialize(self, model, levels: dict, db) -> dict:
        """Write ``{module name: level}`` permanently into ``model``; the profile part of this method."""
        raise NotImplementedError

    def timing_module(self, db, module, level, dtype):
        """A layer computing like ``module`` at ``level`` of ``db`` (random values), for latency tables."""
        raise NotImplementedError

    def database_level_bytes(self, args) -> list:
        """Bytes per weight each level of the database of ``args`` stores (an estimate)."""
        return []

    def resource_needs(self, args, model, itemsize: int) -> list:
        from ..decoder import find_decoder_layout
        from .base import Need, host_of

        numel = sum(m.weight.numel() for layer in find_decoder_layout(model).layers for m in layer.modules()
                    if isinstance(m, torch.nn.Linear))
        per_level = self.database_level_bytes(args)
        device = None
        if args.database_device is not None:
            build_on = torch.device(args.database_device)
            model_on = next(p for p in model.parameters()).device
            if (build_on.type, build_on.index or 0) != (model_on.type, model_on.index or 0):
                device = str(build_on)
        return [Need("dense copies of the searched linears", numel * itemsize),
                Need(f"level weights (worst case: all {len(per_level)} levels of every linear)",
                     numel * itemsize * len(per_level), fix="fewer levels", device=host_of(model)),
                Need("database build (one block, its activations, one window's temporaries)",
                     self.database_build_bytes(args, model, len(per_level)), device=device,
                     fix="num_samples or seq_len (or a database already built)"),
                Need("level database", int(numel * sum(per_level)), where="disk", fix="database_dir")]

    def database_build_bytes(self, args, model, levels: int) -> int:
        """Working memory of building this run's level database (`LevelDatabase.build` walks one
        block at a time): the largest block's weights; its calibration activations in and out (one
        tensor each for all windows, plus one stream per level for builders that carry them); one
        window's temporaries (eager attention probabilities and their copies, the value Hessian's
        mixed inputs, MLP intermediates); the block's Hessians; its levels as decoded for the
        errors, with the codes; and the largest linear's GPTQ work space (inverse Hessian and
        factors, weight and error copies); times `BUILD_OVERHEAD` for what the allocator keeps of
        freed temporaries. Measured against a build: `docs/benchmarks/offload.md`."""
        layout = find_decoder_layout(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        item = next(p for p in model.parameters()).element_size()
        n, t, hidden = args.num_samples, args.seq_len, int(config.hidden_size)
        heads = int(getattr(config, "num_attention_heads", 1) or 1)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        activations = n * t * hidden * item
        _, settings, _ = self.database_request(args, model)
        codec = LevelDatabase.codec_for(self.codec)
        streams = levels if codec.needs_streams(codec.full_settings(settings)) else 0
        worst = 0
        for layer in layout.layers:
            linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
            if not linears:
                continue
            weights = sum(p.numel() * p.element_size() for p in layer.parameters())
            numel = sum(m.weight.numel() for m in linears)
            widest = max(m.out_features for m in linears)
            temporaries = t * (4 * heads * t + 4 * widest + 2 * heads * hidden) * 4
            hessians = (sum(m.in_features ** 2 for m in linears) + kv_heads * hidden ** 2) * 4
            decoded = numel * (4 + 1) * levels  # float32 weights and uint8 codes per level
            gptq = max(3 * m.in_features ** 2 + 2 * m.weight.numel() for m in linears) * 4
            worst = max(worst, weights + (2 + streams) * activations + temporaries + hessians + decoded + gptq)
        return int(BUILD_OVERHEAD * worst)

    def database_request(self, args, model) -> tuple:
        """``(levels, settings, identity)`` of the database this run needs: ``levels`` a list or a
        function ``(module name, shape) -> levels``, ``settings`` the codec's settings, ``identity``
        extra manifest entries that make a database stale when they change."""
        raise NotImplementedError

    def cache_levels(self, args) -> str:
        """The levels' part of the shared database cache's folder name (its other parts: the model,
        calibration and settings), so requests for other levels get their own folder."""
        return str(args.levels)

    def make_space(self, run, model):
        """The space over ``run.database`` bound to ``model``."""
        raise NotImplementedError

    def selected(self, args):
        """Predicate on module names from ``modules`` / ``modules_to_not_convert`` (``None``: every linear)."""
        if args.modules is None and not args.modules_to_not_convert:
            return None
        pattern = re.compile(args.modules) if args.modules is not None else None
        skip = tuple(args.modules_to_not_convert or ())

        def select(name: str) -> bool:
            return (pattern is None or pattern.search(name) is not None) and not any(s in name for s in skip)

        return select

    # ------------------------------------------------------------------ the search
    def check_selection(self, args, model) -> None:
        """Refuse, before any database work, a model or selection with no linear to compress."""
        layout = find_decoder_layout(model)
        select = self.selected(args)
        names = [f"{layout.path}.{i}.{n}" for i, layer in enumerate(layout.layers) for n in linear_modules(layer)]
        if not names:
            kinds = sorted({type(m).__name__ for m in layout.layers[0].modules() if "linear" in type(m).__name__.lower()
                            or "conv1d" in type(m).__name__.lower()})
            raise ValueError(f"{type(model).__name__}'s decoder blocks hold no torch.nn.Linear layers (found "
                             f"{kinds or 'none'}); {self.name} compresses nn.Linear layers: use compression='depth' "
                             "for this architecture.")
        if select is not None and not any(select(n) for n in names):
            raise ValueError(f"modules={args.modules!r} / modules_to_not_convert={args.modules_to_not_convert!r} "
                             f"select none of the decoder blocks' {len(names)} linear layers (e.g. {names[0]!r}).")

    def prepare(self, run) -> None:
        args, model = run.args, run.model
        self.check_selection(args, model)
        levels, settings, extra = self.database_request(args, model)
        identity = {"model": str(run.path), "config": config_hash(model), "calibration": _hash_tensor(run.calibration),
                    "weights": weights_hash(model), **extra}
        if args.modules is not None:
            identity["modules"] = args.modules
        if args.modules_to_not_convert:
            identity["modules_to_not_convert"] = list(args.modules_to_not_convert)
        codec = LevelDatabase.codec_for(self.codec)
        root = Path(args.database_dir) if args.database_dir else default_database_root(self.name, {
            **identity, "kind": codec.kind, "levels": self.cache_levels(args), "settings": codec.full_settings(settings)})
        start = time.perf_counter()
        db = LevelDatabase.open_or_build(root, model, run.calibration, codec, levels, settings, identity,
                                         modules=self.selected(args), progress=args.progress,
                                         device=args.database_device)
        if not db.modules:
            raise ValueError(f"modules={args.modules!r} / modules_to_not_convert={args.modules_to_not_convert!r} "
                             "select none of the decoder blocks' linear layers.")
        run.database = db
        run.timings["database_seconds"] = time.perf_counter() - start

    def build_space(self, run, model):
        return self.make_space(run, model)

    def baselines(self, run) -> tuple:
        return {"uniform": run.space.uniform(), "dp": dp_candidate(run.space)}, {}

    def report_extras(self, run, candidate) -> dict:
        db = run.database
        return {"database": {"path": str(db.root), "bytes_per_weight": db.bytes_per_weight(),
                             "disk_bytes": sum(f.stat().st_size for f in db.root.rglob("*") if f.is_file()),
                             "build_seconds": db.manifest.get("build_seconds"), "reused": db.reused},
                "levels": run.eval_space.profile(candidate)}

    def space_from_report(self, model, report: dict):
        from types import SimpleNamespace

        db = LevelDatabase.open(report["database"]["path"], verify=False)
        run = SimpleNamespace(args=SimpleNamespace(**report["arguments"]), database=db)
        return self.make_space(run, model)

    # ------------------------------------------------------------------ reports
    def summary(self, profile: dict) -> dict:
        modules = profile.get("modules", {})
        if not modules:
            return {}
        counts: dict = {}
        for level in modules.values():
            level = round(level, 4) if isinstance(level, float) else level
            counts[level] = counts.get(level, 0) + 1
        return {self.budget_key: profile.get(self.budget_key), "modules per level": self.sorted_counts(counts),
                "modules": len(modules)}

    def sorted_counts(self, counts: dict) -> dict:
        """``{level: number of modules}`` in the order of the levels (summaries)."""
        return dict(sorted(counts.items()))

    def plot_profile(self, report: dict, path) -> None:
        from ..plotting import plot_layer_levels

        plot_layer_levels(report["levels"], path, self.level_label,
                          title=f"EvoPress {self.name} profile (target {report['arguments']['target']})")
