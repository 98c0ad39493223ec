"""GGUF types: a llama.cpp tensor type per linear, under a file-size budget.

Levels are GGUF tensor types (``Q2_K`` ... ``Q8_0``, `optimum_evo.compressors.ggml_types`), each
made by GPTQ on the type's own grid (K-quant super-block scales included) and stored in the level
database as the ggml bytes llama.cpp reads. What the search scores is therefore exactly the weight
llama.cpp runs, and the GGUF export writes those bytes unchanged. The budget is a size
(``target_size``: bytes of the stored weights, the GGUF types' own sizes; or a fraction of the
dense size), searched by the budget engine of `optimum_evo.methods.joint`; with ``depth`` in the
same search (``compression=["depth", "gguf"]``) whole blocks can go as well.

A linear whose rows the K-quants' 256-weight blocks do not divide (SmolLM2's 576 input features)
stores a K-quant level in a 32-block type (``Q3_K`` -> ``IQ4_NL``, ``Q4_K`` -> ``Q5_0``, ...), as
llama.cpp's own quantizer replaces it; the search sees the replacement's size and error.

Examples:
    >>> from optimum_evo import SearchArguments
    >>> args = SearchArguments(compression="gguf", target_size="90MB")
    >>> args.compression
    'gguf'
"""

from __future__ import annotations

import torch

from ..compressors.ggml_types import TYPES, get_type, stored_type, type_bytes
from ..compressors.gguf_linear import EvoPressGGUFLinear
from .base import MERGE_REFUSED, CompressedModelError
from .layerwise import DatabaseMethod, profile_linear, set_submodule
from .registry import register_method

#: the types a search chooses from by default: llama.cpp's K-quants, its 4-bit non-linear grid and Q8_0
DEFAULT_TYPES = ("Q2_K", "Q3_K", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


class GGUFMethod(DatabaseMethod):
    """GGUF tensor types per linear (see the module docstring)."""

    name = "gguf"
    description = "GGUF tensor types for llama.cpp (a GPTQ-made type per linear)"
    target_help = "a size budget (target_size)"
    packs_weights = True
    merge_rule = MERGE_REFUSED
    codec = "gguf"
    level_label = "bits per weight"
    budget_key = "bits_per_weight"
    export_formats = ("gguf", "dense")

    def validate(self, args) -> None:
        if getattr(args, "target_speedup", None) is not None:
            raise ValueError("compression='gguf' takes target_size only: a latency table would time the plugin's "
                             "layers, not llama.cpp's kernels.")
        if getattr(args, "target_size", None) is None:
            raise ValueError("compression='gguf' searches under a size budget: give target_size (e.g. '90MB', or "
                             "0.3 of the dense size).")
        types = getattr(args, "gguf_types", None) or list(DEFAULT_TYPES)
        unknown = [t for t in types if t not in TYPES]
        if unknown or len(set(types)) != len(types):
            raise ValueError(f"gguf_types must be distinct GGUF types among {sorted(TYPES)}, got {types!r}.")
        args.gguf_types = sorted(types, key=lambda t: (get_type(t).bits_per_weight, t))
        if isinstance(args.damp_percent, bool) or not isinstance(args.damp_percent, (int, float)) \
                or not 0 < args.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1) (GPTQ's damping), got {args.damp_percent!r}.")

    def database_level_bytes(self, args) -> list:
        return [get_type(t).bits_per_weight / 8 for t in args.gguf_types or DEFAULT_TYPES]

    def database_request(self, args, model) -> tuple:
        return list(args.gguf_types or DEFAULT_TYPES), {"damp": float(args.damp_percent)}, {}

    def make_space(self, run, model):
        raise ValueError("compression='gguf' is searched under target_size (the budget engine of joint searches).")

    def baselines(self, run) -> tuple:  # pragma: no cover - the budget engine has its own
        raise ValueError("compression='gguf' is searched under target_size.")

    def materialize(self, model, space, candidate) -> dict:  # pragma: no cover - see make_space
        raise ValueError("compression='gguf' is searched under target_size.")

    # ------------------------------------------------------------------ the compressed model
    def build_skeleton(self, model, profile: dict) -> None:
        for name, qtype in profile.get("types", {}).items():
            linear = profile_linear(model, name)
            dtype = linear.weight.dtype if linear.weight is not None else None
            set_submodule(model, name, EvoPressGGUFLinear(linear.in_features, linear.out_features, qtype,
                                                           bias=linear.bias is not None, device="meta", dtype=dtype))

    def verify(self, model, profile: dict) -> None:
        for name, qtype in profile.get("types", {}).items():
            module = model.get_submodule(name)
            if not isinstance(module, EvoPressGGUFLinear) or module.qtype != qtype:
                raise CompressedModelError(f"{name} should be an EvoPressGGUFLinear of type {qtype}, found {module!r}.")
            if module.qweight.device.type == "meta":
                raise CompressedModelError(f"The GGUF blocks of {name} were not loaded (missing from the checkpoint?).")

    def summary(self, profile: dict) -> dict:
        types = profile.get("types", {})
        if not types:
            return {}
        counts: dict = {}
        for t in types.values():
            counts[t] = counts.get(t, 0) + 1
        ordered = dict(sorted(counts.items(), key=lambda kv: (get_type(kv[0]).bits_per_weight, kv[0])))
        return {"bits_per_weight": profile.get("bits_per_weight"), "modules per type": ordered, "modules": len(types)}

    def card_rows(self, record: dict) -> list:
        return [("GGUF types searched", ", ".join(record.get("gguf_types") or DEFAULT_TYPES)),
                ("levels made by", "GPTQ on each type's grid (what llama.cpp stores)")]

    def plot_level(self, level) -> tuple:
        return get_type(level).bits_per_weight, str(level)

    # ------------------------------------------------------------------ budget search
    def joint_target(self, args):
        return None

    def level_bytes(self, db, name, level, module, dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        bias = module.out_features * itemsize if module.bias is not None else 0
        return type_bytes(level, (module.out_features, module.in_features)) + bias

    @torch.no_grad()
    def joint_materialize(self, model, levels: dict, db) -> dict:
        types, stored, numel = {}, 0, 0
        for name, level in levels.items():
            linear = model.get_submodule(name)
            qtype = stored_type(level, linear.in_features)
            bias = linear.bias.detach() if linear.bias is not None else None
            set_submodule(model, name, EvoPressGGUFLinear.from_packed(
                db.tensors(name, level)["data"], linear.in_features, linear.out_features, qtype, bias=bias,
                device=linear.weight.device, dtype=linear.weight.dtype))
            types[name] = qtype
            stored += type_bytes(qtype, linear.weight.shape)
            numel += linear.weight.numel()
        return {"modules": dict(levels), "types": types,
                "bits_per_weight": round(8 * stored / numel, 4) if numel else None}

    def timing_module(self, db, module, level, dtype):  # pragma: no cover - validate refuses target_speedup
        raise ValueError("compression='gguf' has no latency table (its runtime is llama.cpp).")


register_method(GGUFMethod())
