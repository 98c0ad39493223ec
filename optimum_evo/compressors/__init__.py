"""Layer-wise compressors (GPTQ, SparseGPT) and the bit packing of quantized levels."""

from .obs import HessianAccumulator, QuantizedWeight, gptq, magnitude_prune, sparsegpt
from .quantizer import dequantize_codes, find_params, pack_codes, quantize_codes, unpack_codes

__all__ = [
    "HessianAccumulator", "QuantizedWeight", "gptq", "magnitude_prune", "sparsegpt",
    "dequantize_codes", "find_params", "pack_codes", "quantize_codes", "unpack_codes",
]
