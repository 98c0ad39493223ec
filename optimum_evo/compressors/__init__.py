"""Layer-wise compressors (GPTQ, SparseGPT), quantization grids, bit packing, the packed linear layer,
the level codecs and the level database.

| module | holds |
|---|---|
| ``obs`` | GPTQ and SparseGPT (Optimal Brain Surgeon column sweeps) |
| ``grid`` | uniform affine quantization grids (scales, zero-points, codes) |
| ``packing`` | bit packing of codes (the database's stream, GPTQ's int32 words) |
| ``packed_linear`` | `EvoPressQuantLinear`, a linear stored packed at its bit width |
| ``ggml_types`` | GGUF tensor types as grids: GPTQ on them, ggml's byte layouts |
| ``gguf_linear`` | `EvoPressGGUFLinear`, a linear stored as GGUF blocks |
| ``calibrate`` | the block-by-block calibration walk and its Hessians |
| ``codecs`` | how each kind of level is compressed, stored and decoded |
| ``database`` | the level database on disk |
"""

from .grid import dequantize_codes, find_params, quantize_codes
from .obs import HessianAccumulator, QuantizedWeight, gptq, gptq_levels, magnitude_prune, sparsegpt, sparsegpt_levels
from .gguf_linear import EvoPressGGUFLinear
from .packed_linear import EvoPressQuantLinear, set_dequantized_cache
from .packing import pack_codes, pack_int32, unpack_bits, unpack_codes, unpack_int32

__all__ = [
    "EvoPressGGUFLinear", "EvoPressQuantLinear", "HessianAccumulator", "QuantizedWeight", "dequantize_codes", "find_params", "gptq",
    "gptq_levels", "magnitude_prune", "pack_codes", "pack_int32", "quantize_codes", "set_dequantized_cache",
    "sparsegpt", "sparsegpt_levels", "unpack_bits", "unpack_codes", "unpack_int32",
]
