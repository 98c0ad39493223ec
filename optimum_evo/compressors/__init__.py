"""Layer-wise compressors (GPTQ, SparseGPT) and the bit packing of quantized levels."""

from .obs import HessianAccumulator, QuantizedWeight, gptq, gptq_levels, magnitude_prune, sparsegpt, sparsegpt_levels
from .quantizer import dequantize_codes, find_params, pack_codes, quantize_codes, unpack_codes

__all__ = [
    "HessianAccumulator", "QuantizedWeight", "gptq", "gptq_levels", "magnitude_prune", "sparsegpt",
    "sparsegpt_levels",
    "dequantize_codes", "find_params", "pack_codes", "quantize_codes", "unpack_codes",
]
