"""GGUF tensor types as quantization grids: what llama.cpp stores, chosen by GPTQ.

A GGUF type stores a weight row in blocks (32 weights for the legacy types and ``IQ4_NL``, 256 for
the K-quants), each block split into sub-blocks of 16 or 32 weights that share one scale ``a`` and
one offset ``b``; a weight is ``a * values[q] + b`` for its code ``q``. The K-quants store ``a`` and
``b`` themselves quantized (6- or 4-bit integers times a float16 super-block scale), so the grid of
a sub-block is only known once the whole super-block's scales are chosen.

| type | block / sub-block | value of code ``q`` | bits per weight |
|---|---|---|---|
| ``Q2_K`` | 256 / 16 | ``d*sc * q - dmin*m`` (``q`` in 0..3; ``sc``, ``m`` 4-bit) | 2.625 |
| ``Q3_K`` | 256 / 16 | ``d*sc * (q - 4)`` (``sc`` signed 6-bit) | 3.4375 |
| ``Q4_0`` / ``IQ4_NL`` | 32 / 32 | ``d * (q - 8)`` / ``d * kvalues[q]`` (a non-uniform 4-bit grid) | 4.5 |
| ``Q4_K`` | 256 / 32 | ``d*sc * q - dmin*m`` (``sc``, ``m`` 6-bit) | 4.5 |
| ``Q4_1`` | 32 / 32 | ``d * q + m`` | 5.0 |
| ``Q5_0`` / ``Q5_1`` / ``Q5_K`` | 32 or 256 | as the 4-bit types with 5-bit codes | 5.5 / 6.0 / 5.5 |
| ``Q6_K`` | 256 / 16 | ``d*sc * (q - 32)`` (``sc`` int8) | 6.5625 |
| ``Q8_0`` | 32 / 32 | ``d * q`` (``q`` int8) | 8.5 |

`gptq_types` quantizes a linear to several types in one GPTQ column sweep: at the first column of
every block a type chooses its (quantized) scales from the error-compensated weights of the block,
then every column is rounded to the nearest grid value and its error spread over the columns not yet
quantized. A block's grid is searched as llama.cpp's quantizers search it: from the min-max range
(the extreme weight on the extreme code), each start with the scale stretched by -1 to +1 code
steps is refitted by least squares on the codes it gives, each column weighted by the Hessian's
diagonal (what llama.cpp's importance matrix holds), and the best is refitted ``fit_iters`` more
times. The search finds again, exactly, the grid of a tensor that was dequantized from the same type. `pack` writes the codes in ggml's byte layout, so a level is exactly what llama.cpp
reads; `dequantize` reads them back with the ``gguf`` package's own decoder.

A row whose length is not a multiple of 256 cannot hold a K-quant. Such a level is stored in a
32-block type of at least its size (`stored_type`: ``Q2_K`` / ``Q3_K`` -> ``IQ4_NL``, ``Q4_K`` ->
``Q5_0``, ``Q5_K`` -> ``Q5_1``, ``Q6_K`` -> ``Q8_0``), the replacements of llama.cpp's quantizer
except that it puts ``Q2_K`` / ``Q3_K`` rows in ``Q4_0`` (the same size, a uniform grid).

Examples:
    >>> w, H = torch.randn(4, 256), torch.eye(256)
    >>> q = gptq_types(w, H, ["Q4_K"])[0]
    >>> data = pack(q)
    >>> data.shape, data.dtype
    (torch.Size([4, 144]), torch.uint8)
    >>> bool(torch.equal(dequantize(data, "Q4_K", (4, 256)), q.dequantize()))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .obs import _inverse_hessian_cholesky, _row_groups

__all__ = ["GGMLType", "GGUFWeight", "TYPES", "dequantize", "gptq_types", "pack", "stored_type", "type_bytes"]

QK_K = 256
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class GGMLType:
    """One GGUF tensor type: ``block`` weights stored in ``type_size`` bytes, ``sub``-weight
    sub-blocks sharing ``a`` and ``b``, code ``q`` worth ``values[q]``; ``offset``: sub-blocks
    have a minimum (``b != 0``); ``scale_bits``: width of the K-quants' integer sub-block scales
    (0: a float16 scale per block)."""

    name: str
    block: int
    sub: int
    type_size: int
    values: tuple
    offset: bool = False
    scale_bits: int = 0

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block

    @cached_property
    def uniform(self) -> bool:
        v = self.values
        return all(b - a == 1 for a, b in zip(v, v[1:]))

    @cached_property
    def zero_code(self) -> int:
        """The code of the grid value nearest 0 (what a zero scale stores)."""
        return int(np.argmin(np.abs(np.array(self.values))))


def _range(lo, hi):
    return tuple(range(lo, hi))


TYPES = {t.name: t for t in (
    GGMLType("Q2_K", QK_K, 16, 84, _range(0, 4), offset=True, scale_bits=4),
    GGMLType("Q3_K", QK_K, 16, 110, _range(-4, 4), scale_bits=6),
    GGMLType("Q4_0", 32, 32, 18, _range(-8, 8)),
    GGMLType("IQ4_NL", 32, 32, 18, IQ4NL_VALUES),
    GGMLType("Q4_K", QK_K, 32, 144, _range(0, 16), offset=True, scale_bits=6),
    GGMLType("Q4_1", 32, 32, 20, _range(0, 16), offset=True),
    GGMLType("Q5_0", 32, 32, 22, _range(-16, 16)),
    GGMLType("Q5_K", QK_K, 32, 176, _range(0, 32), offset=True, scale_bits=6),
    GGMLType("Q5_1", 32, 32, 24, _range(0, 32), offset=True),
    GGMLType("Q6_K", QK_K, 16, 210, _range(-32, 32), scale_bits=8),
    GGMLType("Q8_0", 32, 32, 34, _range(-127, 128)),
)}
#: the type of a K-quant level for rows its 256-weight blocks do not divide (as llama.cpp's quantizer replaces it)
FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def get_type(name) -> GGMLType:
    if isinstance(name, GGMLType):
        return name
    try:
        return TYPES[str(name)]
    except KeyError:
        raise ValueError(f"Unknown GGUF type {name!r}; known: {sorted(TYPES)}.") from None


def stored_type(name: str, in_features: int) -> str:
    """The type a ``name`` level is stored in for rows of ``in_features`` weights (`FALLBACK` when
    the K-quant blocks do not divide the row); ``ValueError`` when no type fits."""
    t = get_type(name)
    if in_features % t.block:
        if t.name in FALLBACK:
            return stored_type(FALLBACK[t.name], in_features)
        raise ValueError(f"GGUF type {t.name} needs rows of a multiple of {t.block} weights; this linear has "
                         f"{in_features} input features.")
    return t.name


def type_bytes(name: str, shape) -> int:
    """Bytes a ``[rows, cols]`` weight takes in type ``name`` (as stored: `stored_type`)."""
    rows, cols = (int(x) for x in shape)
    t = get_type(stored_type(name, cols))
    return rows * cols // t.block * t.type_size


@dataclass
class GGUFWeight:
    """A weight quantized to a GGUF type: codes (indices into ``values``, original column order),
    the float32 grid ``a`` / ``b`` per row and sub-block (what llama.cpp decodes), and the stored
    fields ``fields`` (float16 ``d`` / ``dmin`` per row and block, integer ``sc`` / ``m`` per sub-block)."""

    qtype: str
    codes: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    fields: dict

    def dequantize(self) -> torch.Tensor:
        t = get_type(self.qtype)
        values = torch.tensor(t.values, dtype=torch.float32, device=self.codes.device)
        rows, cols = self.codes.shape
        g = torch.arange(cols, device=self.codes.device) // t.sub
        return self.a[:, g] * values[self.codes.long()] + self.b[:, g]


# ============================================================================ grids of one block
def _half(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _extreme(w: torch.Tensor) -> torch.Tensor:
    """The signed value of largest magnitude along the last dimension."""
    return torch.gather(w, -1, w.abs().argmax(-1, keepdim=True))[..., 0]


#: start shifts of the grid search, in code steps (llama.cpp's quantizers try such a range of scales)
START_SHIFTS = tuple(round(0.1 * k, 1) for k in range(-10, 11) if k)


def _fit(t: GGMLType, subs: torch.Tensor, h: torch.Tensor, iters: int) -> tuple:
    """Unquantized ``(a, b)`` per sub-block (``subs``: ``[rows, n, sub]``) for the grid of ``t``,
    of least weighted error (weights ``h`` per column, e.g. the Hessian's diagonal). Starts: the
    min-max (offset types) or extreme-weight (symmetric types) grid, and that grid with its scale
    stretched by each of `START_SHIFTS` code steps (as llama.cpp's reference quantizers search
    scales), each refitted once by weighted least squares on the codes it gives; then ``iters``
    more rounds of least squares from the best. The scale search finds a grid a tensor already
    lies on (a checkpoint dequantized from this type) exactly; ``iters=0`` keeps the min-max grid."""
    lo, hi = t.values[0], t.values[-1]
    if t.offset:  # w = a * q + b with q >= 0: b the sub-block's minimum (at most 0), a its range
        mn = subs.min(-1).values.clamp(max=0)
        a, b = (subs.max(-1).values - mn) / hi, mn
        span = hi
    elif t.name == "Q8_0":  # symmetric int8: the largest magnitude on +-127
        a, b = subs.abs().max(-1).values / hi, subs.new_zeros(subs.shape[:2])
        span = hi
    else:  # the extreme weight on the code of the grid's extreme value lo
        a, b = _extreme(subs) / lo, subs.new_zeros(subs.shape[:2])
        span = -lo
    values = torch.tensor(t.values, dtype=torch.float32, device=subs.device)
    step = (hi - lo) / (len(t.values) - 1)

    def codes(a, b):  # the values of the nearest codes
        if t.uniform:
            safe = torch.where(a == 0, torch.ones_like(a), a)[..., None]
            v = torch.round((subs - b[..., None]) / safe).clamp(lo, hi)
            return torch.where((a == 0)[..., None], torch.zeros_like(v), v)
        return values[nearest(t, subs, a[..., None], b[..., None])]

    def error(a, b):
        v = codes(a, b)
        return (h * (subs - a[..., None] * v - b[..., None]) ** 2).sum(-1), v

    S, Sw, Sww = h.sum(-1), (h * subs).sum(-1), (h * subs * subs).sum(-1)

    def refit(v, a, b):
        """Weighted least squares of (a, b) on the code values v, and its error on those codes (an upper
        bound of the grid's error: its nearest codes can only do better)."""
        Sv, Svv, Svw = (h * v).sum(-1), (h * v * v).sum(-1), (h * v * subs).sum(-1)
        if t.offset:
            det = S * Svv - Sv * Sv
            ok = det > 1e-12 * S * Svv.clamp(min=1e-30)
            safe = torch.where(ok, det, torch.ones_like(det))
            na = torch.where(ok, (S * Svw - Sv * Sw) / safe, a)
            nb = torch.where(ok, (Svv * Sw - Sv * Svw) / safe, b)
            if t.scale_bits:  # the K-quants store a >= 0 and b <= 0 (a scale and a minimum)
                na, nb = na.clamp(min=0), nb.clamp(max=0)
        else:
            na, nb = torch.where(Svv > 0, Svw / Svv.clamp(min=1e-30), a), b
        err = Sww - 2 * na * Svw - 2 * nb * Sw + na * na * Svv + 2 * na * nb * Sv + nb * nb * S
        return na, nb, err

    best, v = error(a, b)

    def keep(na, nb, err, nv):
        nonlocal a, b, v, best
        better = err < best
        a, b = torch.where(better, na, a), torch.where(better, nb, b)
        v = torch.where(better[..., None], nv, v)
        best = torch.where(better, err, best)

    if iters:  # the scale search: each start's codes refitted, scored on those codes
        # a grid not symmetric about 0 (IQ4_NL) is tried both ways round: the extreme weight on lo or on hi
        starts = [(a, span)] if t.offset or t.uniform else [(a, span), (a * lo / hi, hi)]
        for a0, n in starts:
            for shift in START_SHIFTS:
                cv = codes(a0 * n / (n + shift * step), b)
                keep(*refit(cv, a0, b), cv)
        keep(a, b, *error(a, b))  # the best grid's own nearest codes
    for _ in range(iters):
        na, nb, _ = refit(v, a, b)
        keep(na, nb, *error(na, nb))
    return a, b


def block_grid(t: GGMLType, w: torch.Tensor, h: torch.Tensor | None = None, iters: int = 2) -> tuple:
    """``(a, b, fields)`` of one block ``w`` (``[rows, t.block]``): the grid each sub-block gets,
    ``[rows, block / sub]`` float32 as llama.cpp decodes it, and the stored fields. Each sub-block's
    grid is fitted by `_fit` (column weights ``h``, ``[t.block]``, default equal), then stored as
    the type stores it: float16 scales, or for the K-quants integers of a float16 super-block scale
    (the largest sub-block scale on the top integer, as llama.cpp's quantizers do)."""
    rows = w.shape[0]
    subs = w.reshape(rows, t.block // t.sub, t.sub).float()
    h = torch.ones(t.block, device=w.device) if h is None else h.float().clamp(min=0)
    h = h.reshape(1, t.block // t.sub, t.sub) + 1e-12
    scale, offset = _fit(t, subs, h, iters)
    if t.offset:
        minimum = -offset
        if not t.scale_bits:
            d = _half(scale)
            return d, -_half(minimum), {"d": d, "m": -_half(minimum)}
        top = (1 << t.scale_bits) - 1
        d = _half(scale.max(-1, keepdim=True).values / top)
        dmin = _half(minimum.max(-1, keepdim=True).values / top)
        sc = torch.where(d > 0, torch.round(scale / d.clamp(min=1e-30)), torch.zeros_like(scale)).clamp(0, top)
        sc = torch.where((scale > 0) & (sc == 0), torch.ones_like(sc), sc)
        m = torch.where(dmin > 0, torch.round(minimum / dmin.clamp(min=1e-30)), torch.zeros_like(minimum))
        m = m.clamp(0, top)
        return d * sc, -(dmin * m), {"d": d[:, 0], "dmin": dmin[:, 0], "sc": sc, "m": m}
    if not t.scale_bits:
        d = _half(scale)
        return d, torch.zeros_like(d), {"d": d}
    half_range = 1 << (t.scale_bits - 1)  # Q3_K: sc in -32..31, Q6_K: -128..127
    top_scale = _extreme(scale)[:, None]
    d = _half(top_scale / -half_range)
    sc = torch.where(d != 0, torch.round(scale / torch.where(d == 0, torch.ones_like(d), d)),
                     torch.zeros_like(scale)).clamp(-half_range, half_range - 1)
    return d * sc, torch.zeros_like(scale), {"d": d[:, 0], "sc": sc}


def nearest(t: GGMLType, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The code (index into ``t.values``) of the grid value nearest ``w`` (all ``[rows]``)."""
    n = len(t.values)
    safe = torch.where(a == 0, torch.ones_like(a), a)
    x = (w - b) / safe
    if t.uniform:
        q = torch.round(x - t.values[0]).clamp(0, n - 1)
    else:
        values = torch.tensor(t.values, dtype=torch.float32, device=x.device)
        q = torch.bucketize(x.contiguous(), (values[1:] + values[:-1]) / 2)  # |w - a v| = |a| |x - v|, any a
    return torch.where(a == 0, torch.full_like(q, t.zero_code), q).long()


# ============================================================================ GPTQ on the grids
@torch.no_grad()
def gptq_types(weight: torch.Tensor, H: torch.Tensor, types: list, damp: float = 0.01,
               block_size: int = 256, fit_iters: int = 2) -> list:
    """GPTQ of ``weight`` (``[out, in]``) onto each GGUF type of ``types`` (names; one column sweep,
    the types' copies stacked as rows). ``H``: the layer's Hessian, or a ``[groups, in, in]`` stack
    of per-row-group Hessians (attention-aware value projections). ``fit_iters``: rounds of least
    squares, weighted by the Hessian's diagonal, that fit each block's grid to its weights (0: the
    min-max grids, without the scale search). Returns one `GGUFWeight` per type."""
    types = [get_type(t) for t in types]
    cols = weight.shape[1]
    for t in types:
        if cols % t.block:
            raise ValueError(f"{t.name} needs rows of a multiple of {t.block} weights, got {cols} (use stored_type).")
    slices = _row_groups(weight, H) if H.dim() == 3 else [slice(None)]
    hessians = H if H.dim() == 3 else H[None]
    parts = [_sweep(weight[sl], hessians[g], types, damp, block_size, fit_iters) for g, sl in enumerate(slices)]
    out = []
    for j, t in enumerate(types):
        pieces = [p[j] for p in parts]
        fields = {k: torch.cat([p.fields[k] for p in pieces]) for k in pieces[0].fields}
        out.append(GGUFWeight(t.name, torch.cat([p.codes for p in pieces]), torch.cat([p.a for p in pieces]),
                              torch.cat([p.b for p in pieces]), fields))
    return out


def _sweep(weight, H, types, damp, block_size, fit_iters) -> list:
    W = weight.detach().float().clone()
    rows, cols = W.shape
    W[:, torch.diag(H) == 0] = 0
    n = len(types)
    WT = torch.cat([W] * n).t().contiguous()  # [cols, n * rows]
    diag = torch.diag(H).clone()  # column importance of the grids' fit (llama.cpp's imatrix)
    Hinv, _ = _inverse_hessian_cholesky(H, damp)
    QT = torch.zeros(cols, n * rows, dtype=torch.uint8, device=W.device)
    grids = [dict(a=W.new_zeros(rows, cols // t.sub), b=W.new_zeros(rows, cols // t.sub), fields=[])
             for t in types]
    values = [torch.tensor(t.values, dtype=torch.float32, device=W.device) for t in types]
    own = [slice(j * rows, (j + 1) * rows) for j in range(n)]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = WT[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[i]
            deq = torch.empty_like(w)
            for j, t in enumerate(types):
                if col % t.block == 0:  # the block's grid from the error-compensated weights
                    end = col + t.block
                    block = (torch.cat([W1[i:], WT[i2:]])[:t.block] if end > i2 else W1[i:i + t.block])[:, own[j]]
                    a, b, fields = block_grid(t, block.t(), diag[col:end], fit_iters)
                    s0 = col // t.sub
                    grids[j]["a"][:, s0:s0 + a.shape[1]] = a
                    grids[j]["b"][:, s0:s0 + a.shape[1]] = b
                    grids[j]["fields"].append(fields)
                s = col // t.sub
                a, b = grids[j]["a"][:, s], grids[j]["b"][:, s]
                q = nearest(t, w[own[j]], a, b)
                QT[col, own[j]] = q.to(torch.uint8)
                deq[own[j]] = a * values[j][q] + b
            err = (w - deq) / Hinv1[i, i]
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            Err1[i] = err
        WT[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
    out = []
    for j, t in enumerate(types):
        blocks = grids[j]["fields"]
        fields = {k: torch.stack([f[k] for f in blocks], dim=1) for k in blocks[0]}  # [rows, blocks(, subs)]
        out.append(GGUFWeight(t.name, QT[:, own[j]].t().contiguous(), grids[j]["a"], grids[j]["b"], fields))
    return out


# ============================================================================ ggml byte layouts
def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    """float16 values as little-endian bytes, ``[..., 2]``."""
    return x.to(torch.float16).contiguous().cpu().numpy().view(np.uint8).reshape(*x.shape, 2)


def _u8(x) -> np.ndarray:
    return (x.cpu().numpy() if isinstance(x, torch.Tensor) else x).astype(np.uint8)


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K's 12 bytes holding 8 six-bit scales and 8 six-bit minimums."""
    out = np.zeros((*sc.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    return out


def _planes(q: np.ndarray, width: int) -> np.ndarray:
    """Q2_K / Q3_K / Q6_K's low-bit layout: per 128 weights, ``32 * width / 8``-byte chunks where bit
    pair ``k`` of byte ``l`` of a chunk holds weight ``32 k + l`` of the chunk's 128."""
    per = 8 // width
    q = q.reshape(*q.shape[:-1], -1, per, 32)  # [..., chunks of 128, per, 32]
    out = np.zeros((*q.shape[:-2], 32), dtype=np.uint8)
    for k in range(per):
        out |= ((q[..., k, :] & ((1 << width) - 1)) << (width * k)).astype(np.uint8)
    return out.reshape(*out.shape[:-2], -1)


def pack(q: GGUFWeight) -> torch.Tensor:
    """The ggml bytes of ``q`` (``[rows, bytes per row]`` uint8), exactly what llama.cpp reads."""
    t = get_type(q.qtype)
    rows, cols = q.codes.shape
    nb = cols // t.block
    codes = q.codes.cpu().numpy().astype(np.int64).reshape(rows, nb, t.block)
    f = q.fields
    if t.block == 32:
        unsigned = codes  # index into the values: the stored code for every legacy type but Q8_0
        parts = [_f16_bytes(f["d"])]
        if t.offset:
            parts.append(_f16_bytes(f["m"]))
        if t.name in ("Q5_0", "Q5_1"):
            high = ((unsigned >> 4) & 1) << np.arange(32)
            parts.append(high.sum(-1).astype("<u4").view(np.uint8).reshape(rows, nb, 4))
        if t.name == "Q8_0":
            parts.append((codes + t.values[0]).astype(np.int8).view(np.uint8))
        else:
            lo = unsigned & 15
            parts.append((lo[..., :16] | (lo[..., 16:] << 4)).astype(np.uint8))
    elif t.name in ("Q4_K", "Q5_K"):
        sc, m = _u8(f["sc"]), _u8(f["m"])
        parts = [_f16_bytes(f["d"]), _f16_bytes(f["dmin"]), _k_scales(sc, m)]
        if t.name == "Q5_K":
            high = (codes.reshape(rows, nb, 8, 32) >> 4) & 1
            parts.append((high << np.arange(8)[:, None]).sum(-2).astype(np.uint8))
        lo = (codes & 15).reshape(rows, nb, 4, 2, 32)
        parts.append((lo[..., 0, :] | (lo[..., 1, :] << 4)).reshape(rows, nb, 128).astype(np.uint8))
    elif t.name == "Q6_K":
        halves = codes.reshape(rows, nb, 2, 2, 64)  # [.., half, low/high 64, 64]
        ql = (halves[..., 0, :] & 15) | ((halves[..., 1, :] & 15) << 4)
        parts = [ql.reshape(rows, nb, 128).astype(np.uint8), _planes(codes >> 4, 2),
                 _u8(f["sc"].to(torch.int8).cpu().numpy().view(np.uint8)), _f16_bytes(f["d"])]
    elif t.name == "Q3_K":
        raw = _u8(f["sc"].cpu().numpy() + 32)  # 16 six-bit scales
        scales = np.zeros((rows, nb, 12), dtype=np.uint8)
        scales[..., :8] = (raw[..., :8] & 15) | ((raw[..., 8:] & 15) << 4)
        for k in range(16):
            scales[..., 8 + k % 4] |= (((raw[..., k] >> 4) & 3) << (2 * (k // 4))).astype(np.uint8)
        high = (codes.reshape(rows, nb, 8, 32) >> 2) & 1
        hmask = (high << np.arange(8)[:, None]).sum(-2).astype(np.uint8)
        parts = [hmask, _planes(codes & 3, 2), scales, _f16_bytes(f["d"])]
    elif t.name == "Q2_K":
        scales = (_u8(f["sc"]) & 15) | ((_u8(f["m"]) & 15) << 4)
        parts = [scales, _planes(codes, 2), _f16_bytes(f["d"]), _f16_bytes(f["dmin"])]
    else:  # pragma: no cover - every entry of TYPES has a layout above
        raise ValueError(t.name)
    out = np.concatenate([np.asarray(p).reshape(rows, nb, -1) for p in parts], axis=-1)
    if out.shape[-1] != t.type_size:
        raise AssertionError(f"{t.name}: packed {out.shape[-1]} bytes per block, expected {t.type_size}.")
    return torch.from_numpy(np.ascontiguousarray(out.reshape(rows, nb * t.type_size)))


def dequantize(data: torch.Tensor, qtype: str, shape) -> torch.Tensor:
    """The float32 weight of ggml bytes ``data`` (``[rows, bytes per row]``), decoded by the
    ``gguf`` package (llama.cpp's own Python reader)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    rows, cols = (int(x) for x in shape)
    array = gguf_dequantize(data.cpu().numpy(), getattr(GGMLQuantizationType, qtype))
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(rows, cols)
