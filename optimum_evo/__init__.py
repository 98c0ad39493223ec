"""optimum-evo: EvoPress evolutionary dynamic compression for Hugging Face models.

Example:
    >>> from optimum_evo import SearchArguments, run_search
    >>> report = run_search(SearchArguments(model="smollm2", target=0.25, output_dir="out"))  # doctest: +SKIP
"""

import importlib

__version__ = "0.1.0.dev0"

_LAZY = {
    "embedded_model_path": "optimum_evo.models",
    "resolve_model": "optimum_evo.models",
    "SearchArguments": "optimum_evo.pipeline",
    "run_search": "optimum_evo.pipeline",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    # Lazy: `import optimum_evo.search` must not pull in torch / transformers.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optimum_evo' has no attribute {name!r}")
