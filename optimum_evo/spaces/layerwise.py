"""Search spaces over precompressed linear layers (a level database): quantization and sparsity.

A candidate picks one database level per searched linear; applying it swaps only the weights whose
level changed (decoded levels are kept in RAM after first use, ``cache=True``).

Example:
    >>> db = LevelDatabase.open_or_build("db", model, windows, "quantization", [2, 3, 4, 5, 6, 8])  # doctest: +SKIP
    >>> space = QuantizationSpace(model, db, target_bits=3.0)                                     # doctest: +SKIP
    >>> space.apply(model, space.uniform())                                                       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math

import torch

from ..modeling import find_decoder_layout
from ..search import LevelSpace


def _levels_identity(db, unit_levels) -> str:
    """Hash of the level values and of the database's identity (model, calibration, settings)."""
    manifest = getattr(db, "manifest", None) or {}
    identity = {k: v for k, v in manifest.items() if k not in ("modules", "bytes_per_weight", "build_seconds")}
    payload = json.dumps([[[float(x) for x in lv] for lv in unit_levels], identity], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class DatabaseSpace:
    """Units = linears of a level database; level ``j`` of unit ``i`` = ``unit_levels[i][j]``."""

    kind = "layerwise"

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
        for i, idx in enumerate(cand):
            if self._current[i] != idx:
                self.modules[i].weight.copy_(self.weight(i, idx))
                self._current[i] = idx

    @torch.no_grad()
    def restore(self, model) -> None:
        """Put the dense weights back."""
        for i, m in enumerate(self.modules):
            if self._current[i] is not None:
                m.weight.copy_(self._dense[i])
                self._current[i] = None

    def profile(self, cand) -> dict:
        return {name: self.unit_levels[i][idx] for i, (name, idx) in enumerate(zip(self.names, cand))}


class QuantizationSpace(DatabaseSpace):
    """Mixed-bitwidth quantization: budget = average bits over the searched linears.

    Units are grouped by size (number of weights) and switches stay inside a group, so the average
    is exact for every candidate. Non-integer targets (2.25, 2.5, 3.5) mix the two bracketing bit
    widths inside each group.
    """

    kind = "quantization"

    def __init__(self, model, db, target_bits: float, cache: bool = True):
        bits = sorted(int(b) for b in db.levels)
        if not bits[0] <= target_bits <= bits[-1]:
            raise ValueError(f"target_bits={target_bits} is outside the database's bit widths {bits}.")
        self.bits, self.target = bits, float(target_bits)
        names = list(db.modules)
        sizes = [math.prod(db.modules[n]["shape"]) for n in names]
        size_ids = {s: g for g, s in enumerate(sorted(set(sizes)))}
        costs = tuple(b - a for a, b in zip(bits, bits[1:]))
        super().__init__(model, db, [bits] * len(names), [size_ids[s] for s in sizes], (costs,) * len(names), cache)

    def uniform(self) -> tuple:
        """A candidate whose average is the target: inside each size group, ``round(target * n)``
        bits spread over the two bit widths bracketing the target (exact when achievable)."""
        lo = max(i for i, b in enumerate(self.bits) if b <= self.target)
        hi = min(i for i, b in enumerate(self.bits) if b >= self.target)
        cand = [lo] * self.level_space.num_units
        if hi != lo:
            span = self.bits[hi] - self.bits[lo]
            for g in set(self.level_space.groups):
                members = [i for i, gi in enumerate(self.level_space.groups) if gi == g]
                extra = round((self.target - self.bits[lo]) * len(members) / span)
                for k, i in enumerate(members):
                    # spread the higher bit width evenly over depth
                    if math.floor((k + 1) * extra / len(members)) > math.floor(k * extra / len(members)):
                        cand[i] = hi
        return tuple(cand)

    def average_bits(self, cand) -> float:
        total = sum(self.numel)
        return sum(n * self.bits[idx] for n, idx in zip(self.numel, cand)) / total

    def describe(self, cand) -> dict:
        bpw = self.db.bytes_per_weight()
        total = sum(self.numel)
        effective = sum(n * 8 * bpw[str(self.bits[idx])] for n, idx in zip(self.numel, cand)) / total
        return {"average_bits": self.average_bits(cand), "effective_bits": effective,
                "bits": {b: sum(1 for idx in cand if self.bits[idx] == b) for b in self.bits}}


class SparsitySpace(DatabaseSpace):
    """Unstructured sparsity with levels spaced by a fixed number of weights.

    Level offset ``j`` of a layer with ``n`` weights prunes ``round(target * n) + j * step``
    weights, so any candidate whose offsets sum to zero has exactly the uniform model's number of
    zeros. Layers too small for a step (e.g. grouped-query k/v projections) get fewer levels.
    """

    kind = "sparsity"

    @staticmethod
    def level_fractions(numel: int, target: float, step: int, max_offset: int) -> list:
        base = round(target * numel)
        out = []
        for j in range(-max_offset, max_offset + 1):
            k = base + j * step
            if 0 <= k < numel:
                out.append(k / numel)
        return out

    def __init__(self, model, db, target: float, step: int, max_offset: int, cache: bool = True):
        self.target, self.step, self.max_offset = target, step, max_offset
        names = list(db.modules)
        unit_levels, self._centers = [], []
        for n in names:
            numel = math.prod(db.modules[n]["shape"])
            expected = self.level_fractions(numel, target, step, max_offset)
            stored = db.module_levels(n)
            counts = [round(x * numel) for x in stored]
            if counts != [round(x * numel) for x in expected]:
                raise ValueError(f"The sparsity database levels of {n!r} do not match target={target}, step={step}; "
                                 "rebuild it with these settings.")
            unit_levels.append(stored)
            self._centers.append(counts.index(round(target * numel)))
        super().__init__(model, db, unit_levels, [0] * len(names), None, cache)

    def uniform(self) -> tuple:
        return tuple(self._centers)

    def pruned_weights(self, cand) -> int:
        return sum(round(self.unit_levels[i][idx] * self.numel[i]) for i, idx in enumerate(cand))

    def describe(self, cand) -> dict:
        return {"sparsity": self.pruned_weights(cand) / sum(self.numel),
                "min_layer_sparsity": min(self.unit_levels[i][idx] for i, idx in enumerate(cand)),
                "max_layer_sparsity": max(self.unit_levels[i][idx] for i, idx in enumerate(cand))}


# --------------------------------------------------------------------------- baselines
def knapsack(costs: list, errors: list, budget: int) -> list:
    """Exact-budget dynamic programming: choose one option per unit (``costs[i][j]`` >= 0 integer,
    ``errors[i][j]``) so that the costs sum to exactly ``budget`` with the least total error.
    Returns the chosen option index per unit; ``ValueError`` if the budget cannot be met."""
    import numpy as np

    inf = np.inf
    dp = np.full(budget + 1, inf)
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
        raise ValueError("No assignment meets the budget exactly.")
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
    errors = [[space.db.error(n, lv) for lv in space.unit_levels[i]] for i, n in enumerate(space.names)]
    start = space.uniform()
    out = list(start)
    # One knapsack per switch group, so the result has the search space's exact budget (for
    # quantization: the same average bits inside every group of equal-size layers).
    for g in sorted(set(space.level_space.groups), key=str):
        members = [i for i, gi in enumerate(space.level_space.groups) if gi == g]
        costs = [[space.level_space.cost(i, j) for j in range(len(space.unit_levels[i]))] for i in members]
        budget = sum(space.level_space.cost(i, start[i]) for i in members)
        for i, j in zip(members, knapsack(costs, [errors[i] for i in members], budget)):
            out[i] = j
    return tuple(out)


def _outlier_ratios(space: DatabaseSpace, m: float, layers: tuple) -> list:
    """Per decoder block, the fraction of ``|W| * ||x||`` above ``m`` times its mean (cached per
    space, since the OWL grid asks for the same ``m`` with several lambdas)."""
    cache = space.__dict__.setdefault("_outlier_ratio_cache", {})
    if (m, layers) not in cache:
        ratios = []
        for layer in range(max(layers) + 1):
            metric = torch.cat([
                (space._dense[i].float().abs() * space.db.act_norm(n).float().unsqueeze(0)).flatten()
                for i, n in enumerate(space.names) if layers[i] == layer
            ])
            ratios.append(float((metric > m * metric.mean()).float().mean()))
        cache[(m, layers)] = ratios
    return cache[(m, layers)]


def owl_candidate(space: "SparsitySpace", lam: float, m: float, layer_of_unit=None) -> tuple:
    """OWL (Yin et al. 2024): blocks with more outliers (``|W| * ||x||`` above ``m`` times its mean)
    get lower sparsity, spread over ``target +- lam``; mapped to the nearest level and repaired to
    the exact budget."""
    layers = space.layer_of_unit if layer_of_unit is None else layer_of_unit
    r = torch.tensor(_outlier_ratios(space, m, tuple(layers)))
    spread = r.max() - r.min()
    r = (r - r.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(r)
    layer_sparsity = space.target - (r - r.mean())  # more outliers -> less sparsity
    cand = []
    for i, levels in enumerate(space.unit_levels):
        want = float(layer_sparsity[layers[i]])
        cand.append(min(range(len(levels)), key=lambda j: abs(levels[j] - want)))
    # repair to the exact budget: sum of level indices equals the uniform candidate's
    excess = sum(cand) - sum(space.uniform())
    while excess != 0:
        d = 1 if excess > 0 else -1  # move units down (less sparse) when over budget
        movable = [i for i in range(len(cand)) if 0 <= cand[i] - d < len(space.unit_levels[i])]
        i = max(movable, key=lambda i: d * (space.unit_levels[i][cand[i]] - float(layer_sparsity[layers[i]])))
        cand[i] -= d
        excess -= d
    return tuple(cand)
