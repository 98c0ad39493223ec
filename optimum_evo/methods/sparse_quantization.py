"""Sparse + quantized levels: a pruning mask and a bit width on the same linear, under a budget.

A level ``"50%+4"`` prunes half of a linear's weights (SparseGPT's mask) and quantizes the rest
at 4 bits (GPTQ with the pruned weights compensated like rounding errors; scale and zero-point
groups ranged on the kept weights). Stored as a 1-bit mask plus the kept weights' codes, it takes
about the bytes of a 3-bit level, and measured uniform models are better than the 3-bit ones at
that size (docs/benchmarks/joint.md, "Sparse + quantized levels"). Between 2 and 3 bits
(``"50%+3"``, ``"60%+4"``) they are the only levels that make a working model.

The kind is searched under a budget in user units, on its own (``compression="sparse-quantization",
target_size="60MB"``) or with the others (``compression=["depth", "quantization",
"sparse-quantization"]``): a linear then chooses among bit widths and sparse + quantized levels.
Per-linear reconstruction errors do not rank the two families (50% + 4 bits has the higher
error in most linears and the better model), so the joint space keeps both and lets the fitness
judge (`optimum_evo.methods.joint`).

In memory a layer is a packed `EvoPressQuantLinear` at its bit width whose pruned weights are the
group's zero-point code (the same kernels and decode speed as the bit width); the checkpoint
stores the compact form (`optimum_evo.compressors.sparse_quant_linear`). Exports write the layer
as a plain ``bits``-bit one (identical logits; the file holds every code, so it is larger than the
budget the search met).

Examples:
    >>> from optimum_evo import SearchArguments
    >>> args = SearchArguments(compression=["quantization", "sparse-quantization"], target_size=0.2,
    ...                        sparse_quant_levels=["50%+4"])
    >>> args.compression, args.sparse_quant_levels
    ('quantization+sparse-quantization', ['50%+4'])
"""

from __future__ import annotations

import torch

from ..compressors.codecs import get_codec, sparse_quant_level, sparse_quant_level_name
from ..compressors.sparse_quant_linear import EvoPressSparseQuantLinear, compact_tensors
from .base import MERGE_REFUSED, CompressedModelError
from .layerwise import DatabaseMethod, profile_linear, set_submodule
from .registry import register_method

#: the levels a search chooses from by default (measured worth it: docs/benchmarks/joint.md)
DEFAULT_LEVELS = ("50%+3", "60%+4", "50%+4")


class SparseQuantizationMethod(DatabaseMethod):
    """Sparse + quantized levels per linear (see the module docstring)."""

    name = "sparse-quantization"
    description = "sparse + quantized levels (a SparseGPT mask and GPTQ bit width per linear, packed)"
    target_help = "a size (target_size) or decode speed-up (target_speedup) budget"
    packs_weights = True
    merge_rule = MERGE_REFUSED
    codec = "sparse-quantization"
    level_label = "stored bits per weight"
    budget_key = "sparsity"

    def validate(self, args) -> None:
        if getattr(args, "target_size", None) is None and getattr(args, "target_speedup", None) is None:
            raise ValueError("compression='sparse-quantization' searches under a budget: give target_size (e.g. "
                             "'60MB', or 0.2 of the dense size) or target_speedup, alone or with other kinds (e.g. "
                             "compression=['quantization', 'sparse-quantization']).")
        levels = getattr(args, "sparse_quant_levels", None) or list(DEFAULT_LEVELS)
        if isinstance(levels, str):
            levels = [levels]
        names = [sparse_quant_level_name(*sparse_quant_level(lv)) for lv in levels]  # refuses bad ones, naming them
        if len(set(names)) != len(names):
            raise ValueError(f"sparse_quant_levels names a level twice: {levels!r}.")
        args.sparse_quant_levels = get_codec(self.codec).sort_levels(names)
        if isinstance(args.group_size, bool) or not isinstance(args.group_size, int) or args.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = one group per row), got {args.group_size!r}.")
        if isinstance(args.damp_percent, bool) or not isinstance(args.damp_percent, (int, float)) \
                or not 0 < args.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1) (SparseGPT's and GPTQ's damping), got "
                             f"{args.damp_percent!r}.")

    def database_level_bytes(self, args) -> list:
        g = args.group_size
        out = []
        for level in args.sparse_quant_levels or DEFAULT_LEVELS:
            s, b = sparse_quant_level(level)
            out.append(1 / 8 + (1 - s) * b / 8 + ((2 + b / 8) / g if g else 0.0))
        return out

    def database_request(self, args, model) -> tuple:
        settings = {"group_size": args.group_size, "sym": args.sym, "act_order": args.desc_act,
                    "damp": float(args.damp_percent)}
        return list(args.sparse_quant_levels or DEFAULT_LEVELS), settings, {}

    def cache_levels(self, args) -> str:
        return str(args.sparse_quant_levels)

    def make_space(self, run, model):
        raise ValueError("compression='sparse-quantization' is searched under target_size or target_speedup.")

    def baselines(self, run) -> tuple:  # pragma: no cover - the budget engine has its own
        raise ValueError("compression='sparse-quantization' is searched under target_size or target_speedup.")

    def materialize(self, model, space, candidate) -> dict:  # pragma: no cover - see make_space
        raise ValueError("compression='sparse-quantization' is searched under target_size or target_speedup.")

    # ------------------------------------------------------------------ the compressed model
    def _layer(self, profile: dict, name: str, level, model, kept=None):
        _, bits = sparse_quant_level(level)
        linear = profile_linear(model, name)
        dtype = linear.weight.dtype if linear.weight is not None else None
        return EvoPressSparseQuantLinear(linear.in_features, linear.out_features, bits, profile.get("group_size"),
                                         bias=linear.bias is not None, act_order=profile.get("act_order", False),
                                         device="meta", dtype=dtype, kept=kept, layout="planes")

    def build_skeleton(self, model, profile: dict) -> None:
        for name, level in profile.get("modules", {}).items():
            set_submodule(model, name, self._layer(profile, name, level, model, kept=profile["kept"][name]))

    def after_load(self, model, profile: dict) -> None:
        for name in profile.get("modules", {}):
            module = model.get_submodule(name)
            if isinstance(module, EvoPressSparseQuantLinear):
                module.expand()

    def checkpoint_tensors(self, model, profile: dict, state_dict: dict) -> dict:
        out = dict(state_dict)
        for name in profile.get("modules", {}):
            module = model.get_submodule(name)
            module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            out.pop(f"{name}.qweight")
            out.update({f"{name}.{k}": v for k, v in compact_tensors(module).items()})
        return out

    def verify(self, model, profile: dict) -> None:
        for name, level in profile.get("modules", {}).items():
            _, bits = sparse_quant_level(level)
            module = model.get_submodule(name)
            module = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # under LoRA
            if not isinstance(module, EvoPressSparseQuantLinear) or module.bits != bits:
                raise CompressedModelError(f"{name} should be a {bits}-bit EvoPressSparseQuantLinear, found {module!r}.")
            if module._buffers.get("qweight") is None or module.scales.device.type == "meta" or \
                    not bool(module.scales.abs().sum() > 0):
                raise CompressedModelError(f"The packed weights of {name} were not loaded (missing from the "
                                           "checkpoint?).")

    # ------------------------------------------------------------------ reports
    def sorted_counts(self, counts: dict) -> dict:
        return {lv: counts[lv] for lv in get_codec(self.codec).sort_levels(counts)}

    def card_rows(self, record: dict) -> list:
        return [("sparse + quantized levels searched", ", ".join(record.get("sparse_quant_levels") or DEFAULT_LEVELS)),
                ("sparse + quantized levels made by", "a SparseGPT mask, then GPTQ of the kept weights")]

    def plot_level(self, level) -> tuple:
        s, b = sparse_quant_level(level)
        return (1 - s) * b + 1, str(level)  # stored bits per weight: kept codes and the mask

    # ------------------------------------------------------------------ budget search
    def joint_target(self, args):
        return None

    def level_bytes(self, db, name, level, module, dtype) -> int:
        """The database level's tensors (mask, kept codes, scales, zero-points, ``g_idx``) and the
        bias: what `checkpoint_tensors` stores."""
        tensors = db.tensors(name, level)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if bool(db.manifest["settings"].get("act_order")) and "g_idx" not in tensors:
            nbytes += module.in_features * 4  # the layer always holds g_idx with act-order
        itemsize = torch.empty((), dtype=dtype).element_size()
        return nbytes + (module.out_features * itemsize if module.bias is not None else 0)

    @torch.no_grad()
    def joint_materialize(self, model, levels: dict, db) -> dict:
        from ..compressors.codecs import expand_sparse_quantized
        from ..compressors.sparse_quant_linear import kept_count

        settings = db.manifest["settings"]
        group = settings.get("group_size") or 0
        act_order = bool(settings.get("act_order", False))
        modules, kept, numel = {}, {}, 0
        for name, level in levels.items():
            _, bits = sparse_quant_level(level)
            linear = model.get_submodule(name)
            stored = db.tensors(name, level)
            shape = tuple(linear.weight.shape)
            bias = linear.bias.detach() if linear.bias is not None else None
            set_submodule(model, name, EvoPressSparseQuantLinear.from_packed(
                expand_sparse_quantized(stored, shape, bits, group), linear.in_features, linear.out_features, bits,
                group, bias=bias, act_order=act_order, device=linear.weight.device, dtype=linear.weight.dtype))
            modules[name] = level
            kept[name] = kept_count(stored["mask"], shape)
            numel += linear.in_features * linear.out_features
        return {"modules": modules, "kept": kept, "group_size": group, "act_order": act_order,
                "sparsity": 1 - sum(kept.values()) / numel if numel else 0.0, "qweight_layout": "planes"}

    def timing_module(self, db, module, level, dtype):
        settings = db.manifest["settings"]
        _, bits = sparse_quant_level(level)
        layer = EvoPressSparseQuantLinear(module.in_features, module.out_features, bits, settings.get("group_size"),
                                          bias=module.bias is not None, act_order=bool(settings.get("act_order")),
                                          device="cpu", dtype=dtype, layout="planes")
        with torch.no_grad():
            layer.qweight.random_(0, 256)
            layer.qzeros.random_(0, 256)
            layer.scales.uniform_(0.001, 0.01)
        return layer


register_method(SparseQuantizationMethod())
