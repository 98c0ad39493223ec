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
import warnings

import torch

from ..compressors.builders import available_builders, get_builder
from ..compressors.codecs import quant_level, quant_level_name, stored_bits
from ..compressors.packed_linear import EvoPressQuantLinear
from ..decoder import shared_input_groups
from .registry import register_method
from .base import MERGE_REFUSED, CompressedModelError
from ..search import LevelSpace
from .layerwise import DatabaseMethod, DatabaseSpace, _stages, profile_linear, set_submodule

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)


class QuantizationSpace(DatabaseSpace):
    """Mixed-bitwidth quantization: budget = average bits over the searched linears.

    Units are grouped by size (number of weights) and switches stay inside a group, so the average
    is exact for every candidate. Non-integer targets (2.25, 2.5, 3.5) mix the two bracketing bit
    widths inside each group.

    **Fused groups** (``fused_groups=True``, the default of a search): linears that read the same
    input tensor (`shared_input_groups`: q/k/v, gate/up) form one unit with one bit width, the
    matmul vLLM and llama.cpp run fused; such units trade bits with units of the same number of
    weights, so the average stays exact.

    **Group size as a level dimension.** When the database holds levels at several group sizes
    (``"3g64"``, see `quant_level`), a unit's levels are its ``(bits, group size)`` options
    ordered by the bits they store (codes, float16 scales and ``bits``-bit zero-points,
    `stored_bits`), and the budget is those *stored* bits: at most the stored bits of the
    uniform ``target``-bit model at the database's ``group_size`` (the reference). Costs count in
    quanta of 1/`RESOLUTION` of the reference group size's one-bit step of the unit's shape: exact
    for the reference levels, rounded up for the others (a level never costs less than it
    stores). Units of identical costs form a switch group, and every group has one *reserve*
    unit (no weights; level ``k`` holds ``k`` unspent quanta, starting at 0): a switch that frees
    quanta can always park the remainder there and a later one spend it, so bit widths and group
    sizes trade freely although their costs are not multiples of each other. Every candidate
    stores at most the uniform model's bits (the reserve and the rounding are what it leaves
    unspent); `describe` reports the exact stored bits.
    """

    #: with several group sizes, costs count in 1/RESOLUTION of a one-bit step at the reference group size
    RESOLUTION = 64
    #: capacity of a switch group's reserve, in one-bit steps of one of its units
    RESERVE_BITS = 4

    def __init__(self, model, db, target_bits: float, cache: bool = True, fused_groups: bool = False):
        self.fused = None  # with fused_groups: the linears (indices) of every search unit
        settings = db.manifest.get("settings", {})
        self.reference_group = int(settings.get("group_size") or 0)
        pairs = {lv: quant_level(lv, self.reference_group) for lv in db.levels}
        bits = sorted({b for b, g in pairs.values() if g == self.reference_group})
        if not bits:
            raise ValueError(f"The database has no level at its group size {self.reference_group}: {db.levels}.")
        if not bits[0] <= target_bits <= bits[-1]:
            raise ValueError(f"target_bits={target_bits} is outside the database's bit widths {bits}.")
        self.bits, self.target = bits, float(target_bits)
        self.pairs = pairs
        self.mixed_groups = any(g != self.reference_group for _, g in pairs.values())
        names = list(db.modules)
        self.num_modules = len(names)
        shapes = [tuple(db.modules[n]["shape"]) for n in names]
        if not self.mixed_groups:
            # one group size: levels are bit widths, a step costs its bits per weight (exact average bits)
            levels = sorted(db.levels, key=lambda lv: pairs[lv][0])
            sizes = [math.prod(s) for s in shapes]
            size_ids = {s: g for g, s in enumerate(sorted(set(sizes)))}
            costs = tuple(pairs[b][0] - pairs[a][0] for a, b in zip(levels, levels[1:]))
            super().__init__(model, db, [list(levels)] * len(names), [size_ids[s] for s in sizes],
                             (costs,) * len(names), cache)
            if fused_groups:
                self._fuse(shared_input_groups(model, names), costs)
            return
        if fused_groups:
            warnings.warn("fused_groups applies to one group size: with group_sizes every linear has its own "
                          "level (an export for vLLM then needs equal levels inside q/k/v and gate/up).",
                          stacklevel=2)
        unit_levels, step_costs, keys = [], [], []
        b0 = bits[0]
        for shape in shapes:
            anchor = stored_bits(b0, self.reference_group, shape)
            unit = stored_bits(b0 + 1, self.reference_group, shape) - anchor
            by_cost: dict = {}
            for lv, (b, g) in pairs.items():
                true = stored_bits(b, g, shape)
                c = -((anchor - true) * self.RESOLUTION // unit)  # ceil: never cheaper than stored
                if c not in by_cost or stored_bits(*pairs[by_cost[c]], shape) < true:
                    by_cost[c] = lv  # equal cost: the level that stores more
            ordered = sorted(by_cost.items())
            unit_levels.append([lv for _, lv in ordered])
            step_costs.append(tuple(b[0] - a[0] for a, b in zip(ordered, ordered[1:])))
            keys.append(unit)  # units whose quantum holds the same number of stored bits
        key_ids = {k: g for g, k in enumerate(dict.fromkeys(keys))}
        groups = [key_ids[k] for k in keys]
        super().__init__(model, db, unit_levels, groups, tuple(step_costs), cache)
        # one reserve unit per switch group, after the linears
        reserve = self.RESOLUTION * self.RESERVE_BITS
        self.quantum = {key_ids[k]: k / self.RESOLUTION for k in key_ids}  # stored bits per quantum
        ls = self.level_space
        self.level_space = LevelSpace(
            ls.unit_names + tuple(f"reserve/{g}" for g in key_ids.values()),
            ls.num_levels + (reserve + 1,) * len(key_ids), ls.groups + tuple(key_ids.values()),
            ls.step_costs + ((1,) * reserve,) * len(key_ids), meaning=ls.meaning)
        last = max(self.layer_of_unit)
        self.layer_of_unit = list(self.layer_of_unit) + [last] * len(key_ids)

    # ------------------------------------------------------------------ fused groups
    def _fuse(self, groups: list, costs: tuple) -> None:
        """Search units = ``groups`` of linears (one level for all of them); switch groups = fused
        units of equal size, so a switch keeps the stored code bits exactly."""
        ls = self.level_space
        self.fused = [tuple(g) for g in groups]
        sizes = [sum(self.numel[i] for i in g) for g in self.fused]
        size_ids = {n: k for k, n in enumerate(sorted(set(sizes)))}

        def name(g):
            first = self.names[g[0]]
            return "+".join([first] + [self.names[i].rpartition(".")[2] for i in g[1:]])

        self.level_space = LevelSpace(tuple(name(g) for g in self.fused), tuple(ls.num_levels[g[0]] for g in self.fused),
                                      tuple(size_ids[n] for n in sizes), (costs,) * len(self.fused),
                                      meaning=f"{ls.meaning}/fused")
        self.layer_of_unit = [self.layer_of_unit[g[0]] for g in self.fused]

    def _search_units(self) -> int:
        """Search units that hold linears (the reserves of mixed group sizes come after them)."""
        return len(self.fused) if self.fused is not None else self.num_modules

    def _first_module(self, unit: int) -> int:
        return self.fused[unit][0] if self.fused is not None else unit

    # ------------------------------------------------------------------ reserve units
    def _modules_part(self, cand) -> tuple:
        """The level index of every linear (database module) of a search candidate."""
        if self.fused is None:
            return tuple(cand)[: self.num_modules]
        out = [0] * self.num_modules
        for unit, members in enumerate(self.fused):
            for i in members:
                out[i] = cand[unit]
        return tuple(out)

    def apply(self, model, cand) -> None:
        super().apply(model, self._modules_part(cand))

    def profile(self, cand) -> dict:
        return super().profile(self._modules_part(cand))

    def unit_errors(self, unit: int) -> list:
        """Per-level normalized errors of a unit (the reserve's levels cost nothing in error)."""
        if unit >= self._search_units():
            return [0.0] * self.level_space.num_levels[unit]
        members = self.fused[unit] if self.fused is not None else (unit,)
        return [sum(self.db.error(self.names[i], lv) for i in members) for lv in self.unit_levels[members[0]]]

    def _reference_index(self, unit: int, bits: int) -> int:
        for j, lv in enumerate(self.unit_levels[unit]):
            if self.pairs[lv] == (bits, self.reference_group):
                return j
        # a level of equal cost stood in for it (e.g. group size >= the columns)
        shape = tuple(self.db.modules[self.names[unit]]["shape"])
        want = stored_bits(bits, self.reference_group, shape)
        return next(j for j, lv in enumerate(self.unit_levels[unit]) if stored_bits(*self.pairs[lv], shape) >= want)

    def uniform(self) -> tuple:
        """A candidate whose average is the target at the reference group size: inside each
        switch group, ``round(target * n)`` bits spread over the two bit widths bracketing the target
        (exact when achievable); reserves empty."""
        lo = max(b for b in self.bits if b <= self.target)
        hi = min(b for b in self.bits if b >= self.target)
        n = self._search_units()
        cand = [self._reference_index(self._first_module(i), lo) for i in range(n)]
        if hi != lo:
            groups = self.level_space.groups[:n]
            for g in sorted(set(groups), key=str):
                members = [i for i, gi in enumerate(groups) if gi == g]
                extra = round((self.target - lo) * len(members) / (hi - lo))
                for k, i in enumerate(members):
                    # spread the higher bit width evenly over depth
                    if math.floor((k + 1) * extra / len(members)) > math.floor(k * extra / len(members)):
                        cand[i] = self._reference_index(self._first_module(i), hi)
        return tuple(cand) + (0,) * (self.level_space.num_units - n)

    def level_pair(self, unit: int, index: int) -> tuple:
        """``(bits, group size)`` of level ``index`` of ``unit``."""
        return self.pairs[self.unit_levels[unit][index]]

    def average_bits(self, cand) -> float:
        """Average code bits per weight (scales and zeros not counted)."""
        total = sum(self.numel)
        return sum(n * self.level_pair(i, idx)[0]
                   for i, (n, idx) in enumerate(zip(self.numel, self._modules_part(cand)))) / total

    def effective_bits(self, cand) -> float:
        """Stored bits per weight: codes, float16 scales and zero-points (`stored_bits`)."""
        total = sum(self.numel)
        return sum(stored_bits(*self.level_pair(i, idx), self.db.modules[self.names[i]]["shape"])
                   for i, idx in enumerate(self._modules_part(cand))) / total

    def describe(self, cand) -> dict:
        modules = self._modules_part(cand)
        out = {"average_bits": self.average_bits(cand), "effective_bits": self.effective_bits(cand),
               "bits": {b: sum(1 for i, idx in enumerate(modules) if self.level_pair(i, idx)[0] == b) for b in
                        sorted({b for b, _ in self.pairs.values()})}}
        if self.mixed_groups:
            counts: dict = {}
            for i, idx in enumerate(modules):
                label = profile_level(*self.level_pair(i, idx), self.reference_group)
                counts[label] = counts.get(label, 0) + 1
            out["levels"] = dict(sorted(counts.items(), key=lambda kv: quant_level(kv[0], self.reference_group)))
            reserve = sum(self.quantum[self.level_space.groups[u]] * cand[u]
                          for u in range(self.num_modules, self.level_space.num_units))
            out["unspent_bits_per_weight"] = reserve / sum(self.numel)
        return out


def profile_level(bits: int, group_size: int, reference_group: int):
    """How a module's level is written in the checkpoint profile: its bit width at the profile's
    ``group_size``, else ``"BITSgGROUP"`` (e.g. ``"3g64"``)."""
    return quant_level_name(bits, group_size, reference_group)


class QuantizationMethod(DatabaseMethod):
    """Mixed-bitwidth GPTQ quantization (see the module docstring)."""

    name = "quantization"
    description = "mixed-bitwidth GPTQ quantization (per-layer bit widths, packed)"
    target_help = "average bits per weight"
    packs_weights = True
    refinable = True
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
        builder = getattr(args, "builder", "gptq")
        if builder not in available_builders():
            raise ValueError(f"builder must be one of {available_builders()} (how the levels are made), got "
                             f"{builder!r}.")
        iters = getattr(args, "builder_iters", None)
        if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 0):
            raise ValueError(f"builder_iters must be a non-negative integer (None: the builder's default), got "
                             f"{iters!r}.")
        groups = getattr(args, "group_sizes", None)
        if groups is not None:
            if isinstance(groups, (str, int)) or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0
                                                         for g in groups) or len(set(groups)) != len(groups):
                raise ValueError(f"group_sizes must be distinct group sizes >= 0 (0 = one group per row), e.g. "
                                 f"[64, 128], got {groups!r}.")
            args.group_sizes = sorted(set(groups) | {args.group_size})
        if args.desc_act and groups is not None and len(args.group_sizes) > 1:
            raise ValueError("desc_act (act-order) is not supported with several group_sizes.")
        stream = getattr(args, "builder_stream", "level") or "level"
        if stream not in ("level", "target", "dense"):
            try:
                ref = quant_level(stream, args.group_size)
            except ValueError:
                ref = None
            built = {(b, g) for b in levels for g in (getattr(args, "group_sizes", None) or [args.group_size])}
            if ref not in built:
                raise ValueError(f"builder_stream must be 'level', 'target', 'dense' or one of the built levels "
                                 f"{sorted(built)} (e.g. '3'), got {stream!r}.")
        if args.desc_act and builder in ("signround",):
            raise ValueError("desc_act (act-order) is a GPTQ option; the signround builder keeps columns in order.")

    @staticmethod
    def builder_stream(args) -> str:
        """The codec's ``stream`` setting: ``target`` resolves to the built bit width nearest the
        target (the lower on a tie) at the reference group size."""
        stream = str(getattr(args, "builder_stream", "level") or "level")
        if not get_builder(getattr(args, "builder", "gptq")).streams:
            return "level"  # builders on the dense activations read no stream: one database, whatever was asked
        if stream == "target":
            bits = min(args.levels or DEFAULT_BITS, key=lambda b: (abs(b - float(args.target)), b))
            return str(bits)
        return stream

    def database_level_bytes(self, args) -> list:
        out = []
        for g in (getattr(args, "group_sizes", None) or [args.group_size]):
            for b in args.levels or DEFAULT_BITS:
                out.append(b / 8 + ((2 + b / 8) / g if g else 0.0))  # codes, float16 scale and zero per group
        return out

    def database_request(self, args, model) -> tuple:
        settings = {"group_size": args.group_size, "sym": args.sym, "mse": float(args.mse),
                    "act_order": args.desc_act, "damp": float(args.damp_percent),
                    "builder": getattr(args, "builder", "gptq"), "iters": getattr(args, "builder_iters", None),
                    "stream": self.builder_stream(args)}
        groups = getattr(args, "group_sizes", None) or [args.group_size]
        levels = [quant_level_name(b, g, args.group_size) for b in args.levels for g in sorted(groups)]
        return levels, settings, {}

    def make_space(self, run, model) -> QuantizationSpace:
        # reports written before fused groups existed searched every linear on its own
        return QuantizationSpace(model, run.database, run.args.target,
                                 fused_groups=bool(getattr(run.args, "fused_groups", False)))

    def refine(self, run) -> dict:
        """``retune=True``: make the found levels again in one pass of the database's builder on the
        found model's own calibration activations (`optimum_evo.compressors.retune`); the
        evaluation, the saved model and the exports then hold the re-tuned codes."""
        if not getattr(run.args, "retune", False):
            return {}
        import time

        from ..compressors.retune import retune

        db, space = run.database, run.eval_space
        start = time.perf_counter()
        tuned = retune(run.model, run.calibration, space.profile(run.best), db.manifest["settings"],
                       progress=run.args.progress)
        space.refine(run.best, {name: db.codec.encode(q) for name, q in tuned.items()})
        return {"retune": {"builder": db.manifest["settings"]["builder"], "modules": len(tuned),
                           "seconds": round(time.perf_counter() - start, 1)}}

    @torch.no_grad()
    def materialize(self, model, space: QuantizationSpace, candidate) -> dict:
        profile = apply_levels(model, space.profile(candidate), space.db, space.refined_tensors(candidate))
        described = space.describe(candidate)
        profile.update({k: described[k] for k in ("average_bits", "effective_bits")})
        return profile

    def build_skeleton(self, model, profile: dict) -> None:
        reference, act_order = profile["group_size"], profile.get("act_order", False)
        for name, level in profile["modules"].items():
            bits, group_size = quant_level(level, reference)
            linear = profile_linear(model, name)
            dtype = linear.weight.dtype if linear.weight is not None else None
            set_submodule(model, name, EvoPressQuantLinear(
                linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None,
                act_order=act_order, device="meta", dtype=dtype, layout=profile.get("qweight_layout", "planes")))

    def verify(self, model, profile: dict) -> None:
        for name, level in profile.get("modules", {}).items():
            bits, group_size = quant_level(level, profile.get("group_size"))
            module = model.get_submodule(name)
            module = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # under LoRA
            if not isinstance(module, EvoPressQuantLinear) or module.bits != bits or \
                    module.group_size != (group_size or module.in_features):
                raise CompressedModelError(f"{name} should be a {bits}-bit EvoPressQuantLinear with group size "
                                           f"{group_size}, found {module!r}.")
            if module.scales.device.type == "meta" or not bool(module.scales.abs().sum() > 0):
                raise CompressedModelError(f"The packed weights of {name} were not loaded (missing from the "
                                           "checkpoint?).")

    def card_rows(self, record: dict) -> list:
        groups = record.get("group_sizes") or [(record.get("profile") or {}).get("group_size")]
        rows = [("bit widths searched", f"{record.get('levels')}, group size{'s' if len(groups) > 1 else ''} "
                                        f"{', '.join(str(g) for g in groups)}")]
        if record.get("builder"):
            stream = record.get("builder_stream") or "level"
            how = "" if stream == "level" or record.get("builder") == "gptq" else \
                f", tuned on {'the dense activations' if stream == 'dense' else f'the shared stream of level {stream}'}"
            rows.append(("levels made by", f"{record.get('builder')}{how}"))
        if record.get("retune"):
            rows.append(("levels re-tuned", f"after the search, one {record.get('builder')} pass on this model's own "
                                            "calibration activations"))
        return rows

    def summary(self, profile: dict) -> dict:
        modules = profile.get("modules", {})
        if not modules:
            return {}
        reference = profile.get("group_size")
        counts: dict = {}
        for level in modules.values():
            counts[level] = counts.get(level, 0) + 1
        ordered = dict(sorted(counts.items(), key=lambda kv: quant_level(kv[0], reference)))
        out = {"average_bits": profile.get("average_bits"), "modules per level": ordered, "modules": len(modules)}
        if profile.get("effective_bits") is not None:
            out["effective_bits"] = profile["effective_bits"]
        return out

    def budget_text(self, row: dict) -> str:
        return f"{row['average_bits']:.2f} bit" if "average_bits" in row else "16 bit"

    def plot_level(self, level) -> tuple:
        return float(str(level).split("g")[0]), str(level)

    # ------------------------------------------------------------------ joint search
    def joint_target(self, args):
        return min(args.levels) if args.levels else min(DEFAULT_BITS)

    def _joint_layer(self, db, level, module, dtype, device):
        settings = db.manifest["settings"]
        bits, group_size = quant_level(level, settings.get("group_size") or 0)
        return EvoPressQuantLinear(module.in_features, module.out_features, bits, group_size,
                                   bias=module.bias is not None, act_order=bool(settings.get("act_order", False)),
                                   device=device, dtype=dtype, layout="planes")

    def level_bytes(self, db, name, level, module, dtype) -> int:
        layer = self._joint_layer(db, level, module, dtype, "meta")
        return sum(t.numel() * t.element_size() for t in layer.state_dict().values())

    def joint_materialize(self, model, levels: dict, db) -> dict:
        return apply_levels(model, levels, db)

    def timing_module(self, db, module, level, dtype):
        layer = self._joint_layer(db, level, module, dtype, "cpu")
        with torch.no_grad():
            layer.qweight.random_(0, 256)
            layer.qzeros.random_(0, 256)
            layer.scales.uniform_(0.001, 0.01)
        return layer


@torch.no_grad()
def apply_levels(model, levels: dict, db, tensors: dict | None = None) -> dict:
    """Replace the linears named in ``levels`` (``{module name: level}``, a level a bit width or
    ``"BITSgGROUP"``) by packed `EvoPressQuantLinear` layers holding the database's codes (or
    ``tensors[name]``, stored tensors in the database's encoding, where given);
    returns the profile recorded in the checkpoint: ``modules`` (``{name: bits}`` at the profile's
    ``group_size``, ``{name: "BITSgGROUP"}`` at another group size) and the grid settings."""
    settings = db.manifest["settings"]
    reference = settings.get("group_size") or 0
    act_order = bool(settings.get("act_order", False))
    modules = {}
    for name, level in levels.items():
        bits, group_size = quant_level(level, reference)
        linear = model.get_submodule(name)
        bias = linear.bias.detach() if linear.bias is not None else None
        set_submodule(model, name, EvoPressQuantLinear.from_packed(
            (tensors or {}).get(name) or db.tensors(name, level), linear.in_features, linear.out_features, bits, group_size,
            bias=bias, act_order=act_order, device=linear.weight.device, dtype=linear.weight.dtype))
        modules[name] = profile_level(bits, group_size, reference)
    # qweight_layout: layers whose shape allows it hold bit planes (the CPU kernels' layout); checkpoints
    # of format 1 held streams everywhere (record.upgrade_record says so)
    return {"modules": modules, "group_size": reference, "act_order": act_order, "qweight_layout": "planes"}


register_method(QuantizationMethod())
