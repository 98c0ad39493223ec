"""Level codecs: how a level database compresses, stores and decodes the levels of one linear.

A codec turns ``(weight, Hessian, levels)`` into one compressed result per level
(`LevelCodec.compress`), each result into tensors stored in the layer's safetensors file
(`LevelCodec.encode`) and stored tensors back into the dense weight the search scores
(`LevelCodec.decode`). Bytes per weight of the stored levels:

| level | bytes per weight | e.g. |
|---|---|---|
| ``b``-bit, group ``g`` | ``b/8 + (16 + b) / (8 g)`` | 3 bit, g=128: 0.393 |
| sparsity ``s`` | ``1/8 + 2 (1 - s)`` | 70 %: 0.725 |
| sparsity ``s`` + ``b`` bits, group ``g`` | ``1/8 + (1 - s) b/8 + (16 + b) / (8 g)`` | 50 % + 4 bit: 0.395 |
| dense fp16 (reference) | 2 | 2 |

* `QuantizedLevelCodec` (GPTQ, all bit widths in one column sweep): ``codes`` (uint8
  bit-packed integer codes), ``scales`` (float16, one per row and group), ``zeros`` (bit-packed
  like the codes) and, with act-order, ``g_idx``.
* `SparseLevelCodec` (SparseGPT, all sparsities in one sweep): ``mask`` (1 bit per weight)
  and ``values`` (float16, the kept weights in row-major order).
* `SparseQuantizedLevelCodec` (sparse + quantized levels such as ``"50%+4"``: a SparseGPT mask,
  then GPTQ of the kept weights, the pruned ones compensated): ``mask`` (1 bit per weight: the
  weight's code differs from its group's zero-point), ``codes`` (the kept weights' codes,
  bit-packed in row-major order), ``scales``, ``zeros`` and ``g_idx`` as quantized levels. A
  pruned weight is its group's zero-point code, so it reads back as exactly 0.

Examples:
    >>> codec = get_codec("quantization")
    >>> codec.full_settings({"group_size": 64})["sym"]
    False
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod

import torch

from .grid import dequantize_codes
from .obs import QuantizedWeight, gptq_levels, sparsegpt_levels
from .packing import pack_codes, unpack_codes

__all__ = ["GGUFLevelCodec", "LevelCodec", "QuantizedLevelCodec", "SparseLevelCodec", "SparseQuantizedLevelCodec",
           "decode_quantized", "decode_sparse", "decode_sparse_quantized", "encode_quantized", "encode_sparse",
           "encode_sparse_quantized", "expand_sparse_quantized", "get_codec", "level_key", "quant_level",
           "quant_level_name", "register_codec", "sparse_quant_level", "sparse_quant_level_name", "stored_bits"]


def level_key(level) -> str:
    """Tensor-name prefix of a level (``3`` -> ``"3"``, ``0.6`` -> ``"0.6"``, ``"3g64"`` -> ``"3g64"``)."""
    return repr(float(level)).rstrip("0").rstrip(".") if isinstance(level, float) else str(level)


_QUANT_LEVEL = re.compile(r"^(\d+)(?:g(\d+))?$")


def quant_level(level, default_group_size: int | None = 128) -> tuple:
    """``(bits, group_size)`` of a quantization level: an integer bit width (at
    ``default_group_size``), ``"3g64"`` (3 bits, groups of 64 input columns; ``g0``: one group per
    row) or a pair ``(3, 64)``.

    Examples:
        >>> quant_level(3), quant_level("2g64"), quant_level([4, 32])
        ((3, 128), (2, 64), (4, 32))
    """
    if isinstance(level, (list, tuple)) and len(level) == 2:
        bits, group = level
    elif isinstance(level, str) and _QUANT_LEVEL.match(level.strip()):
        m = _QUANT_LEVEL.match(level.strip())
        bits, group = m.group(1), m.group(2) if m.group(2) is not None else default_group_size
    elif isinstance(level, (int, float)) and not isinstance(level, bool) and float(level).is_integer():
        bits, group = level, default_group_size
    else:
        raise ValueError(f"A quantization level is a bit width (3), 'BITSgGROUP' ('3g64') or a pair (3, 64); got "
                         f"{level!r}.")
    return int(bits), int(group or 0)


def quant_level_name(bits: int, group_size: int, default_group_size: int | None = 128):
    """The level value of ``(bits, group_size)``: the bit width itself at the default group size (so
    databases of one group size keep integer levels), else ``"BITSgGROUP"``."""
    return int(bits) if int(group_size) == int(default_group_size or 0) else f"{int(bits)}g{int(group_size)}"


_SPARSE_QUANT_LEVEL = re.compile(r"^(\d+(?:\.\d+)?)%\+(\d)$")


def sparse_quant_level(level) -> tuple:
    """``(sparsity, bits)`` of a sparse + quantized level written ``"50%+4"`` (50% of the weights
    pruned, the rest at 4 bits) or given as a pair ``(0.5, 4)``.

    Examples:
        >>> sparse_quant_level("50%+4"), sparse_quant_level((0.6, 3))
        ((0.5, 4), (0.6, 3))
    """
    if isinstance(level, (list, tuple)) and len(level) == 2:
        sparsity, bits = float(level[0]), level[1]
    else:
        m = _SPARSE_QUANT_LEVEL.match(str(level).strip())
        if m is None:
            raise ValueError(f"A sparse + quantized level is 'PERCENT%+BITS' (e.g. '50%+4': half the weights pruned, "
                             f"the rest at 4 bits) or a pair (0.5, 4); got {level!r}.")
        sparsity, bits = float(m.group(1)) / 100, m.group(2)
    if not 0 < sparsity < 1 or isinstance(bits, bool) or not float(bits).is_integer() or not 1 <= int(bits) <= 8:
        raise ValueError(f"A sparse + quantized level needs a sparsity in (0%, 100%) and 1..8 bits; got {level!r}.")
    return round(sparsity, 6), int(bits)


def sparse_quant_level_name(sparsity: float, bits: int) -> str:
    """The level value of ``(sparsity, bits)``: ``"50%+4"``."""
    return f"{100 * float(sparsity):g}%+{int(bits)}"


def stored_bits(bits: int, group_size: int, shape) -> int:
    """Bits a ``bits``-bit level with ``group_size`` stores for a ``[rows, cols]`` weight: the codes,
    one float16 scale and one ``bits``-bit zero-point per row and group (what
    `encode_quantized` writes, without act-order's ``g_idx``)."""
    rows, cols = (int(x) for x in shape)
    groups = math.ceil(cols / group_size) if group_size and group_size > 0 else 1
    return rows * cols * int(bits) + rows * groups * (16 + int(bits))


class LevelCodec(ABC):
    """Compression, storage and decoding of the levels of one kind (see the module docstring).

    Attributes:
        kind: name recorded in the database manifest.
        default_settings: the compressor settings and their defaults; unknown keys are refused.
    """

    kind: str
    default_settings: dict

    def full_settings(self, settings: dict | None) -> dict:
        """``settings`` completed with the defaults; unknown keys raise ``ValueError``."""
        unknown = set(settings or {}) - set(self.default_settings)
        if unknown:
            raise ValueError(f"Unknown {self.kind} settings {sorted(unknown)}; known: {sorted(self.default_settings)}.")
        return {**self.default_settings, **(settings or {})}

    @abstractmethod
    def compress(self, weight: torch.Tensor, H: torch.Tensor, levels: list, settings: dict) -> list:
        """One compressed result per level (``H``: the layer's Hessian, or a per-head stack)."""

    def compress_block(self, block, names: list, levels: list, hessians: dict, settings: dict) -> dict:
        """``{name: [result per level]}`` for the linears ``names`` of a calibration ``block``
        (`optimum_evo.compressors.calibrate.Block`); by default `compress` on each linear
        with its dense-input Hessian."""
        linears = block.linears()
        return {n: self.compress(linears[n].weight, hessians[n], levels, settings) for n in names}

    def needs_streams(self, settings: dict) -> bool:
        """Whether `compress_block` needs one calibration stream per level."""
        return False

    def builder_name(self, settings: dict) -> str:
        """Name of what makes the levels (recorded per level in the manifest)."""
        return self.kind

    def sort_levels(self, levels) -> list:
        """``levels`` in the database's order (cheapest first)."""
        return sorted(levels)

    @abstractmethod
    def encode(self, result) -> dict:
        """The tensors stored for one level."""

    @abstractmethod
    def decode(self, tensors: dict, shape, level, settings: dict) -> torch.Tensor:
        """The dense float32 weight of one level from its stored tensors."""


def encode_quantized(q: QuantizedWeight) -> dict:
    """Packed tensors of a `QuantizedWeight`."""
    out = {
        "codes": pack_codes(q.codes, q.bits),
        "scales": q.scales.to(torch.float16),
        "zeros": pack_codes(q.zeros.to(torch.uint8), q.bits),
    }
    if not torch.equal(q.g_idx.long(), torch.arange(q.codes.shape[1], device=q.g_idx.device) // q.group_size):
        out["g_idx"] = q.g_idx.to(torch.int32).clone()  # levels of one sweep share the permutation
    return out


def decode_quantized(t: dict, shape, bits: int, group_size: int) -> torch.Tensor:
    """The dense weight of packed quantized tensors (`encode_quantized`'s format)."""
    rows, cols = shape
    n_groups = t["scales"].shape[1]
    codes = unpack_codes(t["codes"], bits, shape).float()
    zeros = unpack_codes(t["zeros"], bits, (rows, n_groups)).float()
    g = t["g_idx"].long() if "g_idx" in t else torch.arange(cols, device=codes.device) // group_size
    return dequantize_codes(codes, t["scales"].float()[:, g], zeros[:, g])


def encode_sparse(w: torch.Tensor) -> dict:
    """A bitmask of the kept weights and their float16 values."""
    mask = w != 0
    return {"mask": pack_codes(mask.to(torch.uint8), 1), "values": w[mask].to(torch.float16)}


def decode_sparse(t: dict, shape) -> torch.Tensor:
    """The dense weight of `encode_sparse`'s tensors."""
    mask = unpack_codes(t["mask"], 1, shape).bool()
    w = torch.zeros(shape, dtype=torch.float32, device=mask.device)
    w[mask] = t["values"].float()
    return w


def encode_sparse_quantized(q: QuantizedWeight) -> dict:
    """Packed tensors of a `QuantizedWeight` whose pruned weights hold their group's zero-point code:
    a 1-bit mask of the other codes, their packed codes, and the quantized level's scales and zeros
    (and ``g_idx``). A kept weight that rounds to the zero-point code is stored as pruned: it reads
    back as 0 either way."""
    g = q.g_idx.long()
    zero_codes = q.zeros.round().to(torch.uint8)[:, g]
    mask = q.codes != zero_codes
    dense = encode_quantized(q)
    return {"mask": pack_codes(mask.to(torch.uint8), 1), "codes": pack_codes(q.codes[mask], q.bits),
            "scales": dense["scales"], "zeros": dense["zeros"], **({"g_idx": dense["g_idx"]} if "g_idx" in dense else {})}


def expand_sparse_quantized(t: dict, shape, bits: int, group_size: int) -> dict:
    """`encode_sparse_quantized`'s tensors as a quantized level's (`encode_quantized`'s format:
    every weight's code, the pruned ones at their group's zero-point), e.g. for
    `EvoPressQuantLinear.from_packed`."""
    rows, cols = (int(x) for x in shape)
    mask = unpack_codes(t["mask"], 1, (rows, cols)).bool()
    n_groups = t["scales"].shape[1]
    zeros = unpack_codes(t["zeros"], bits, (rows, n_groups))
    g = t["g_idx"].long() if "g_idx" in t else torch.arange(cols, device=mask.device) // (group_size or cols)
    codes = zeros[:, g].clone()
    kept = int(mask.sum())
    codes[mask] = unpack_codes(t["codes"], bits, (kept,))
    out = {"codes": pack_codes(codes, bits), "scales": t["scales"], "zeros": t["zeros"]}
    if "g_idx" in t:
        out["g_idx"] = t["g_idx"]
    return out


def decode_sparse_quantized(t: dict, shape, bits: int, group_size: int) -> torch.Tensor:
    """The dense weight of `encode_sparse_quantized`'s tensors."""
    return decode_quantized(expand_sparse_quantized(t, shape, bits, group_size), tuple(shape), bits,
                            group_size or shape[1])


class QuantizedLevelCodec(LevelCodec):
    """Quantized levels: a level is a bit width at the ``group_size`` setting (``3``) or a
    ``(bits, group size)`` pair written ``"3g64"`` (`quant_level`). How the codes are chosen
    is the ``builder`` setting (`optimum_evo.compressors.builders`: ``gptq`` by default,
    ``gptq-sequential``, ``quantease``, ``signround``); ``iters``, ``batch_size`` and ``lr``
    are the tuning builders' settings (``None`` / 0: the builder's default); ``stream`` is the
    calibration stream the sequential builders tune on (``"level"``, ``"dense"`` or a reference
    level such as ``"3"``: `optimum_evo.compressors.builders`)."""

    kind = "quantization"
    default_settings = dict(group_size=128, sym=False, mse=0.0, act_order=False, damp=0.01, attention_aware=True,
                            builder="gptq", iters=None, batch_size=8, lr=0.0, stream="level")

    def _pairs(self, levels, settings) -> list:
        return [quant_level(lv, settings["group_size"]) for lv in levels]

    def sort_levels(self, levels) -> list:
        return sorted(levels, key=lambda lv: quant_level(lv, 0))

    def needs_streams(self, settings) -> bool:
        from .builders import get_builder

        return get_builder(settings["builder"]).streams

    def builder_name(self, settings) -> str:
        return settings["builder"]

    def compress(self, weight, H, levels, settings):
        from .builders import _gptq_all

        return _gptq_all(weight, H, self._pairs(levels, settings), settings)

    def compress_block(self, block, names, levels, hessians, settings) -> dict:
        from .builders import get_builder

        stream = settings.get("stream") or "level"
        if stream not in ("level", "dense"):  # a reference level, as the builders read it: (bits, group size)
            settings = {**settings, "stream": quant_level(stream, settings["group_size"])}
        return get_builder(settings["builder"]).build(block, names, self._pairs(levels, settings), hessians, settings)

    def encode(self, result):
        return encode_quantized(result)

    def decode(self, tensors, shape, level, settings):
        bits, group = quant_level(level, settings["group_size"])
        return decode_quantized(tensors, tuple(shape), bits, group or shape[1])


class SparseLevelCodec(LevelCodec):
    """SparseGPT levels at several sparsities (levels are fractions of pruned weights)."""

    kind = "sparsity"
    default_settings = dict(damp=0.01, attention_aware=True)

    def compress(self, weight, H, levels, settings):
        return sparsegpt_levels(weight, H, [float(lv) for lv in levels], damp=settings["damp"])

    def encode(self, result):
        return encode_sparse(result)

    def decode(self, tensors, shape, level, settings):
        return decode_sparse(tensors, tuple(shape))


class SparseQuantizedLevelCodec(LevelCodec):
    """Sparse + quantized levels (``"50%+4"``, `sparse_quant_level`): SparseGPT chooses the mask at
    each sparsity (all sparsities in one sweep), then GPTQ quantizes the kept weights with the pruned
    ones compensated like rounding errors (all bit widths of a sparsity in one sweep; groups ranged
    on the kept weights, `optimum_evo.compressors.obs.gptq_levels` with ``mask``)."""

    kind = "sparse-quantization"
    default_settings = dict(group_size=128, sym=False, act_order=False, damp=0.01, attention_aware=True)

    def sort_levels(self, levels) -> list:
        def stored(lv):
            s, b = sparse_quant_level(lv)
            return ((1 - s) * b + 1, b)

        return [sparse_quant_level_name(*sparse_quant_level(lv)) for lv in sorted(levels, key=stored)]

    def builder_name(self, settings) -> str:
        return "sparsegpt+gptq"

    def compress(self, weight, H, levels, settings):
        pairs = [sparse_quant_level(lv) for lv in levels]
        sparsities = sorted({s for s, _ in pairs})
        out = [None] * len(pairs)
        for s, pruned in zip(sparsities, sparsegpt_levels(weight, H, sparsities, damp=settings["damp"])):
            idx = [i for i, (s2, _) in enumerate(pairs) if s2 == s]
            made = gptq_levels(weight, H, [pairs[i][1] for i in idx], group_size=settings["group_size"],
                               sym=settings["sym"], act_order=settings["act_order"], damp=settings["damp"],
                               mask=pruned != 0)
            for i, q in zip(idx, made):
                out[i] = q
        return out

    def encode(self, result):
        return encode_sparse_quantized(result)

    def decode(self, tensors, shape, level, settings):
        _, bits = sparse_quant_level(level)
        return decode_sparse_quantized(tensors, tuple(shape), bits, settings["group_size"] or shape[1])


class GGUFLevelCodec(LevelCodec):
    """Levels that are GGUF tensor types (``"Q3_K"``, ``"IQ4_NL"``, ...; `optimum_evo.compressors.ggml_types`),
    made by GPTQ on each type's grid (all types of a linear in one sweep; ``fit_iters`` rounds of
    weighted least squares fit each block's grid) and stored as the ggml bytes llama.cpp reads (``data``). A K-quant level of a linear whose rows its 256-weight blocks
    do not divide is stored in llama.cpp's replacement type (`ggml_types.stored_type`)."""

    kind = "gguf"
    default_settings = dict(damp=0.01, attention_aware=True, fit_iters=2)

    def sort_levels(self, levels) -> list:
        from .ggml_types import get_type

        return sorted(levels, key=lambda lv: (get_type(lv).bits_per_weight, str(lv)))

    def compress(self, weight, H, levels, settings):
        from .ggml_types import gptq_types, stored_type

        stored = [stored_type(lv, weight.shape[1]) for lv in levels]
        unique = list(dict.fromkeys(stored))
        made = dict(zip(unique, gptq_types(weight, H, unique, damp=settings["damp"],
                                           fit_iters=settings["fit_iters"])))
        return [made[s] for s in stored]

    def encode(self, result):
        from .ggml_types import pack

        return {"data": pack(result)}

    def decode(self, tensors, shape, level, settings):
        from .ggml_types import dequantize, stored_type

        return dequantize(tensors["data"], stored_type(level, shape[1]), tuple(shape))


_CODECS: dict = {}


def register_codec(codec: LevelCodec) -> LevelCodec:
    """Make ``codec`` findable by its ``kind`` (databases record the kind in their manifest)."""
    _CODECS[codec.kind] = codec
    return codec


def get_codec(kind) -> LevelCodec:
    """The codec of ``kind`` (a registered name, or a codec, returned as is)."""
    if isinstance(kind, LevelCodec):
        return kind
    try:
        return _CODECS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"kind must be one of {sorted(_CODECS)}, got {kind!r}.") from None


register_codec(QuantizedLevelCodec())
register_codec(SparseLevelCodec())
register_codec(GGUFLevelCodec())
register_codec(SparseQuantizedLevelCodec())
