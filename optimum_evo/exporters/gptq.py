"""Export a mixed-bit EvoPress model in the **GPTQ checkpoint format** (auto-gptq's layout, as read by
gptqmodel and transformers' GPTQ integration; vLLM for 4/8-bit symmetric layers), with per-module bit widths
in ``dynamic``.

Format written (per quantized linear ``W [out, in]``, ``G`` groups; see the spec in
`optimum_evo.compressors.packing` for the int32 bit stream):

| tensor | dtype, shape | content |
|---|---|---|
| ``qweight`` | int32 ``[ceil(in*b/32), out]`` | codes, each output column packed along the input dim |
| ``qzeros`` | int32 ``[G, ceil(out*b/32)]`` | zero-points packed along the output dim; format ``gptq`` (v1) stores ``zero - 1``, ``gptq_v2`` ``zero`` |
| ``scales`` | float16 ``[G, out]`` | per group and output channel |
| ``g_idx`` | int32 ``[in]`` | group of each input column |
| ``bias`` | float16 ``[out]`` | if the layer has one |

and ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])``. ``quantize_config.json`` and
``config.json``'s ``quantization_config`` carry ``quant_method="gptq"``, the most common ``bits`` /
``group_size`` and ``dynamic``: ``{"+:^<module>$": {"bits": b}}`` for every module at another width
and ``{"-:^<module>$": {}}`` for the decoder linears left dense (gptqmodel's and vLLM's
per-module override syntax, first match wins). For vLLM, which fuses q/k/v and gate/up, a
``qkv_proj`` / ``gate_up_proj`` alias is added when the fused members share their settings; a
checkpoint whose fused members differ loads in gptqmodel but not in vLLM (reported in the summary).

Zero-points: GPTQ v1 (``checkpoint_format="gptq"``) stores ``zero - 1`` and readers add 1 back, so
a zero-point of 0 (a group whose weights are all >= 0 under asymmetric quantization) cannot be
stored in v1 (such exports are refused), and gptqmodel loads asymmetric v1 checkpoints only from its
own writer (it checks ``meta.quantizer``); ``gptq_v2`` stores zero-points as they are.
``checkpoint_format="auto"`` (default) writes v1 for symmetric models (every reader) and ``gptq_v2``
for asymmetric ones (gptqmodel). vLLM's GPTQ path reads only 4- and 8-bit symmetric layers (Marlin);
other widths and asymmetric grids go to vLLM through the compressed-tensors export. Bit widths GPTQ kernels lack (1, 5, 6, 7) are stored as the next supported
width (2 or 8) with the same scales and codes and zero-points shifted by the same amount: exact,
slightly larger.

`dequantize_gptq_checkpoint` is an independent reader of this layout (used by the tests, and
to check a checkpoint without gptqmodel).

Examples:
    >>> from optimum_evo.exporters import export_gptq
    >>> summary = export_gptq(model, "out/gptq", tokenizer=tok)          # doctest: +SKIP
    >>> summary["bits"], summary["dynamic_overrides"], summary["checkpoint_format"]  # doctest: +SKIP
    (3, 41, 'gptq')
    >>> from gptqmodel import GPTQModel; GPTQModel.load("out/gptq", device="cpu")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..compressors.packing import pack_int32, unpack_int32
from ..decoder import find_decoder_layout
from ..version import __version__
from .base import Exporter, register_exporter
from .common import ExportError, build_plain_model, model_contents, save_quantized

logger = logging.getLogger(__name__)

GPTQ_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("auto", "gptq", "gptq_v2")
#: vLLM's fused linears (Llama family): alias name -> members.
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def stored_bits(bits: int) -> int:
    """The GPTQ width that stores ``bits``-bit codes exactly (the smallest supported width >= bits)."""
    for b in GPTQ_BITS:
        if b >= bits:
            return b
    raise ExportError(f"GPTQ stores at most 8 bits, got {bits}.")


class _PackedGPTQ(nn.Module):
    """Holds a GPTQ layer's tensors so ``save_pretrained`` writes them under the module's name."""

    def __init__(self, tensors: dict):
        super().__init__()
        for key, value in tensors.items():
            self.register_buffer(key, value)


def _pattern(name: str) -> str:
    return "^" + re.escape(name) + "$"


@torch.no_grad()
def export_gptq(model, save_dir, tokenizer=None, checkpoint_format: str = "auto", dtype: torch.dtype = torch.float16,
                partial_drops: str = "zero", max_shard_size: str = "5GB") -> dict:
    """Write an EvoPress quantization model (its `EvoPressQuantLinear` modules) as a GPTQ
    checkpoint with per-module bits (see the module docstring for the exact format).

    Args:
        model: a model holding `EvoPressQuantLinear`
            layers (``compression="quantization"``).
        save_dir: output folder.
        tokenizer: tokenizer object or path saved alongside (default: the model's own folder, if any).
        checkpoint_format: ``"auto"`` (v1 when symmetric, else v2), ``"gptq"`` (v1) or ``"gptq_v2"``.
        dtype: dtype of the unquantized weights (embeddings, norms, head); GPTQ kernels run float16.
        partial_drops: for models with attention-/MLP-only drops, as in `export_dense`.

    Returns:
        A summary dict (``format``, ``checkpoint_format``, ``bits``, ``group_size``,
        ``dynamic_overrides``, ``upcast`` modules, ``vllm_fused_compatible``, ``path``).

    Raises:
        ExportError: no quantized modules, a v1 export with zero-points of 0, or a layer shape GPTQ
            cannot hold.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}.")
    contents = model_contents(model)
    contents.refuse_gguf("GPTQ")
    if not contents.quantized:
        raise ExportError("The model has no EvoPressQuantLinear layers: GPTQ export needs a model compressed with "
                          "compression='quantization' (use export_dense for depth / sparsity).")

    layers, upcast, zero_groups = {}, {}, 0
    for name, layer in contents.quantized.items():
        data = layer.quantized_data()
        bits = stored_bits(data.bits)
        codes, zeros = data.codes.to(torch.int64), data.zeros.round().to(torch.int64)
        if bits != data.bits:
            # Same grid, codes and zero-points shifted to the middle of the wider range: exact, and a
            # symmetric layer (zero = 2**(b-1)) stays symmetric at the stored width.
            upcast[name] = (data.bits, bits)
            shift = (1 << (bits - 1)) - (1 << (data.bits - 1))
            codes, zeros = codes + shift, zeros + shift
        zero_groups += int((zeros == 0).sum())
        trivial = torch.equal(data.g_idx.long(), torch.arange(layer.in_features, device=data.g_idx.device)
                              // layer.group_size)
        layers[name] = dict(layer=layer, data=data, bits=bits, codes=codes, zeros=zeros, act_order=not trivial,
                            group_size=-1 if layer.num_groups == 1 else layer.group_size)
    sym = all(bool((v["zeros"] == 1 << (v["bits"] - 1)).all()) for v in layers.values())
    if checkpoint_format == "auto":
        checkpoint_format = "gptq" if sym else "gptq_v2"
    elif checkpoint_format == "gptq" and zero_groups:
        raise ExportError(f"{zero_groups} quantization groups have zero-point 0, which GPTQ v1 (it stores zero - 1) "
                          "cannot represent. Export with checkpoint_format='gptq_v2' (or 'auto').")
    offset = 1 if checkpoint_format == "gptq" else 0
    if upcast:
        logger.info("GPTQ has no %s-bit kernels: %d modules stored at the next supported width (exact).",
                    sorted({f for f, _ in upcast.values()}), len(upcast))

    base_bits = Counter(v["bits"] for v in layers.values()).most_common(1)[0][0]
    base_group = Counter(v["group_size"] for v in layers.values()).most_common(1)[0][0]
    desc_act = any(v["act_order"] for v in layers.values())

    plain = build_plain_model(model, dtype=dtype, partial_drops=partial_drops, contents=contents, keep_quantized=True)
    for name, v in layers.items():
        layer, data, bits = v["layer"], v["data"], v["bits"]
        tensors = {
            "qweight": pack_int32(v["codes"], bits).t().contiguous(),
            "qzeros": pack_int32((v["zeros"] - offset).t(), bits).contiguous(),
            "scales": data.scales.t().to(torch.float16).contiguous(),
            "g_idx": data.g_idx.to(torch.int32).contiguous(),
        }
        if layer.bias is not None:
            tensors["bias"] = layer.bias.detach().to(torch.float16).cpu()
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, _PackedGPTQ({k: t.cpu() for k, t in tensors.items()}))

    dynamic, fused_ok = _dynamic(plain, layers, base_bits, base_group)
    qconfig = {
        "quant_method": "gptq", "bits": base_bits, "group_size": base_group, "desc_act": desc_act, "sym": sym,
        "lm_head": False, "format": checkpoint_format, "checkpoint_format": checkpoint_format, "pack_dtype": "int32",
        "true_sequential": True, "damp_percent": 0.01, "dynamic": dynamic or None,
        "meta": {"quantizer": [f"optimum-evo:{__version__}"], "uri": "https://github.com/IST-DASLab/EvoPress",
                 "evopress": _profile_summary(model, layers)},
    }
    save_dir = save_quantized(plain, save_dir, qconfig, model, tokenizer, max_shard_size)
    (save_dir / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
    return {"format": "gptq", "path": str(save_dir), "checkpoint_format": checkpoint_format, "bits": base_bits,
            "group_size": base_group, "desc_act": desc_act, "sym": sym, "modules": len(layers),
            "dynamic_overrides": sum(1 for k in dynamic if k.startswith("+:")),
            "dense_modules": sum(1 for k in dynamic if k.startswith("-:")),
            "upcast": {k: list(v) for k, v in upcast.items()}, "zero_point_zero_groups": zero_groups,
            "vllm_fused_compatible": fused_ok}


def _dynamic(plain, layers: dict, base_bits: int, base_group: int):
    """gptqmodel / vLLM ``dynamic`` overrides; returns ``(dynamic, fused members agree)``."""
    settings = {name: {"bits": v["bits"], "group_size": v["group_size"]} for name, v in layers.items()}
    dynamic = {}
    for name in sorted(settings):
        override = {k: val for k, val in settings[name].items() if val != {"bits": base_bits,
                                                                            "group_size": base_group}[k]}
        if override:
            dynamic["+:" + _pattern(name)] = override
    # Linears of the decoder blocks that stay dense: readers must not expect packed tensors there.
    layout = find_decoder_layout(plain)
    for i, block in enumerate(layout.layers):
        for sub, module in block.named_modules():
            name = f"{layout.path}.{i}.{sub}"
            if isinstance(module, nn.Linear) and name not in settings:
                dynamic["-:" + _pattern(name)] = {}
    # vLLM's fused modules need one setting for all their members.
    fused_ok, mismatched = True, []
    for name in sorted(settings):
        parent, _, child = name.rpartition(".")
        for alias, members in VLLM_FUSED.items():
            if child != members[0]:
                continue
            names = [f"{parent}.{m}" for m in members]
            if not all(n in settings for n in names):
                if any(n in settings for n in names):
                    fused_ok = False
                continue
            if any(settings[n] != settings[names[0]] for n in names):
                fused_ok = False
                mismatched.append(f"{parent}.{alias}")
            elif "+:" + _pattern(name) in dynamic:
                dynamic["+:" + _pattern(f"{parent}.{alias}")] = dict(dynamic["+:" + _pattern(name)])
    if mismatched:
        logger.warning("%d groups of linears that vLLM fuses (q/k/v, gate/up) have different bit widths, e.g. %s: "
                       "gptqmodel loads this checkpoint, vLLM does not.", len(mismatched), mismatched[0])
    return dynamic, fused_ok


def _profile_summary(model, layers: dict) -> dict:
    counts = Counter(v["data"].bits for v in layers.values())
    numel = {b: 0 for b in counts}
    for v in layers.values():
        numel[v["data"].bits] += v["layer"].in_features * v["layer"].out_features
    total = sum(numel.values())
    return {"modules_per_bits": {str(b): counts[b] for b in sorted(counts)},
            "average_bits": round(sum(b * n for b, n in numel.items()) / total, 4)}


# ---------------------------------------------------------------------- reference reader
def resolve_dynamic(dynamic: dict | None, name: str):
    """gptqmodel's ``dynamic`` rule for ``name``: ``False`` (``-:`` match: not quantized), the override
    dict of the first ``+:`` (or unprefixed) match, or ``None`` (base settings)."""
    for pattern, override in (dynamic or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return False
        elif re.match(pattern[2:] if pattern.startswith("+:") else pattern, name):
            return override
    return None


@torch.no_grad()
def dequantize_gptq_checkpoint(path, dtype: torch.dtype = torch.float32):
    """Load a GPTQ checkpoint folder (this exporter's or any auto-gptq/gptqmodel one with 2/3/4/8-bit
    int32 packing) into a plain transformers model with **dequantized** weights, by reading the
    format spec directly (no gptqmodel). For verification on machines without GPTQ kernels.

    Examples:
        >>> model = dequantize_gptq_checkpoint("out/gptq")        # doctest: +SKIP
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    del config.quantization_config
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"Unsupported GPTQ checkpoint_format {fmt!r}.")
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    prefixes = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    for name in prefixes:
        override = resolve_dynamic(qc.get("dynamic"), name)
        if override is False:
            raise ValueError(f"{name} has packed tensors but `dynamic` marks it as not quantized.")
        bits = int((override or {}).get("bits", qc["bits"]))
        qweight, qzeros = state.pop(f"{name}.qweight"), state.pop(f"{name}.qzeros")
        scales, g_idx = state.pop(f"{name}.scales"), state.pop(f"{name}.g_idx").long()
        groups, out_features = scales.shape
        in_features = g_idx.numel()
        codes = unpack_int32(qweight.t().contiguous(), bits, in_features)  # [out, in]
        zeros = unpack_int32(qzeros, bits, out_features)  # [groups, out]
        if fmt == "gptq":
            zeros = zeros + 1
        weight = scales.float().t()[:, g_idx] * (codes - zeros.t()[:, g_idx]).float()
        state[f"{name}.weight"] = weight
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in state.items()}, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"GPTQ checkpoint does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    model.tie_weights()
    return model.eval()


class GPTQExporter(Exporter):
    """GPTQ checkpoints with per-module bits (`export_gptq`)."""

    name = "gptq"
    description = "GPTQ format, per-module bits in `dynamic` (gptqmodel, vLLM for 4/8-bit symmetric)"
    loads_with = "gptqmodel (GPTQModel.load), transformers with gptqmodel, vLLM"
    needs_packed_weights = True

    def export(self, model, save_dir, tokenizer=None, **kwargs) -> dict:
        return export_gptq(model, save_dir, tokenizer=tokenizer, **kwargs)


register_exporter(GPTQExporter())
