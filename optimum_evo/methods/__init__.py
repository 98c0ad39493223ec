"""The registry of compression methods.

A method (see `CompressionMethod`) owns everything specific to
one kind of compression; it is found by its name everywhere else. The built-in methods are
``depth``, ``sparsity``, ``quantization``, ``gguf`` (llama.cpp's tensor types) and
``sparse-quantization`` (a mask and a bit width on one linear), and several of them searched together
(``compression=["depth", "quantization"]``, `optimum_evo.methods.joint`); a new one is registered with
`register_method` and is then accepted by ``SearchArguments(compression=...)``,
``EvoPressConfig``, the command line and checkpoint reloading.

Examples:
    >>> from optimum_evo.methods import available_methods, get_method
    >>> available_methods()
    ['depth', 'sparsity', 'quantization', 'gguf', 'sparse-quantization']
    >>> get_method("quantization").packs_weights
    True
"""

from __future__ import annotations

from .base import MERGE_MASKED, MERGE_REFUSED, CompressedModelError, CompressionMethod, SearchSpace
from .registry import available_methods, get_method, register_method, unregister_method

__all__ = [
    "MERGE_MASKED", "MERGE_REFUSED", "CompressedModelError", "CompressionMethod", "SearchSpace",
    "available_methods", "get_method", "register_method", "unregister_method",
]

def _register_builtins() -> None:
    import importlib

    for name in ("depth", "sparsity", "quantization", "gguf", "sparse_quantization"):  # each module registers its method, in this order
        importlib.import_module(f"{__name__}.{name}")
    importlib.import_module(f"{__name__}.joint")  # several kinds searched together


_register_builtins()
