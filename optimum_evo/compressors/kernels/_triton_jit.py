"""The Triton kernels of `optimum_evo.compressors.kernels.triton_planes` (imported only when they run:
importing this module needs Triton)."""

import os

import triton
import triton.language as tl

#: whether these kernels were decorated for Triton's interpreter
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _tile(planes, scales, zeros, rows, cols, row_mask, col_mask, n_in, n_groups,
          BITS: tl.constexpr, GROUP: tl.constexpr):
    """Dequantized float32 weights of ``rows`` x ``cols`` (2-D index tensors)."""
    block = cols // 32
    lane = cols % 32
    mask = row_mask & col_mask
    word = planes + (rows * (n_in // 32) + block) * BITS
    codes = tl.zeros(mask.shape, dtype=tl.int32)
    for j in tl.static_range(BITS):
        w = tl.load(word + j, mask=mask, other=0)
        codes |= ((w >> lane) & 1) << j
    g = cols // GROUP
    s = tl.load(scales + rows * n_groups + g, mask=mask, other=0.0).to(tl.float32)
    bit = (rows * n_groups + g) * BITS  # the zero-points: a bit stream, LSB first, `BITS` bits each
    byte = bit >> 3
    b0 = tl.load(zeros + byte, mask=mask, other=0).to(tl.int32)
    b1 = tl.load(zeros + byte + 1, mask=mask & (BITS + (bit & 7) > 8), other=0).to(tl.int32)
    z = ((b0 | (b1 << 8)) >> (bit & 7)) & ((1 << BITS) - 1)
    return s * (codes.to(tl.float32) - z.to(tl.float32))

@triton.jit
def gemv_kernel(x, planes, scales, zeros, y, n_out, n_in, n_groups,
                BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_out
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < n_in
        xv = tl.load(x + m * n_in + cols, mask=col_mask, other=0.0)
        w = _tile(planes, scales, zeros, rows[:, None], cols[None, :], row_mask[:, None], col_mask[None, :],
                  n_in, n_groups, BITS, GROUP)
        acc += tl.sum(w * xv[None, :], axis=1)
    tl.store(y + m * n_out + rows, acc, mask=row_mask)

@triton.jit
def dequantize_kernel(planes, scales, zeros, out, n_out, n_in, n_groups,
                      BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows[:, None] < n_out
    col_mask = cols[None, :] < n_in
    w = _tile(planes, scales, zeros, rows[:, None], cols[None, :], row_mask, col_mask, n_in, n_groups,
              BITS, GROUP)
    tl.store(out + rows[:, None] * n_in + cols[None, :], w, mask=row_mask & col_mask)
