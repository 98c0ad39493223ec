"""Joint search: depth, sparsity and bit widths together under one size or speed budget.

``compression=["depth", "quantization"]`` (or any two or three of the built-in kinds) searches one
space whose units are the attention and MLP sub-blocks of every decoder layer (kept or dropped)
and the searched linears inside them (a level of each linear kind: a bit width and group size of
the quantization database, a sparsity of the sparsity database). A dropped sub-block makes the
levels of its linears irrelevant: they cost nothing and do nothing. The budget is in user units:

* ``target_size``: bytes of the compressed model's weights as stored in its checkpoint (codes,
  scales, zero-points, masks, values, embeddings and head in the saved dtype): ``"60MB"``,
  ``"57MiB"``, a number of bytes, or a fraction of the dense model's size (``0.25`` or ``"25%"``);
* ``target_speedup``: decode latency, ``dense latency / target_speedup``, from a `LatencyTable`
  measured once on this machine with the deployed runtime.

Each linear keeps only its levels that are worth their cost: a level is dropped when another
level of its kind, or the dense linear, costs no more and has a lower reconstruction error (from
the databases); levels of different kinds are not ranked by their errors (the fitness does), and
of levels of equal cost the one with the lower error stays, so costs rise strictly along a
unit's levels. The engine's `BudgetSpace` keeps every
candidate within the budget and full (nothing more fits). Baselines at the same budget: uniform
levels (the two bit widths that bracket what the budget allows, spread over depth), every
level of the other linear kinds that fits on every linear (e.g. all at 50% + 4 bits), the
dynamic-programming allocation of the database errors, ShortGPT-ranked drops of 10/20/30% of the
sub-blocks with uniform levels on the rest, for each level of the linears (dense included) the
fewest ShortGPT-ranked drops with which every kept linear at that level fits (``dense``: the
depth-only heuristic), and best-of-N random candidates. The search starts from the best of them,
so a budget that only depth serves well starts where depth-only would.

Examples:
    >>> from optimum_evo import SearchArguments
    >>> args = SearchArguments(compression=["depth", "quantization"], target_size="60MB")
    >>> args.compression
    'depth+quantization'
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import re
import time
from pathlib import Path

import torch

from ..decoder import find_decoder_layout
from ..search import BudgetSpace, Stage
from ..utils import parse_size
from .base import CompressionMethod
from .registry import get_method, register_combiner

logger = logging.getLogger(__name__)

__all__ = ["JointMethod", "JointSpace", "parse_size", "stored_bytes"]

#: the option of a linear left dense (its kind and level)
DENSE = "dense"
#: DROP_FRACTIONS: the sub-block fractions of the "depth + uniform" baselines
DROP_FRACTIONS = (0.1, 0.2, 0.3)


def stored_bytes(tensors) -> int:
    """Bytes of ``tensors`` as safetensors stores them (tensors sharing storage counted once)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _params_bytes(module) -> int:
    return stored_bytes(list(module.state_dict().values()))


def _linear_methods(kinds) -> list:
    return [get_method(k) for k in kinds if getattr(get_method(k), "joint_role", None) == "linears"]


def _block_method(kinds):
    blocks = [get_method(k) for k in kinds if getattr(get_method(k), "joint_role", None) == "blocks"]
    return blocks[0] if blocks else None


# --------------------------------------------------------------------------- the space
class JointSpace:
    """Sub-blocks and linears of ``model`` under one budget (see the module docstring).

    Args:
        model: the model the space switches (search or evaluation model).
        kinds: the kinds searched together.
        databases: ``{kind: LevelDatabase}`` of the linear kinds.
        costs: the `CostModel` (computed once per run, on the evaluation model).
        cache: keep decoded levels in memory after first use.
    """

    def __init__(self, model, kinds, databases: dict, costs: "CostModel", cache: bool = True):
        self.kinds, self.databases, self.costs = tuple(kinds), databases, costs
        block = _block_method(kinds)
        self.depth = block.joint_block_space(model) if block is not None else None
        self.layout = find_decoder_layout(model)
        self.names = list(costs.linear_names)
        self.modules = [model.get_submodule(n) for n in self.names]
        self.options = costs.options  # per linear: [(kind, level), ...] in cost order
        self.primary_kind = _linear_methods(kinds)[0].name  # the uniform baselines' levels
        self.num_layers = n_layers = len(self.layout)
        self.num_blocks = 2 * n_layers if self.depth is not None else 0
        block_names = [f"{self.layout.path}.{i}.{sub}" for i in range(n_layers)
                       for sub in (self.layout.attn_name, self.layout.mlp_name)] if self.depth is not None else []
        self.layer_of_unit = [i // 2 for i in range(self.num_blocks)] + list(costs.linear_layers)
        self.level_space = costs.budget_space(block_names)
        self._dense = [m.weight.detach().clone() for m in self.modules]
        self._current = [None] * len(self.names)
        self._cache: dict = {} if cache else None

    # ------------------------------------------------------------------ reading candidates
    def linear_unit(self, j: int) -> int:
        return self.num_blocks + j

    def is_active(self, cand, j: int) -> bool:
        return self.level_space.active(cand, self.linear_unit(j))

    def option(self, cand, j: int) -> tuple:
        """``(kind, level)`` of linear ``j`` in ``cand``."""
        return self.options[j][cand[self.linear_unit(j)]]

    def depth_candidate(self, cand) -> tuple:
        """The depth part in `DepthSpace`'s convention (1 = dropped)."""
        return tuple(1 - int(x) for x in cand[: self.num_blocks])

    def dropped(self, cand) -> dict:
        if self.depth is None:
            return {"attention": [], "mlp": []}
        return self.depth.drops(self.depth_candidate(cand))

    def profile(self, cand) -> dict:
        """``{unit name: {"kind", "level"}}``: every sub-block (kept / dropped) and every active linear."""
        out = {}
        for u in range(self.num_blocks):
            out[self.level_space.unit_names[u]] = {"kind": "depth", "level": "kept" if cand[u] else "dropped"}
        for j, name in enumerate(self.names):
            if self.is_active(cand, j):
                kind, level = self.option(cand, j)
                out[name] = {"kind": kind, "level": level}
        return out

    # ------------------------------------------------------------------ switching the model
    def _weight(self, j: int, index: int) -> torch.Tensor:
        if self.options[j][index][0] == DENSE:
            return self._dense[j]
        key = (j, index)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        kind, level = self.options[j][index]
        w = self.databases[kind].weight(self.names[j], level, dtype=self.modules[j].weight.dtype)
        if self._cache is not None:
            self._cache[key] = w
        return w

    @torch.no_grad()
    def apply(self, model, cand) -> None:
        """Make ``model`` compute ``cand`` (sub-blocks swapped, active linears' levels loaded)."""
        if self.depth is not None:
            self.depth.apply(model, self.depth_candidate(cand))
        for j, module in enumerate(self.modules):
            if not self.is_active(cand, j):
                continue
            index = cand[self.linear_unit(j)]
            if self._current[j] != index:
                module.weight.copy_(self._weight(j, index))
                self._current[j] = index

    @torch.no_grad()
    def restore(self, model) -> None:
        if self.depth is not None:
            self.depth.restore(model)
        for j, module in enumerate(self.modules):
            if self._current[j] is not None:
                module.weight.copy_(self._dense[j])
                self._current[j] = None

    # ------------------------------------------------------------------ figures
    def describe(self, cand) -> dict:
        d = self.dropped(cand)
        levels: dict = {}
        for j in range(len(self.names)):
            if self.is_active(cand, j):
                kind, level = self.option(cand, j)
                levels.setdefault(kind, {})
                levels[kind][str(level)] = levels[kind].get(str(level), 0) + 1
        size = self.costs.size_bytes(cand)
        linear_bytes = self.costs.linear_size_bytes(cand)
        params = self.costs.dense_parameters - (self.depth.dropped_parameters(self.depth_candidate(cand))
                                                if self.depth is not None else 0)
        out = {"size_bytes": size, "size_fraction": size / self.costs.dense_bytes, "parameters": params,
               "linear_bits_per_weight": 8 * linear_bytes / self.costs.linear_numel,
               "dropped_attention": d["attention"], "dropped_mlp": d["mlp"],
               "dropped_sub_blocks": len(d["attention"]) + len(d["mlp"]),
               "linears_per_level": {k: dict(sorted(v.items())) for k, v in levels.items()}}
        if self.costs.latency is not None:
            ns = self.costs.latency_ns(cand)
            out.update({"decode_ms": ns / 1e6, "predicted_speedup": self.costs.dense_latency_ns / ns})
        return out


# --------------------------------------------------------------------------- costs
class CostModel:
    """Bytes (always) and decode latency (with a latency table) of every unit at every level, and
    the `BudgetSpace` of the chosen budget. Built once per run on the evaluation model (the
    saved dtype), so the search and the evaluation spaces are the same."""

    def __init__(self, model, kinds, databases: dict, budget: tuple, latency=None):
        self.kinds = tuple(kinds)
        self.layout = layout = find_decoder_layout(model)
        self.has_depth = _block_method(kinds) is not None
        self.latency = latency
        methods = _linear_methods(kinds)
        first = databases[methods[0].name]
        self.linear_names = [n for n in first.modules if all(n in databases[m.name].modules for m in methods)]
        prefix = layout.path + "."
        self.linear_layers, self.linear_parent = [], []
        for name in self.linear_names:
            rest = name[len(prefix):].split(".")
            layer = int(rest[0])
            self.linear_layers.append(layer)
            sub = {layout.attn_name: 0, layout.mlp_name: 1}.get(rest[1])
            self.linear_parent.append(2 * layer + sub if (self.has_depth and sub is not None) else -1)
        modules = {n: model.get_submodule(n) for n in self.linear_names}
        self.linear_numel = sum(m.weight.numel() for m in modules.values())
        dtype = next(model.parameters()).dtype
        # bytes: dense model, per layer shell, sub-block (beyond its searched linears), fixed rest
        dense_linear = {n: _params_bytes(m) for n, m in modules.items()}
        self.dense_bytes = stored_bytes(list(model.state_dict().values()))
        self.dense_parameters = sum(p.numel() for p in model.parameters())
        self.num_layers = n = len(layout)
        layer_bytes = [_params_bytes(layer) for layer in layout.layers]
        attn_bytes = [_params_bytes(getattr(layer, layout.attn_name)) for layer in layout.layers]
        mlp_bytes = [_params_bytes(getattr(layer, layout.mlp_name)) for layer in layout.layers]
        searched = [[0, 0] for _ in range(n)]
        for name, layer, parent in zip(self.linear_names, self.linear_layers, self.linear_parent):
            if parent >= 0:
                searched[layer][parent % 2] += dense_linear[name]
        if self.has_depth:
            self.block_bytes = [(attn_bytes[i] - searched[i][0], mlp_bytes[i] - searched[i][1]) for i in range(n)]
            self.shell_bytes = [layer_bytes[i] - attn_bytes[i] - mlp_bytes[i] for i in range(n)]
            self.fixed_bytes = self.dense_bytes - sum(layer_bytes)
        else:
            self.block_bytes, self.shell_bytes = [], []
            self.fixed_bytes = self.dense_bytes - sum(dense_linear.values())
        # per linear: the options worth their cost, in cost order
        by_method = {m.name: m for m in methods}
        self.options, self.option_bytes, self.option_ns, self.option_errors = [], [], [], []
        self.stand_ins = []  # per linear: {(kind, level): index of the kept option standing in for it}
        for name in self.linear_names:
            module = modules[name]
            dense_ns = latency.linears[latency_key(module, DENSE, None)] if latency is not None else 0
            raw = [(DENSE, DENSE, dense_linear[name], dense_ns, 0.0)]  # left as it is
            for kind, m in by_method.items():
                db = databases[kind]
                for level in db.module_levels(name):
                    size = m.level_bytes(db, name, level, module, dtype)
                    ns = latency.linears[latency_key(module, kind, level)] if latency is not None else 0
                    raw.append((kind, level, size, ns, db.error(name, level)))
            key = 3 if budget[0] == "latency" else 2
            kept = _worth_their_cost(raw, key)
            self.stand_ins.append({(str(r[0]), str(r[1])): max(i for i, o in enumerate(kept) if o[key] <= r[key])
                                   for r in raw})
            self.options.append([(k, lv) for k, lv, *_ in kept])
            self.option_errors.append([r[4] for r in kept])
            self.option_bytes.append([r[2] for r in kept])
            self.option_ns.append([r[3] for r in kept])
        if latency is not None:
            self.dense_linear_ns = sum(latency.linears[latency_key(m, DENSE, None)] for m in modules.values())
            self.dense_latency_ns = latency.dense_prediction_ns(n, self.dense_linear_ns)
        self.kind, value = budget
        if self.kind == "latency":
            if latency is None:
                raise ValueError("A speed budget needs a latency table.")
            self.budget = int(self.dense_latency_ns / value)
        elif self.kind == "fraction":
            self.budget = int(self.dense_bytes * value)
        else:
            self.budget = int(value)

    # ------------------------------------------------------------------ the engine's space
    def budget_space(self, block_names) -> BudgetSpace:
        lat = self.kind == "latency"
        n = self.num_layers
        costs, parents, shared = [], [], []
        if self.has_depth:
            for i in range(n):
                if lat:
                    costs += [(0, self.latency.attention_ns), (0, self.latency.mlp_ns)]
                else:
                    costs += [(0, self.block_bytes[i][0]), (0, self.block_bytes[i][1])]
                parents += [-1, -1]
                shared.append(((2 * i, 2 * i + 1), self.latency.layer_ns if lat else self.shell_bytes[i]))
            fixed = self.latency.fixed_ns if lat else self.fixed_bytes
        else:
            fixed = (self.latency.fixed_ns + n * (self.latency.layer_ns + self.latency.attention_ns
                                                  + self.latency.mlp_ns)) if lat else self.fixed_bytes
        costs += [tuple(c) for c in (self.option_ns if lat else self.option_bytes)]
        parents += list(self.linear_parent)
        meaning = hashlib.sha256(json.dumps([self.kinds, [[list(map(str, o)) for o in opts] for opts in self.options]])
                                 .encode()).hexdigest()[:16]
        space = BudgetSpace(tuple(block_names) + tuple(self.linear_names), tuple(costs), self.budget, tuple(parents),
                            tuple(shared), fixed, meaning=meaning)
        if space.fixed_cost > self.budget:
            unit = "ns" if lat else "bytes"
            what = "embeddings, head and norms" if self.has_depth else \
                "everything but the searched linears (search depth too to go lower)"
            raise ValueError(f"The budget ({self.budget} {unit}) is below what every candidate pays "
                             f"({space.fixed_cost} {unit}: {what}); raise it.")
        return space

    # ------------------------------------------------------------------ figures
    def _active_linears(self, cand):
        nb = 2 * self.num_layers if self.has_depth else 0
        for j, parent in enumerate(self.linear_parent):
            if parent < 0 or cand[parent] > 0:
                yield j, cand[nb + j]

    def linear_size_bytes(self, cand) -> int:
        return sum(self.option_bytes[j][lv] for j, lv in self._active_linears(cand))

    def size_bytes(self, cand) -> int:
        """Bytes the saved checkpoint's tensors take for ``cand``."""
        total = self.fixed_bytes + self.linear_size_bytes(cand)
        if self.has_depth:
            for i in range(self.num_layers):
                a, m = cand[2 * i], cand[2 * i + 1]
                total += a * self.block_bytes[i][0] + m * self.block_bytes[i][1]
                total += self.shell_bytes[i] if (a or m) else 0
        return total

    def latency_ns(self, cand) -> int:
        lat, n = self.latency, self.num_layers
        total = sum(self.option_ns[j][lv] for j, lv in self._active_linears(cand))
        if not self.has_depth:
            return total + lat.fixed_ns + n * (lat.layer_ns + lat.attention_ns + lat.mlp_ns)
        total += lat.fixed_ns
        for i in range(n):
            a, m = cand[2 * i], cand[2 * i + 1]
            total += a * lat.attention_ns + m * lat.mlp_ns + (lat.layer_ns if (a or m) else 0)
        return total


def _worth_their_cost(options: list, key: int) -> list:
    """The options (tuples: kind first, cost at ``key``, error last) worth their cost, ordered by
    increasing cost: an option is dropped when an option of its own kind, or the dense one, costs
    no more and has a lower error. Options of different kinds are not compared by their errors
    (per-linear errors do not rank them: a 50% + 4-bit level has the higher error than a 3-bit one
    in most linears and makes the better model); of options of equal cost, the one with the lower
    error stays, so costs rise strictly along the levels."""
    def beats(r, o):
        return r is not o and (r[0] == o[0] or r[0] == DENSE) and r[key] <= o[key] and \
            (r[-1] < o[-1] or (r[-1] == o[-1] and r[key] < o[key]))

    front = sorted((o for o in options if not any(beats(r, o) for r in options)), key=lambda o: (o[key], o[-1]))
    kept = []
    for o in front:
        if not kept or o[key] != kept[-1][key]:
            kept.append(o)
    return kept


def latency_key(module, kind: str, level) -> str:
    """Key of a linear's latency entry: shape, bias, kind and level."""
    bias = "+bias" if getattr(module, "bias", None) is not None else ""
    return f"{module.in_features}x{module.out_features}{bias}/{kind}" + ("" if level is None else f"/{level}")


# --------------------------------------------------------------------------- latency measurement
def _decode_sample(model, ids: torch.Tensor, steps: int) -> float:
    """One timed sample: the cache filled with ``ids`` (not timed), then ``steps`` decode steps;
    nanoseconds per step."""
    out = model(input_ids=ids, use_cache=True)
    cache, nxt = out.cache, ids[:, -1:]
    start = time.perf_counter_ns()
    for _ in range(steps):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache = out.cache
    return (time.perf_counter_ns() - start) / steps


def _decode_ns_each(configs: dict, context: int, steps: int = 8, repeats: int = 5) -> dict:
    """Median time of one decode step after ``context`` tokens for each of ``configs`` (name ->
    ``(model, setup)``; ``setup()``, when given, is called before each of its samples), sampled in
    interleaved rounds (a first round warms up and is not counted)."""
    import statistics

    names = list(configs)
    vocab = min(min(1000, m.config.vocab_size) for m, _ in configs.values())
    ids = torch.randint(10, vocab, (1, context))
    samples = {name: [] for name in names}
    with torch.inference_mode():
        for r in range(repeats + 1):
            for name in names[r % len(names):] + names[:r % len(names)]:
                model, setup = configs[name]
                if setup is not None:
                    setup()
                sample = _decode_sample(model, ids, steps)
                if r:
                    samples[name].append(sample)
    return {name: int(statistics.median(v)) for name, v in samples.items()}


def _decode_ns(model, context: int, steps: int = 8, repeats: int = 5) -> int:
    """Median time of one decode step after ``context`` tokens (each sample re-fills the cache)."""
    return _decode_ns_each({0: (model, None)}, context, steps, repeats)[0]


def _linear_runner(make, in_features: int, dtype, budget_bytes: int = 96 * 2 ** 20):
    """``(run, n)``: ``run()`` makes one decode-step call of each of ``n`` copies of the layer
    ``make()`` builds, weights cold as in a model (enough copies are cycled to exceed the caches)."""
    first = make()
    size = max(1, stored_bytes(list(first.state_dict().values())))
    copies = [first] + [make() for _ in range(min(63, budget_bytes // size))]
    x = torch.randn(1, 1, in_features, dtype=dtype)

    def run():
        for m in copies:
            m(x)

    return run, len(copies)


def measure_latency(model, kinds, databases: dict, names: list, context: int, progress: bool = True,
                    only: "list | None" = None) -> dict:
    """The entries of a `LatencyTable` for ``model`` (see `optimum_evo.latency`); with ``only`` (a
    list of kinds), the linears of those kinds and each shape's dense layer, without the decode steps."""
    from tqdm.auto import tqdm

    block = _block_method(kinds)
    methods = [m for m in _linear_methods(kinds) if only is None or m.name in only]
    dtype = next(model.parameters()).dtype
    layout = find_decoder_layout(model)
    jobs = {}
    for name in names:
        module = model.get_submodule(name)
        jobs.setdefault(latency_key(module, DENSE, None), (module, DENSE, None))
        for m in methods:
            for level in databases[m.name].module_levels(name):
                jobs.setdefault(latency_key(module, m.name, level), (module, m, level))
    from ..latency import LatencyTable, time_calls

    shapes = {}  # one shape's dense layer and levels are timed together, interleaved
    for key, (module, m, level) in jobs.items():
        shapes.setdefault(latency_key(module, DENSE, None), {})[key] = (module, m, level)
    linears = {}
    bar = tqdm(total=len(jobs), desc="Timing linears", disable=not progress)
    for group in shapes.values():
        runners = {}
        for key, (module, m, level) in group.items():
            if m == DENSE:
                def make(module=module):
                    layer = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                            dtype=dtype)
                    return layer.requires_grad_(False)
            else:
                def make(module=module, m=m, level=level):
                    return m.timing_module(databases[m.name], module, level, dtype)
            runners[key] = _linear_runner(make, module.in_features, dtype)
        with torch.inference_mode():
            times = time_calls({key: run for key, (run, _) in runners.items()}, min_seconds=0.05)
        linears.update({key: times[key] // runners[key][1] for key in group})
        del runners
        bar.update(len(group))
    bar.close()
    if only is not None:
        return {"linears": linears}
    n = len(layout)
    work = copy.deepcopy(model).eval()
    depth = (block or get_method("depth")).joint_block_space(work)
    per_layer = [[0, 0] for _ in range(n)]
    for name in names:
        module = model.get_submodule(name)
        rest = name[len(layout.path) + 1:].split(".")
        sub = {layout.attn_name: 0, layout.mlp_name: 1}.get(rest[1])
        if sub is not None:
            per_layer[int(rest[0])][sub] += linears[latency_key(module, DENSE, None)]
    from .depth import remove_layers

    bare = copy.deepcopy(work)
    remove_layers(bare, list(range(n)))

    def dropping(attention: int, mlp: int):  # DepthSpace candidates: 1 drops the sub-block
        cand = (attention, mlp) * n
        return lambda: depth.apply(work, cand)

    configs = {"dense": (work, dropping(0, 0)), "shell": (work, dropping(1, 1)),
               "attention": (work, dropping(0, 1)), "mlp": (work, dropping(1, 0)), "none": (bare, None)}
    if progress:
        logger.info("Timing decode steps (%d configurations, interleaved).", len(configs))
    steps = _decode_ns_each(configs, context)
    depth.restore(work)
    dense_ns, shell_ns, attn_ns, mlp_ns, none_ns = (steps[k] for k in ("dense", "shell", "attention", "mlp", "none"))
    attn_linears = sum(p[0] for p in per_layer) / n
    mlp_linears = sum(p[1] for p in per_layer) / n
    entries = {"linears": linears, "fixed_ns": none_ns, "layer_ns": max(0, int((shell_ns - none_ns) / n)),
               "attention_ns": max(0, int((attn_ns - shell_ns) / n - attn_linears)),
               "mlp_ns": max(0, int((mlp_ns - shell_ns) / n - mlp_linears)), "dense_ns": dense_ns}
    pieces = LatencyTable(manifest={}, **entries).dense_prediction_ns(n, sum(map(sum, per_layer)))
    if abs(pieces - dense_ns) > 0.1 * dense_ns:
        logger.warning("The latency table's pieces add up to %.1f ms for the dense model, whose decode step measured "
                       "%.1f ms: the machine was busy or changed speed while it was timed, so predicted speed-ups are "
                       "off by about that much. Rebuild it on a quiet machine: delete its folder (latency_dir, or "
                       "the shared cache named in the report) and run again.", pieces / 1e6, dense_ns / 1e6)
    return entries


# --------------------------------------------------------------------------- baselines
def _uniform(space: JointSpace, cand: list, rng: random.Random):
    """``cand`` (depth part set) with every active linear at the same level value, the highest
    that fits, then the next value spread evenly over depth while it fits; ``None`` when even the
    lowest does not fit."""
    ls = space.level_space
    values = _shared_values(space) or [-math.inf]  # none shared: every linear at its cheapest option
    best = None
    for v in values:
        trial = _all_at(space, cand, lambda j, v=v: _index_at_most(space, j, v))
        if ls.cost(trial) <= ls.budget:
            best = (v, trial)
    if best is None:
        return None
    v, trial = best
    higher = [x for x in values if x > v]
    if higher:
        active = [j for j in range(len(space.names)) if ls.active(trial, space.linear_unit(j))]
        k = len(active)
        order = [active[(i * 7919) % k] for i in range(k)] if k and math.gcd(7919, k) == 1 else active
        for j in order:  # an even spread over depth: a stride through the units
            u = space.linear_unit(j)
            up = list(trial)
            up[u] = _index_at_most(space, j, higher[0])
            if ls.cost(up) <= ls.budget:
                trial = up
    return tuple(ls.fill(trial, rng))  # a full candidate comes back as it is


def _other_uniforms(space: JointSpace, cand: list, rng: random.Random) -> list:
    """``(label, candidate)`` for every level of the other linear kinds that every linear offers
    (e.g. ``sparse-quantization:50%+4``): ``cand`` (depth part set) with every active linear at it
    (or at the best option no costlier, where its own space dropped it), filled, when it fits."""
    ls = space.level_space
    skip = (DENSE, space.primary_kind)
    common = None
    for keys in space.costs.stand_ins:
        mine = {k for k in keys if k[0] not in skip}
        common = mine if common is None else common & mine
    out = []
    for kind, level in sorted(common or []):
        trial = _all_at(space, cand, lambda j, k=(kind, level): space.costs.stand_ins[j][k])
        if ls.cost(trial) <= ls.budget:
            out.append((f"{kind}:{level}", tuple(ls.fill(trial, rng))))
    return out


def _level_picks(space: JointSpace) -> list:
    """``(label, pick)`` for every shared level value of the first linear kind and for dense:
    ``pick(j)`` is linear ``j``'s option index at that level (dense: its last, costliest option)."""
    kind = space.primary_kind
    picks = [(f"{kind}:{v:g}", lambda j, v=v: _index_at_most(space, j, v)) for v in _shared_values(space)]
    return picks + [(DENSE, lambda j: len(space.options[j]) - 1)]


def _all_at(space: JointSpace, cand: list, pick) -> list:
    """``cand`` (depth part set) with every active linear at option ``pick(j)``, the others off."""
    ls = space.level_space
    trial = list(cand)
    for j in range(len(space.names)):
        u = space.linear_unit(j)
        trial[u] = pick(j) if ls.active(trial, u) else 0
    return trial


def _shared_values(space: JointSpace) -> list:
    """The level values of the first linear kind every linear has (e.g. bit widths), ascending."""
    kind = space.primary_kind
    common = None
    for opts in space.options:
        vals = {lv for k, lv in opts if k == kind and not isinstance(lv, str)}
        common = vals if common is None else common & vals
    return sorted(common or [])


def _index_at_most(space: JointSpace, j: int, value) -> int:
    """Index of linear ``j``'s option of the first kind at ``value`` (or the best one below it)."""
    kind = space.primary_kind
    best = 0
    for i, (k, lv) in enumerate(space.options[j]):
        if k == kind and not isinstance(lv, str) and lv <= value:
            best = i
    return best


def _dp(space: JointSpace, cand: list, rng: random.Random, resolution: int = 4096):
    """``cand`` (depth part set) with the active linears' levels minimising the summed database
    errors within the budget (costs in 1/``resolution`` of the linears' share, rounded up)."""
    ls = space.level_space
    trial = list(cand)
    active = [j for j in range(len(space.names)) if ls.active(trial, space.linear_unit(j))]
    for j in range(len(space.names)):
        trial[space.linear_unit(j)] = 0
    base = ls.cost(trial)  # every active linear at its cheapest option
    room = ls.budget - base
    if room < 0:
        return None
    costs = [[ls.costs[space.linear_unit(j)][i] - ls.costs[space.linear_unit(j)][0]
              for i in range(len(space.options[j]))] for j in active]
    quantum = max(1, math.ceil(room / resolution))
    q_costs = [[math.ceil(c / quantum) for c in unit] for unit in costs]
    errors = [space.costs.option_errors[j] for j in active]
    from .layerwise import knapsack

    picks = knapsack(q_costs, errors, room // quantum, at_most=True)
    for j, i in zip(active, picks):
        trial[space.linear_unit(j)] = i
    return tuple(ls.fill(trial, rng))


# --------------------------------------------------------------------------- the method
def _stages(*pairs) -> tuple:
    return tuple(Stage(s, t) for s, t in pairs)


class JointMethod(CompressionMethod):
    """Several kinds searched together under a size or speed budget (see the module docstring)."""

    target_help = "a size (target_size) or decode speed-up (target_speedup) budget"
    presets = {
        "paper": dict(generations=300, offspring=64, stages=_stages((8, 2048), (2, 16384), (1, 65536)),
                      init_tokens=65536),
        "superfast": dict(generations=400, offspring=16, stages=_stages((1, 512), (1, 8192)), init_tokens=8192),
        "fast": dict(generations=80, offspring=16, stages=_stages((2, 512), (1, 4096)), init_tokens=8192),
    }

    def __init__(self, kinds: tuple):
        if not kinds:
            raise ValueError("A budget search needs at least one kind.")
        self.kinds = tuple(kinds)
        self.name = "+".join(self.kinds)
        self.single = len(self.kinds) == 1
        self.description = ("" if self.single else "joint search of ") + ", ".join(
            get_method(k).description for k in self.kinds) + (" under a size or speed budget" if self.single else "")
        linears = _linear_methods(self.kinds)
        if not linears and not self.single:
            raise ValueError(f"compression={list(self.kinds)}: a joint search needs a kind that compresses linears "
                             "(sparsity or quantization).")
        if not linears:
            raise ValueError(f"{self.kinds[0]} has no size or speed budget: give it a target "
                             f"({get_method(self.kinds[0]).target_help}), or search it together with a kind that "
                             "compresses linears (e.g. compression=['depth', 'quantization']).")
        unknown = [k for k in self.kinds if getattr(get_method(k), "joint_role", None) not in ("blocks", "linears")]
        if unknown:
            raise ValueError(f"{unknown[0]} cannot be searched jointly with other kinds.")
        self.packs_weights = any(m.packs_weights for m in linears)
        limits = [m.export_formats for m in map(get_method, self.kinds) if m.export_formats is not None]
        self.export_formats = tuple(f for f in limits[0] if all(f in x for x in limits)) if limits else None
        self.correctable = False

    # ------------------------------------------------------------------ settings
    def sub_args(self, args, method):
        """A copy of ``args`` as ``method`` alone would see them (its database settings)."""
        sub = copy.copy(args)
        sub.compression = method.name
        sub.target = method.joint_target(args)
        method.validate(sub)
        return sub

    def validate(self, args) -> None:
        if args.lora_correction:
            raise ValueError("lora_correction applies to a single sparsity or quantization search, not to a joint "
                             "search.")
        if (args.target_size is None) == (args.target_speedup is None):
            raise ValueError(f"A joint search ({self.name}) needs one budget: target_size (e.g. '60MB', or 0.25 of "
                             "the dense size) or target_speedup (e.g. 1.5 times faster decoding).")
        if args.target_size is not None:
            parse_size(args.target_size)
        if args.target_speedup is not None and (isinstance(args.target_speedup, bool) or not isinstance(
                args.target_speedup, (int, float)) or not args.target_speedup > 1):
            raise ValueError(f"target_speedup must be a number > 1 (decode this many times faster than the dense "
                             f"model), got {args.target_speedup!r}.")
        if _block_method(self.kinds) is not None and args.mode != "separate":
            raise ValueError("A joint search drops attention and MLP sub-blocks separately; leave mode='separate'.")
        for m in _linear_methods(self.kinds):
            self.sub_args(args, m)

    # ------------------------------------------------------------------ the search
    def prepare(self, run) -> None:
        from ..latency import LatencyTable, default_latency_root, machine_identity

        databases, seconds = {}, 0.0
        for m in _linear_methods(self.kinds):
            sub = copy.copy(run)
            sub.args = self.sub_args(run.args, m)
            if run.args.database_dir:
                sub.args.database_dir = str(Path(run.args.database_dir) / m.name)
            sub.timings = {}
            m.prepare(sub)
            databases[m.name] = sub.database
            seconds += sub.timings.get("database_seconds", 0.0)
        run.database = databases
        run.timings["database_seconds"] = seconds
        latency = None
        if run.args.target_speedup is not None:
            from .layerwise import config_hash

            model = run.model
            names = [n for n in next(iter(databases.values())).modules]
            # one table for every kind combination: only the levels' hashes depend on the kinds
            manifest = {"model config": config_hash(model), "dtype": str(next(model.parameters()).dtype),
                        "context": LATENCY_CONTEXT, **machine_identity(),
                        "levels": {k: hashlib.sha256(json.dumps(db.manifest.get("levels", None), default=str)
                                                     .encode()).hexdigest()[:16] for k, db in databases.items()},
                        "linears": sorted({latency_key(model.get_submodule(n), DENSE, None) for n in names})}
            root = Path(run.args.latency_dir) if run.args.latency_dir else default_latency_root(
                {"model config": manifest["model config"], "dtype": manifest["dtype"]})
            start = time.perf_counter()
            latency = LatencyTable.open_or_build(root, manifest, lambda only: measure_latency(
                model, self.kinds, databases, names, LATENCY_CONTEXT, run.args.progress, only=only),
                progress=run.args.progress)
            run.timings["latency_seconds"] = time.perf_counter() - start
            run.latency_root = root
        run.costs = CostModel(run.model, self.kinds, databases, self.budget(run.args), latency)

    @staticmethod
    def budget(args) -> tuple:
        if args.target_speedup is not None:
            return ("latency", float(args.target_speedup))
        return parse_size(args.target_size)

    def build_space(self, run, model) -> JointSpace:
        return JointSpace(model, self.kinds, run.database, run.costs)

    def baselines(self, run) -> tuple:
        space = run.space
        ls = space.level_space
        rng = random.Random(run.args.seed + 5)
        keep_all = [1] * space.num_blocks + [0] * len(space.names)
        out, notes = {}, {}
        for name, make in (("uniform", _uniform), ("dp", _dp)):
            cand = make(space, keep_all, rng)
            if cand is not None:
                out[name] = cand
        for label, cand in _other_uniforms(space, keep_all, rng):
            out.setdefault(label, cand)
        block = _block_method(self.kinds)
        if block is not None:
            n = space.num_layers
            seen = set(out.values())

            def add(label, cand):
                if cand is not None and tuple(cand) not in seen:
                    out[label] = tuple(cand)
                    seen.add(tuple(cand))

            # DepthSpace units, least important first, by each of the depth kind's rankings
            for prefix, order in block.joint_drop_orders(run, space.depth).items():

                def dropping(k, order=order):
                    cand = list(keep_all)
                    for u in [u for u in order if u % 2 == 0][:k] + [u for u in order if u % 2 == 1][:k]:
                        cand[u] = 0
                    return cand

                fits = [k for k in range(n) if _uniform(space, dropping(k), rng) is not None]
                counts = {max(1, math.floor(fraction * n)) for fraction in DROP_FRACTIONS}
                if fits and fits[0] > 0:
                    counts.add(fits[0])  # the fewest drops with which uniform levels fit the budget
                for k in sorted(counts):
                    add(f"{prefix}{round(100 * k / n)}%+uniform", _uniform(space, dropping(k), rng))
                # the depth-only heuristic and the mixes between it and the above: for each level of
                # the linears, dense included, the fewest drops with which every kept linear at it fits
                # (a level that fits with no drop is the uniform baseline's)
                for label, pick in _level_picks(space):
                    if ls.cost(_all_at(space, keep_all, pick)) <= ls.budget:
                        continue
                    for k in range(1, n + 1):
                        cand = _all_at(space, dropping(k), pick)
                        if ls.cost(cand) <= ls.budget:
                            filled = ls.fill(cand, rng)
                            add(f"{prefix}{round(100 * k / n)}%+{label}", filled)
                            if filled[:space.num_blocks] != tuple(cand[:space.num_blocks]):
                                # the slack switched sub-blocks back on at their cheapest levels, which
                                # can cost more quality than it buys: the start with the slack unspent
                                add(f"{prefix}{round(100 * k / n)}%+{label}-unfilled", cand)
                            break
        if not out:
            raise ValueError(f"No baseline fits the budget {ls.budget} (the cheapest level of every linear with no "
                             f"sub-block dropped costs {ls.cost(keep_all)}); raise the budget.")
        notes["budget"] = {"kind": run.costs.kind, "value": ls.budget,
                           "unit": "ns" if run.costs.kind == "latency" else "bytes"}
        return out, notes

    def seed_candidate(self, run, report: dict, reference) -> tuple:
        """The joint candidate of an earlier result of this joint search or of one of its kinds (a
        depth result's drops, a sparsity or quantization result's per-linear levels; the other units
        as in ``reference``), lowered (then raised) to fit the budget."""
        space = run.space
        ls = space.level_space
        compression = str(report.get("compression"))
        levels = report.get("levels") or {}
        cand = list(reference)
        if compression == self.name or (levels and all(isinstance(v, dict) and "kind" in v for v in levels.values())):
            units = dict(levels)  # a budgeted search's report (of these kinds or of one kind): units with their kind
        elif compression in self.kinds and getattr(get_method(compression), "joint_role", None) == "linears":
            units = {name: {"kind": compression, "level": level} for name, level in levels.items()}
        elif compression in self.kinds:  # the block kind: its drops, by layer index
            profile = report.get("profile") or {}
            units = {}
            for i in range(space.num_layers):
                for sub, key in ((space.layout.attn_name, "dropped_attention"), (space.layout.mlp_name, "dropped_mlp")):
                    units[f"{space.layout.path}.{i}.{sub}"] = {
                        "kind": "depth", "level": "dropped" if i in profile.get(key, []) else "kept"}
        else:
            raise ValueError(f"init_from: the report searched {compression!r}; a {self.name} search takes a result "
                             f"of {self.name} or of one of {list(self.kinds)}.")
        index = {name: u for u, name in enumerate(ls.unit_names)}
        missing = [n for n in units if n not in index]
        if missing or not units:
            raise ValueError(f"init_from: the report's units ({missing[:2] or 'none'}) are not units of this run; "
                             "seed it with a result of the same model.")
        for name, unit in units.items():
            u = index[name]
            if u < space.num_blocks:
                cand[u] = 0 if unit.get("level") == "dropped" else 1
                continue
            j = u - space.num_blocks
            key = (str(unit.get("kind")), str(unit.get("level")))
            if key not in space.costs.stand_ins[j]:
                raise ValueError(f"init_from: {name} has no level {key[1]!r} of {key[0]} in this run (its levels: "
                                 f"{[lv for _, lv in space.options[j]]}); search with the report's levels.")
            cand[u] = space.costs.stand_ins[j][key]  # the level itself, or the best one no costlier
        for u, parent in enumerate(ls.parents):  # the linears of a dropped sub-block are off
            if parent >= 0 and cand[parent] == 0:
                cand[u] = 0
        rng = random.Random(run.args.seed + 7)
        return tuple(ls.fill(cand, rng))

    def space_from_report(self, model, report: dict) -> JointSpace:
        from types import SimpleNamespace

        from ..compressors.database import LevelDatabase
        from ..latency import LatencyTable

        databases = {k: LevelDatabase.open(path, verify=False) for k, path in report["databases"].items()}
        args = SimpleNamespace(**report["arguments"])
        latency = None
        if report.get("latency_table"):
            data = json.loads(Path(report["latency_table"]).read_text())
            latency = LatencyTable.from_json(data)
        costs = CostModel(model, self.kinds, databases, self.budget(args), latency)
        return JointSpace(model, self.kinds, databases, costs)

    # ------------------------------------------------------------------ the compressed model
    @torch.no_grad()
    def materialize(self, model, space: JointSpace, candidate) -> dict:
        space.restore(model)
        layout = find_decoder_layout(model)
        units = space.profile(candidate)
        described = space.describe(candidate)
        chosen: dict = {}
        for j, name in enumerate(space.names):
            if space.is_active(candidate, j):
                kind, level = space.option(candidate, j)
                if kind != DENSE:
                    chosen.setdefault(kind, {})[name] = level
        parts = {}
        for m in _linear_methods(self.kinds):
            parts[m.name] = m.joint_materialize(model, chosen.get(m.name, {}), space.databases[m.name])
        block = _block_method(self.kinds)
        if block is not None:
            depth_part = block.materialize(model, space.depth, space.depth_candidate(candidate))
            removed = set(depth_part["removed_layers"])
            kept = [i for i in range(depth_part["original_num_layers"]) if i not in removed]
            mapping = {old: new for new, old in enumerate(kept)}
            parts = {k: _renamed(p, layout.path, mapping) for k, p in parts.items()}
            parts[block.name] = depth_part
        budget = {"budget": {"kind": space.costs.kind, "value": space.level_space.budget},
                  "size_bytes": described["size_bytes"]}
        if "decode_ms" in described:
            budget["predicted_speedup"] = described["predicted_speedup"]
        if self.single:  # the kind's own checkpoint (reloaded by that method), with the budget it met
            return {**parts[self.kinds[0]], **budget}
        return {"kinds": list(self.kinds), "parts": parts, "units": units, **budget}

    def _parts(self, profile: dict):
        parts = profile.get("parts", {})
        block = _block_method(self.kinds)
        ordered = ([block] if block is not None else []) + _linear_methods(self.kinds)
        for m in ordered:
            yield m, parts.get(m.name, {})

    def build_skeleton(self, model, profile: dict) -> None:
        for m, part in self._parts(profile):
            m.build_skeleton(model, part)

    def after_load(self, model, profile: dict) -> None:
        for m, part in self._parts(profile):
            m.after_load(model, part)

    def checkpoint_tensors(self, model, profile: dict, state_dict: dict) -> dict:
        for m, part in self._parts(profile):
            state_dict = m.checkpoint_tensors(model, part, state_dict)
        return state_dict

    def verify(self, model, profile: dict) -> None:
        for m, part in self._parts(profile):
            m.verify(model, part)

    def merge_rules(self, profile: dict) -> dict:
        rules: dict = {}
        for m, part in self._parts(profile):
            rules.update(m.merge_rules(part))
        return rules

    # ------------------------------------------------------------------ reports
    def summary(self, profile: dict) -> dict:
        out = {"kinds": " + ".join(profile.get("kinds", self.kinds))}
        if profile.get("size_bytes") is not None:
            out["stored size"] = f"{profile['size_bytes'] / 1e6:.2f} MB"
        if profile.get("predicted_speedup") is not None:
            out["predicted decode speed-up"] = f"{profile['predicted_speedup']:.2f}x"
        for m, part in self._parts(profile):
            for key, value in m.summary(part).items():
                out[f"{m.name}: {key}"] = value
        return out

    def card_rows(self, record: dict) -> list:
        budget = (record.get("profile") or {}).get("budget") or {}
        rows = [("kinds searched together", " + ".join(self.kinds))]
        if budget:
            unit = "ns of decode latency" if budget.get("kind") == "latency" else "bytes stored"
            rows.append(("budget", f"{budget.get('value')} {unit}"))
        for m in _linear_methods(self.kinds):
            rows += m.card_rows(record)
        return rows

    def budget_text(self, row: dict) -> str:
        if "size_bytes" not in row:
            return ""
        text = f"{row['size_bytes'] / 1e6:.1f} MB"
        if "predicted_speedup" in row:
            text += f", {row['predicted_speedup']:.2f}x"
        return text

    def summary_lines(self, description: dict) -> list:
        lines = [("stored size:", f"{description['size_bytes'] / 1e6:.2f} MB ({description['size_fraction']:.1%} of "
                                  f"dense; {description['linear_bits_per_weight']:.2f} bits per searched weight)")]
        if "predicted_speedup" in description:
            lines.append(("predicted decode speed-up:", f"{description['predicted_speedup']:.2f}x"))
        if description["dropped_sub_blocks"]:
            lines += [("dropped attention:", description["dropped_attention"]),
                      ("dropped MLP:", description["dropped_mlp"])]
        for kind, counts in description["linears_per_level"].items():
            lines.append((f"{kind} levels:", counts))
        return lines

    def report_extras(self, run, candidate) -> dict:
        out = {"databases": {k: str(db.root) for k, db in run.database.items()},
               "levels": run.eval_space.profile(candidate)}
        root = getattr(run, "latency_root", None)
        if root is not None:
            costs = run.costs
            out["latency_table"] = str(Path(root) / "latency.json")
            out["latency"] = {"predicted_dense_ms": costs.dense_latency_ns / 1e6,
                              "measured_dense_ms": costs.latency.dense_ns / 1e6,
                              "budget_ms": costs.budget / 1e6}
        return out

    def plot_profile(self, report: dict, path) -> None:
        from ..plotting import plot_joint_profile

        cells = {name: (16.0, "dense") if unit["kind"] == DENSE else get_method(unit["kind"]).plot_level(unit["level"])
                 for name, unit in report["levels"].items()}
        plot_joint_profile(cells, report["num_layers"], path,
                           title=f"EvoPress {self.name} profile ({self.budget_text(report['profile'])})")


#: tokens of context before the timed decode step of a latency table
LATENCY_CONTEXT = 128


def _renamed(obj, path: str, mapping: dict):
    """``obj`` with module names ``{path}.{old}.…`` (as dict keys, at any depth) renumbered."""
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.")

    def rename(key):
        if isinstance(key, str):
            match = pattern.match(key)
            if match is not None:
                return f"{path}.{mapping[int(match.group(1))]}.{key[match.end():]}"
        return key

    if isinstance(obj, dict):
        return {rename(k): _renamed(v, path, mapping) for k, v in obj.items()}
    return obj


register_combiner(JointMethod)
