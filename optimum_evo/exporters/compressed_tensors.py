"""Export a mixed-bit EvoPress model in the **compressed-tensors** ``pack-quantized`` format (llm-compressor's
format), with one ``config_group`` per bit width (and grouping), loadable by transformers'
compressed-tensors quantizer and by vLLM.

Per quantized linear ``W [out, in]`` at ``b`` bits with ``G`` groups (compressed-tensors' conventions:
signed codes ``q - 2**(b-1)`` packed with its ``pack_to_int32`` layout, see `.common`):

| tensor | dtype, shape | content |
|---|---|---|
| ``weight_packed`` | int32 ``[out, ceil(in*b/32)]`` | codes packed along the input dim |
| ``weight_scale`` | ``dtype`` ``[out, G]`` | scales (float16 values, exact in float16/32) |
| ``weight_zero_point`` | int32 ``[ceil(out*b/32), G]`` | asymmetric only: ``zero - 2**(b-1)`` packed along the output dim |
| ``weight_shape`` | int64 ``[2]`` | ``[out, in]`` |

and ``W = (q_signed - zp_signed) * scale`` per group. Strategy ``group`` (``group_size``) or ``channel``
(one group per row). Symmetric layers (every zero-point at ``2**(b-1)``) are written
``symmetric=True`` without zero-points. Targets are exact module names. Layers quantized with
act-order (a non-trivial ``g_idx``) are refused (export them as GPTQ).

Loading (checked with transformers 5.24 and compressed-tensors 0.20 on CPU): **symmetric** exports
load with plain ``AutoModelForCausalLM.from_pretrained`` and give the same logits. **Asymmetric**
exports (optimum-evo's default quantizer) follow the same format llm-compressor writes for
``symmetric: false`` and decompress exactly with compressed-tensors' own ``PackedQuantizationCompressor``
(the tests check this), but transformers cannot load them yet: its compressed skeleton expects the
zero-points unpacked (``[out, G]``) while the format packs them (llm-compressor issue #1618), and its
``dequantize=True`` route applies one config group's scheme to every layer, which breaks mixed bit
widths. Use the GPTQ export (gptqmodel loads asymmetric mixed-bit checkpoints) or quantize with
``sym=True`` for transformers; vLLM reads the packed zero-points.

Examples:
    >>> from optimum_evo.exporters import export_compressed_tensors
    >>> export_compressed_tensors(model, "out/ct", tokenizer=tok)        # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("out/ct")   # needs `pip install compressed-tensors`  # doctest: +SKIP
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..compressors.packing import pack_int32
from ..version import __version__
from .base import Exporter, register_exporter
from .common import ExportError, build_plain_model, model_contents, save_quantized

logger = logging.getLogger(__name__)


class _PackedCT(nn.Module):
    def __init__(self, tensors: dict):
        super().__init__()
        for key, value in tensors.items():
            self.register_buffer(key, value)


@torch.no_grad()
def export_compressed_tensors(model, save_dir, tokenizer=None, dtype: torch.dtype = torch.float16,
                              partial_drops: str = "zero", max_shard_size: str = "5GB") -> dict:
    """Write an EvoPress quantization model as a compressed-tensors ``pack-quantized`` checkpoint with
    one config group per (bits, strategy, group size).

    Args:
        model: a model holding `EvoPressQuantLinear` layers.
        save_dir: output folder.
        tokenizer: tokenizer object or path saved alongside (default: the model's own folder, if any).
        dtype: dtype of the unquantized weights and of the scales. The stored scales are float16, so
            float16 and float32 keep them exact; bfloat16 rounds them (a warning says so).
        partial_drops: for models with attention-/MLP-only drops, as in `export_dense`.

    Returns:
        A summary dict (``format``, ``config_groups`` -> number of modules, ``path``).

    Raises:
        ExportError: no quantized modules, act-order layers, or groups that do not tile the input.
    """
    contents = model_contents(model)
    contents.refuse_gguf("compressed-tensors")
    if not contents.quantized:
        raise ExportError("The model has no EvoPressQuantLinear layers: compressed-tensors export needs a model "
                          "compressed with compression='quantization' (use export_dense for depth / sparsity).")
    asymmetric = []
    if dtype == torch.bfloat16:
        logger.warning("compressed-tensors stores the scales in the model dtype: bfloat16 rounds the float16 scales "
                       "the search used (export with dtype=torch.float16 to keep them exact).")
    plain = build_plain_model(model, dtype=dtype, partial_drops=partial_drops, contents=contents, keep_quantized=True)
    groups: dict = {}
    for name, layer in contents.quantized.items():
        data = layer.quantized_data()
        bits, out_features, in_features = data.bits, layer.out_features, layer.in_features
        if not torch.equal(data.g_idx.long(), torch.arange(in_features, device=data.g_idx.device) // layer.group_size):
            raise ExportError(f"{name} was quantized with act-order (permuted groups), which compressed-tensors' "
                              "pack-quantized format does not take from us; export it with export_gptq.")
        if layer.num_groups == 1:
            strategy, group_size = "channel", None
        elif in_features % layer.group_size == 0:
            strategy, group_size = "group", layer.group_size
        else:
            raise ExportError(f"{name}: in_features={in_features} is not a multiple of group_size={layer.group_size}; "
                              "compressed-tensors needs whole groups.")
        zeros = data.zeros.round().to(torch.int64)
        mid = 1 << (bits - 1)
        symmetric = bool((zeros == mid).all())
        tensors = {
            "weight_packed": pack_int32(data.codes.to(torch.int64), bits),
            "weight_scale": data.scales.to(dtype),
            "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
        }
        if not symmetric:
            asymmetric.append(name)
            # pack_to_int32(zero_point, bits, packed_dim=0): signed zero-points packed along the output dim.
            tensors["weight_zero_point"] = pack_int32(zeros.t(), bits).t().contiguous()
        if layer.bias is not None:
            tensors["bias"] = layer.bias.detach().to(dtype)
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, _PackedCT({k: t.cpu().contiguous() for k, t in tensors.items()}))
        groups.setdefault((bits, strategy, group_size, symmetric), []).append(name)

    config_groups = {}
    for (bits, strategy, group_size, symmetric), names in sorted(groups.items(), key=lambda kv: str(kv[0])):
        key = f"group_{bits}bit" + ("" if strategy == "group" else "_channel") + ("_sym" if symmetric else "")
        while key in config_groups:
            key += f"_g{group_size}"
        config_groups[key] = {
            "targets": sorted(names),
            "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
                        "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax",
                        "block_structure": None, "observer_kwargs": {}},
            "input_activations": None, "output_activations": None, "format": "pack-quantized",
        }
    qconfig = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None,
        "version": _ct_version(), "producer": f"optimum-evo {__version__} (EvoPress)",
    }
    if asymmetric:
        logger.warning("%d asymmetric layers: compressed-tensors and vLLM read this checkpoint, transformers 5.24 "
                       "cannot load asymmetric pack-quantized layers yet (llm-compressor issue #1618); use the GPTQ "
                       "export for gptqmodel/transformers.", len(asymmetric))
    save_dir = save_quantized(plain, save_dir, qconfig, model, tokenizer, max_shard_size)
    return {"format": "compressed-tensors", "path": str(save_dir),
            "config_groups": {k: len(v["targets"]) for k, v in config_groups.items()},
            "asymmetric_modules": len(asymmetric)}


def _ct_version() -> str:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # not installed: the format does not need it to be written
        return "0.20.0"


class CompressedTensorsExporter(Exporter):
    """compressed-tensors ``pack-quantized`` checkpoints (`export_compressed_tensors`)."""

    name = "compressed-tensors"
    description = "compressed-tensors pack-quantized, one config group per bit width (transformers, vLLM)"
    loads_with = "transformers (compressed-tensors quantizer), vLLM, llm-compressor"
    needs_packed_weights = True

    def export(self, model, save_dir, tokenizer=None, **kwargs) -> dict:
        return export_compressed_tensors(model, save_dir, tokenizer=tokenizer, **kwargs)


register_exporter(CompressedTensorsExporter())
