"""Unstructured sparsity: a SparseGPT sparsity level per linear, under an exact global sparsity.

Levels are spaced by a fixed number of weights around the target, so every candidate whose level
offsets sum to zero prunes exactly the uniform model's number of weights. Baselines: uniform, the
DP over per-layer errors, and OWL (outlier-weighted layer-wise sparsity, best of a grid of its two
settings by calibration KL). The compressed model keeps plain linears holding exact zeros.

Examples:
    >>> SparsitySpace.level_fractions(numel=1000, target=0.5, step=100, max_offset=2)
    [0.3, 0.4, 0.5, 0.6, 0.7]
"""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

from ..compressors.calibrate import linear_modules
from ..compressors.sparse_linear import EvoPressSparseLinear, compact_tensors
from ..decoder import find_decoder_layout
from ..fitness import best_by_kl
from .registry import register_method
from .base import MERGE_MASKED, CompressedModelError
from .layerwise import DatabaseMethod, DatabaseSpace, _stages


class SparsitySpace(DatabaseSpace):
    """Unstructured sparsity with levels spaced by a fixed number of weights.

    Level offset ``j`` of a layer with ``n`` weights prunes ``round(target * n) + j * step``
    weights, so any candidate whose offsets sum to zero has exactly the uniform model's number of
    zeros. Layers too small for a step (e.g. grouped-query k/v projections) get fewer levels.
    """

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


def owl_candidate(space: SparsitySpace, lam: float, m: float, layer_of_unit=None) -> tuple:
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


class SparsityMethod(DatabaseMethod):
    """Unstructured SparseGPT sparsity (see the module docstring)."""

    name = "sparsity"
    description = "unstructured sparsity (SparseGPT levels, per-layer sparsity)"
    target_help = "fraction of weights pruned"
    merge_rule = MERGE_MASKED
    codec = "sparsity"
    level_label = "sparsity"
    budget_key = "sparsity"
    presets = {
        **DatabaseMethod.presets,
        "paper": dict(generations=400, offspring=64, stages=_stages((8, 2048), (2, 16384), (1, 65536)),
                      init_tokens=65536),
    }

    def validate(self, args) -> None:
        if not 0 < args.target < 1:
            raise ValueError(f"target must be a fraction in (0, 1) of the weights to prune (e.g. 0.5), got "
                             f"{args.target!r}.")
        if not 0 < args.sparsity_step < 1 or isinstance(args.max_offset, bool) or not isinstance(
                args.max_offset, int) or args.max_offset < 1:
            raise ValueError("sparsity_step must be in (0, 1) and max_offset >= 1.")
        if isinstance(args.damp_percent, bool) or not isinstance(args.damp_percent, (int, float)) \
                or not 0 < args.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1) (SparseGPT's damping, a fraction of the mean Hessian "
                             f"diagonal; 0.01 by default), got {args.damp_percent!r}.")

    def database_level_bytes(self, args) -> list:
        # a bitmask and the kept float16 values per level, levels around the target
        return [1 / 8 + 2 * (1 - args.target)] * (2 * args.max_offset + 1)

    def database_request(self, args, model) -> tuple:
        layout = find_decoder_layout(model)
        sizes = [m.weight.numel() for layer in layout.layers for m in linear_modules(layer).values()]
        step = max(1, round(args.sparsity_step * statistics.median(sizes)))
        target, max_offset = args.target, args.max_offset

        def levels(name, shape):
            return SparsitySpace.level_fractions(shape[0] * shape[1], target, step, max_offset)

        identity = {"sparsity_levels": {"target": target, "step": step, "max_offset": max_offset}}
        return levels, {"damp": float(args.damp_percent)}, identity

    def make_space(self, run, model) -> SparsitySpace:
        info = run.database.manifest["sparsity_levels"]
        return SparsitySpace(model, run.database, run.args.target, info["step"], info["max_offset"])

    def baselines(self, run) -> tuple:
        baselines, notes = super().baselines(run)
        space = run.space
        grid = {f"owl(lambda={lam},M={m})": owl_candidate(space, lam, m)
                for lam in (0.02, 0.05, 0.08, 0.1, 0.15, 0.2) for m in (3, 5, 7, 10)}
        first_name = {}
        for name, cand in grid.items():  # identical profiles from different settings: score once
            first_name.setdefault(cand, name)
        grid = {name: cand for cand, name in first_name.items()}
        best, _ = best_by_kl(run.objective, grid, 2048, run.args.seed + 3, run.args.progress, "OWL grid")
        baselines["owl"] = grid[best]
        notes["owl_setting"] = best
        return baselines, notes

    @torch.no_grad()
    def materialize(self, model, space: SparsitySpace, candidate) -> dict:
        levels = space.profile(candidate)
        for name, level in levels.items():
            linear = model.get_submodule(name)
            linear.weight.copy_(space.db.weight(name, level, dtype=linear.weight.dtype).to(linear.weight.device))
        kept = {n: int(model.get_submodule(n).weight.count_nonzero()) for n in levels}
        # kept: non-zero weights per module; a checkpoint stores these modules as bitmask + values
        return {"modules": {n: float(v) for n, v in levels.items()},
                "sparsity": space.describe(candidate)["sparsity"], "kept": kept}

    def checkpoint_tensors(self, model, profile: dict, state_dict: dict) -> dict:
        out = dict(state_dict)
        for name in profile.get("kept", {}):
            weight = out.pop(f"{name}.weight")
            out.update({f"{name}.{k}": v for k, v in compact_tensors(weight).items()})
        return out

    def build_skeleton(self, model, profile: dict) -> None:
        for name, kept in profile.get("kept", {}).items():
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise CompressedModelError(f"The EvoPress profile names {name!r}, a {type(linear).__name__}, not a "
                                           "linear.")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, EvoPressSparseLinear(
                linear.in_features, linear.out_features, kept, bias=linear.bias is not None, device="meta",
                dtype=linear.weight.dtype if linear.weight is not None else None))

    def after_load(self, model, profile: dict) -> None:
        for name in profile.get("kept", {}):
            model.get_submodule(name).densify()

    def verify(self, model, profile: dict) -> None:
        for name, level in profile.get("modules", {}).items():
            module = model.get_submodule(name)
            module = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # under LoRA
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
                raise CompressedModelError(f"The weights of {name} were not loaded (missing from the checkpoint?).")
            zeros, expected = int((weight == 0).sum()), round(float(level) * weight.numel())
            if zeros < expected:
                raise CompressedModelError(f"{name} should have {expected} zero weights ({float(level):.1%}), found "
                                           f"{zeros}.")

    def budget_text(self, row: dict) -> str:
        return f"{row['sparsity']:.1%}" if "sparsity" in row else "0%"

    def plot_level(self, level) -> tuple:
        return 16 * (1 - float(level)), f"{1 - float(level):.0%}"  # kept weights, on the scale of bits

    # ------------------------------------------------------------------ joint search
    def joint_target(self, args):
        return 0.5  # levels around half of every linear's weights pruned

    def level_bytes(self, db, name, level, module, dtype) -> int:
        from ..compressors.packing import packed_bytes

        numel = module.out_features * module.in_features
        itemsize = torch.empty((), dtype=dtype).element_size()
        bias = module.out_features * itemsize if module.bias is not None else 0
        return packed_bytes(numel, 1) + (numel - round(float(level) * numel)) * itemsize + bias

    @torch.no_grad()
    def joint_materialize(self, model, levels: dict, db) -> dict:
        for name, level in levels.items():
            linear = model.get_submodule(name)
            linear.weight.copy_(db.weight(name, level, dtype=linear.weight.dtype).to(linear.weight.device))
        kept = {n: int(model.get_submodule(n).weight.count_nonzero()) for n in levels}
        numel = sum(model.get_submodule(n).weight.numel() for n in levels)
        return {"modules": {n: float(v) for n, v in levels.items()}, "kept": kept,
                "sparsity": 1 - sum(kept.values()) / numel if numel else 0.0}

    def timing_module(self, db, module, level, dtype):
        # in memory a sparse linear is dense (compressors.sparse_linear): it computes at the dense speed
        return nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                         dtype=dtype).requires_grad_(False)


register_method(SparsityMethod())
