"""The Triton kernels of `optimum_evo.compressors.kernels.triton_planes` (imported only when they run:
importing this module needs Triton)."""

import os

import triton
import triton.language as tl

#: whether these kernels were decorated for Triton's interpreter
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _tile(planes, scales, zeros, rows, k0, row_mask, n_in, n_groups,
          BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequantized float32 weights of output rows ``rows`` (``[BLOCK_N]``) and input columns
    ``k0 .. k0 + BLOCK_K`` (``k0`` a multiple of 32), ``[BLOCK_N, BLOCK_K]``, zero past the edges.

    Each 32-column block of a row is ``BITS`` words (word ``j``: bit ``j`` of the 32 codes): a word is
    loaded once and spread over its 32 lanes, and a block's scale and zero-point once (a group
    is a whole number of blocks)."""
    KB: tl.constexpr = BLOCK_K // 32
    blocks = k0 // 32 + tl.arange(0, KB)
    lane = tl.arange(0, 32)
    mask = row_mask[:, None] & (blocks < n_in // 32)[None, :]  # [BLOCK_N, KB]
    word = planes + (rows[:, None] * (n_in // 32) + blocks[None, :]) * BITS
    codes = tl.zeros((BLOCK_N, KB, 32), dtype=tl.int32)
    for j in tl.static_range(BITS):
        w = tl.load(word + j, mask=mask, other=0)
        codes |= ((w[:, :, None] >> lane[None, None, :]) & 1) << j
    g = (blocks * 32) // GROUP
    index = rows[:, None] * n_groups + g[None, :]
    s = tl.load(scales + index, mask=mask, other=0.0).to(tl.float32)
    bit = index * BITS  # the zero-points: a bit stream, LSB first, `BITS` bits each
    byte = bit >> 3
    b0 = tl.load(zeros + byte, mask=mask, other=0).to(tl.int32)
    b1 = tl.load(zeros + byte + 1, mask=mask & (BITS + (bit & 7) > 8), other=0).to(tl.int32)
    z = ((b0 | (b1 << 8)) >> (bit & 7)) & ((1 << BITS) - 1)
    w = s[:, :, None] * (codes.to(tl.float32) - z.to(tl.float32)[:, :, None])
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def gemv_kernel(x, planes, scales, zeros, y, n_out, n_in, n_groups,
                BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y[m] = W @ x[m]`` for the output rows of this program (axis 0) and the input row ``m`` (axis 1)."""
    m = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_out
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x + m * n_in + cols, mask=cols < n_in, other=0.0)
        w = _tile(planes, scales, zeros, rows, k0, row_mask, n_in, n_groups, BITS, GROUP, BLOCK_N, BLOCK_K)
        acc += tl.sum(w * xv[None, :], axis=1)
    tl.store(y + m * n_out + rows, acc, mask=row_mask)


@triton.jit
def dequantize_kernel(planes, scales, zeros, out, n_out, n_in, n_groups,
                      BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The float32 weight tile of this program (output rows on axis 0, input columns on axis 1)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    w = _tile(planes, scales, zeros, rows, k0, rows < n_out, n_in, n_groups, BITS, GROUP, BLOCK_N, BLOCK_K)
    tl.store(out + rows[:, None] * n_in + cols[None, :], w, mask=(rows[:, None] < n_out) & (cols[None, :] < n_in))
