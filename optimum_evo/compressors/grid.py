"""Uniform affine quantization grids, per output channel and group.

A weight ``w`` of a group with scale ``s`` and zero-point ``z`` is stored as the integer code
``q = clamp(round(w / s) + z, 0, 2**bits - 1)`` and read back as ``s * (q - z)``.

Examples:
    >>> w = torch.randn(8, 256)
    >>> scale, zero = find_params(w, bits=4, sym=False)
    >>> q = quantize_codes(w, scale, zero, bits=4)
    >>> bool((dequantize_codes(q, scale, zero) - w).abs().max() <= scale.max() / 2 + 1e-6)
    True
"""

from __future__ import annotations

import torch


def find_params(w: torch.Tensor, bits: int, sym: bool = False, mse: bool = False, grid: int = 100,
                max_shrink: float = 0.8, norm: float = 2.4):
    """Scale and zero-point per row of ``w`` ([rows, cols]) for a ``bits``-bit grid.

    ``sym``: zero-point fixed at the grid middle. ``mse``: shrink the min-max range to minimise
    the ``norm``-error of the rounded row (GPTQ's ``mse`` option). ``bits`` may be a ``[rows, 1]``
    integer tensor (a bit width per row). Returns ``(scale, zero)``, each ``[rows, 1]`` float32
    (zero holds integral values).
    """
    w = w.float()
    maxq = _maxq(bits)
    xmin = w.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = w.max(dim=1, keepdim=True).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    same = (xmin == 0) & (xmax == 0)
    xmin = torch.where(same, torch.full_like(xmin, -1), xmin)
    xmax = torch.where(same, torch.ones_like(xmax), xmax)

    def params(lo, hi):
        scale = (hi - lo) / maxq
        zero = ((maxq + 1) / 2 + torch.zeros_like(scale)) if sym else torch.round(-lo / scale)
        return scale, zero

    scale, zero = params(xmin, xmax)
    if mse:
        best = torch.full((w.shape[0], 1), float("inf"), device=w.device)
        for i in range(int(max_shrink * grid)):
            p = 1 - i / grid
            s, z = params(p * xmin, p * xmax)
            err = (dequantize_codes(quantize_codes(w, s, z, bits), s, z) - w).abs_().pow_(norm).sum(1, keepdim=True)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


def _maxq(bits):
    return (2 ** bits.float() - 1) if isinstance(bits, torch.Tensor) else 2**bits - 1


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits) -> torch.Tensor:
    """Integer codes of ``w`` (``bits``: an int, or a ``[rows, 1]`` tensor of bit widths per row)."""
    q = torch.round(w / scale) + zero
    if isinstance(bits, torch.Tensor):
        return torch.minimum(q.clamp_(min=0), _maxq(bits))
    return torch.clamp(q, 0, 2**bits - 1)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)
