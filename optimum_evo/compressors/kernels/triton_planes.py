"""GPU kernels of the packed quantized layer, written in Triton, for the bit-plane layout.

The same two operations as the CPU kernels (`optimum_evo.compressors.kernels`), with the same
arguments, so `optimum_evo.compressors.packed_linear.EvoPressQuantLinear` serves every width 1..8
on a CUDA device from the checkpoint's own packed buffers, without repacking:

* `gemv`: ``x @ W.T`` for a few rows of activations (decoding), reading ``bits / 8`` bytes per
  weight; every program dequantizes a tile of output rows in registers and never writes the dense
  weight;
* `dequantize`: the float32 weight ``[out, in]`` (prefill: one transient dense copy of the layer,
  then cuBLAS), bit-identical to the level database's decoded weight.

Triton ships with the CUDA builds of PyTorch; without it (or without a GPU) the layer dequantizes in
PyTorch. The kernels are compiled on first use. With ``TRITON_INTERPRET=1`` Triton runs them on CPU
tensors in its interpreter, which is how the test suite checks them on machines without a GPU.

Examples:
    >>> import torch
    >>> from optimum_evo.compressors.kernels import triton_planes
    >>> triton_planes.available()                 # doctest: +SKIP
    True
    >>> y = triton_planes.gemv(x, planes, scales, zeros, bits=3, group_size=128)   # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["available", "dequantize", "gemv", "interpreted"]

def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``: CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available(device_type: str = "cuda") -> bool:
    """Whether the kernels can run on tensors of ``device_type``: Triton is installed and the device is
    CUDA, or the device is the CPU and Triton's interpreter is on."""
    if not _installed():
        return False
    if interpreted():
        return device_type == "cpu"
    return device_type == "cuda" and torch.cuda.is_available()


def _kernels():
    """The jitted kernels module (imported on first use; imported again when ``TRITON_INTERPRET``
    changed, since ``triton.jit`` reads it when it decorates)."""
    import importlib

    from . import _triton_jit

    if _triton_jit.INTERPRETED != interpreted():
        _triton_jit = importlib.reload(_triton_jit)
    return _triton_jit


def _check(planes, scales, zeros, bits: int, in_features: int, group_size: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}.")
    if in_features % 32 or group_size % 32:
        raise ValueError(f"the bit-plane layout needs in_features and group_size multiples of 32, got "
                         f"{in_features} and {group_size}.")
    out = scales.shape[0]
    if planes.numel() != out * in_features * bits // 8:
        raise ValueError(f"planes hold {planes.numel()} bytes, a {out} x {in_features} {bits}-bit weight needs "
                         f"{out * in_features * bits // 8}.")


#: output rows and input columns of a kernel's tile
BLOCK_N, BLOCK_K = 32, 128


def _launch(name: str, grid_k: int, planes, scales, zeros, first, out, n_in: int, bits: int, group_size: int):
    """Run kernel ``name`` over the output rows (axis 0) and ``grid_k`` programs on axis 1, with
    ``first`` (if any) before the layer's buffers and ``out`` after them, as the kernels take them."""
    jit = _kernels()
    n_out, n_groups = scales.shape
    buffers = (planes.contiguous().view(torch.int32), scales.contiguous(), zeros.contiguous())
    getattr(jit, name)[(jit.triton.cdiv(n_out, BLOCK_N), grid_k)](
        *first, *buffers, out, n_out, n_in, n_groups, BITS=bits, GROUP=group_size, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


def gemv(x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
         group_size: int) -> torch.Tensor:
    """``x @ W.T`` for ``x`` ``[M, in]`` and a bit-plane weight, summed in float32; ``[M, out]`` in
    ``x``'s dtype."""
    dtype = x.dtype
    x = x.float().contiguous()
    rows, n_in = x.shape
    _check(planes, scales, zeros, bits, n_in, group_size)
    y = torch.empty(rows, scales.shape[0], dtype=torch.float32, device=x.device)
    y = _launch("gemv_kernel", rows, planes, scales, zeros, (x,), y, n_in, bits, group_size)
    return y if dtype == torch.float32 else y.to(dtype)


def dequantize(planes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, in_features: int,
               group_size: int) -> torch.Tensor:
    """The float32 weight ``[out, in]`` of a bit-plane layer."""
    _check(planes, scales, zeros, bits, in_features, group_size)
    out = torch.empty(scales.shape[0], in_features, dtype=torch.float32, device=planes.device)
    return _launch("dequantize_kernel", -(-in_features // BLOCK_K), planes, scales, zeros, (), out, in_features,
                   bits, group_size)
