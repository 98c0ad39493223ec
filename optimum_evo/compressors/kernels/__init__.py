"""CPU kernels of the packed quantized layer, compiled from ``planes.cpp`` on first use.

The kernels multiply activations with b-bit weights stored as *bit planes* (see
`optimum_evo.compressors.packed_linear`) without ever expanding the weight: decoding a token reads
``bits / 8`` bytes per weight instead of 2 (bfloat16) or 4 (float32), which is what makes a packed
model decode faster than the dense one on a memory-bound CPU. They are built once per machine by
``torch.utils.cpp_extension`` (``-O3 -march=native``: AVX-512, AVX2 or portable code; about a
minute) into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); ``make setup``
builds them ahead. Without a C++ compiler the layer falls back to dequantizing in PyTorch, and
``OPTIMUM_EVO_KERNELS=0`` turns the kernels off.

Examples:
    >>> from optimum_evo.compressors import kernels
    >>> kernels.available()                    # doctest: +SKIP
    True
    >>> kernels.isa()                          # doctest: +SKIP
    'avx512'
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("planes.cpp")
ENV_VAR = "OPTIMUM_EVO_KERNELS"

__all__ = ["available", "dequantize", "for_device", "gemv", "isa", "load"]

_lock = threading.Lock()
_state: dict = {}
_by_device: dict = {}


def _turned_off() -> bool:
    return os.environ.get(ENV_VAR, "1") in ("0", "false", "off")


def load():
    """Build (first time) and load the kernels; ``None`` when they cannot be built (the reason is
    logged once) or are turned off with ``OPTIMUM_EVO_KERNELS=0``."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        if _turned_off():
            _state["reason"] = f"turned off by {ENV_VAR}=0"
        else:
            try:
                from torch.utils.cpp_extension import load as build

                digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
                module = build(name=f"optimum_evo_planes_{digest}", sources=[str(SOURCE)],
                               extra_cflags=["-O3", "-march=native"], verbose=False)
            except Exception as e:  # no compiler, headers missing, ...: the layer dequantizes in PyTorch
                _state["reason"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                logger.warning("optimum-evo's packed-layer kernels could not be built (%s); packed layers dequantize "
                               "in PyTorch instead (slower decoding).", _state["reason"])
        _state["module"] = module
        return module


def available() -> bool:
    """Whether the kernels are built and loaded (builds them on first call)."""
    return load() is not None


def isa() -> str | None:
    """The instruction set the kernels were built for (``"avx512"``, ``"avx2"``, ``"portable"``)."""
    module = load()
    return module.isa() if module is not None else None


def gemv(x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
         group_size: int) -> torch.Tensor:
    """``x @ W.T`` for ``x`` ``[M, in]`` (float32, bfloat16 or float16) and a bit-plane weight;
    ``[M, out]`` in ``x``'s dtype. Half-precision inputs are rounded to int16 per block of 32 on AVX2 machines
    (at most ``max|x| / 65534`` off in each block, below the inputs' own rounding); float32 inputs are
    summed in float32."""
    module = load()
    if module is None:
        raise RuntimeError(f"optimum-evo's CPU kernels are not available ({_state.get('reason')}).")
    return module.gemv(x, planes, scales, zeros, bits, group_size)  # pybind: a few microseconds less than torch.ops


def dequantize(planes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, in_features: int,
               group_size: int) -> torch.Tensor:
    """The float32 weight ``[out, in]`` of a bit-plane layer."""
    load()
    return torch.ops.evopress_planes.dequantize(planes, scales, zeros, bits, in_features, group_size)


def for_device(device_type: str):
    """The kernels for tensors on ``device_type``: this module (the C++ kernels) on ``"cpu"``,
    `optimum_evo.compressors.kernels.triton_planes` on ``"cuda"``; ``None`` where neither serves (no
    compiler, no Triton, turned off with ``OPTIMUM_EVO_KERNELS=0``). Both offer ``gemv`` and
    ``dequantize`` with the same arguments.

    Examples:
        >>> from optimum_evo.compressors import kernels
        >>> kernels.for_device("meta") is None
        True
    """
    if device_type not in _by_device:  # decided once per process: every forward of every layer asks
        found = None
        if device_type == "cpu":
            found = sys.modules[__name__] if available() else None
        elif device_type == "cuda" and not _turned_off():
            from . import triton_planes

            found = triton_planes if triton_planes.available("cuda") else None
        _by_device[device_type] = found
    return _by_device[device_type]
