"""Mixed-bitwidth quantization: a GPTQ bit width per linear, under an exact average-bits budget.

Levels are GPTQ quantizations of every searched linear at each bit width (group size, symmetric
or asymmetric grids, act-order, damping and the clipping search as in transformers'
``GPTQConfig``), stored packed in the level database. The compressed model holds every searched
linear as a packed `EvoPressQuantLinear` at its own bit width.

Examples:
    >>> from optimum_evo import SearchArguments
    >>> args = SearchArguments(compression="quantization", target=2.5, levels=[2, 3, 4])
    >>> args.levels
    [2, 3, 4]
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..compressors.packed_linear import EvoPressQuantLinear
from .registry import register_method
from .base import MERGE_REFUSED, CompressedModelError
from .layerwise import DatabaseMethod, DatabaseSpace, _stages

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)


class QuantizationSpace(DatabaseSpace):
    """Mixed-bitwidth quantization: budget = average bits over the searched linears.

    Units are grouped by size (number of weights) and switches stay inside a group, so the average
    is exact for every candidate. Non-integer targets (2.25, 2.5, 3.5) mix the two bracketing bit
    widths inside each group.
    """

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


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class QuantizationMethod(DatabaseMethod):
    """Mixed-bitwidth GPTQ quantization (see the module docstring)."""

    name = "quantization"
    description = "mixed-bitwidth GPTQ quantization (per-layer bit widths, packed)"
    target_help = "average bits per weight"
    packs_weights = True
    merge_rule = MERGE_REFUSED
    codec = "quantization"
    level_label = "bits"
    budget_key = "average_bits"
    presets = {
        **DatabaseMethod.presets,
        "paper": dict(generations=150, offspring=128, stages=_stages((16, 2048), (4, 16384), (1, 131072)),
                      init_tokens=131072),
    }

    def validate(self, args) -> None:
        levels = args.levels if args.levels is not None else DEFAULT_BITS
        try:
            levels = sorted(int(b) for b in levels)
        except (TypeError, ValueError):
            raise ValueError(f"levels must be distinct bit widths in 1..8, got {args.levels!r}.") from None
        if not all(1 <= b <= 8 for b in levels) or len(set(levels)) != len(levels) or not levels:
            raise ValueError(f"levels must be distinct bit widths in 1..8, got {tuple(levels)}.")
        args.levels = levels
        if not levels[0] <= args.target <= levels[-1]:
            raise ValueError(f"target must be an average bit width within the levels {tuple(levels)} (e.g. 3.0 or "
                             f"2.5), got {args.target!r}.")
        if isinstance(args.group_size, bool) or not isinstance(args.group_size, int) or args.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = one group per row), got {args.group_size!r}.")
        for name in ("sym", "desc_act"):
            if not isinstance(getattr(args, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(args, name)!r}.")
        if isinstance(args.damp_percent, bool) or not isinstance(args.damp_percent, (int, float)) \
                or not 0 < args.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1) (GPTQ's damping, a fraction of the mean Hessian "
                             f"diagonal; 0.01 by default), got {args.damp_percent!r}.")
        if isinstance(args.mse, bool) or not isinstance(args.mse, (int, float)) or args.mse < 0:
            raise ValueError(f"mse must be >= 0 (the p of the clipping search's p-norm, e.g. 2.4; 0 = min-max "
                             f"scales), got {args.mse!r}.")

    def database_request(self, args, model) -> tuple:
        settings = {"group_size": args.group_size, "sym": args.sym, "mse": float(args.mse),
                    "act_order": args.desc_act, "damp": float(args.damp_percent)}
        return list(args.levels), settings, {}

    def make_space(self, run, model) -> QuantizationSpace:
        return QuantizationSpace(model, run.database, run.args.target)

    @torch.no_grad()
    def materialize(self, model, space: QuantizationSpace, candidate) -> dict:
        profile = apply_levels(model, space.profile(candidate), space.db)
        described = space.describe(candidate)
        profile.update({k: described[k] for k in ("average_bits", "effective_bits")})
        return profile

    def build_skeleton(self, model, profile: dict) -> None:
        group_size, act_order = profile["group_size"], profile.get("act_order", False)
        for name, bits in profile["modules"].items():
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                raise CompressedModelError(f"The EvoPress profile names {name!r}, which this model does not have.") \
                    from None
            if not isinstance(linear, nn.Linear):
                raise CompressedModelError(f"The EvoPress profile names {name!r}, a {type(linear).__name__}, not a "
                                           "linear.")
            dtype = linear.weight.dtype if linear.weight is not None else None
            _set_submodule(model, name, EvoPressQuantLinear(
                linear.in_features, linear.out_features, int(bits), group_size, bias=linear.bias is not None,
                act_order=act_order, device="meta", dtype=dtype))

    def verify(self, model, profile: dict) -> None:
        for name, bits in profile.get("modules", {}).items():
            module = model.get_submodule(name)
            module = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # under LoRA
            if not isinstance(module, EvoPressQuantLinear) or module.bits != int(bits):
                raise CompressedModelError(f"{name} should be a {bits}-bit EvoPressQuantLinear, found {module!r}.")
            if module.scales.device.type == "meta" or not bool(module.scales.abs().sum() > 0):
                raise CompressedModelError(f"The packed weights of {name} were not loaded (missing from the "
                                           "checkpoint?).")

    def card_rows(self, record: dict) -> list:
        return [("bit widths searched", f"{record.get('levels')}, group size "
                                        f"{(record.get('profile') or {}).get('group_size')}")]

    def budget_text(self, row: dict) -> str:
        return f"{row['average_bits']:.2f} bit" if "average_bits" in row else "16 bit"


@torch.no_grad()
def apply_levels(model, levels: dict, db) -> dict:
    """Replace the linears named in ``levels`` (``{module name: bits}``) by packed
    `EvoPressQuantLinear` layers holding the database's codes; returns the profile recorded
    in the checkpoint (``modules`` and the grid settings)."""
    settings = db.manifest["settings"]
    group_size = settings.get("group_size") or 0
    act_order = bool(settings.get("act_order", False))
    for name, bits in levels.items():
        linear = model.get_submodule(name)
        bias = linear.bias.detach() if linear.bias is not None else None
        _set_submodule(model, name, EvoPressQuantLinear.from_packed(
            db.tensors(name, int(bits)), linear.in_features, linear.out_features, int(bits), group_size,
            bias=bias, act_order=act_order, device=linear.weight.device, dtype=linear.weight.dtype))
    return {"modules": {n: int(b) for n, b in levels.items()}, "group_size": group_size, "act_order": act_order}


register_method(QuantizationMethod())
