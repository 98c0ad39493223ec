"""optimum-evo: EvoPress evolutionary dynamic compression for Hugging Face models.

``import optimum_evo`` registers ``quant_method="evopress"`` with transformers (lazily: right away
if transformers' quantizers are loaded, else when they are), so ``from_pretrained`` accepts an
`EvoPressConfig` and reloads EvoPress checkpoints.

Examples:
    >>> from optimum_evo import SearchArguments, run_search
    >>> report = run_search(SearchArguments(model="smollm2", target=0.25, output_dir="out"))  # doctest: +SKIP
    >>> from transformers import AutoModelForCausalLM
    >>> from optimum_evo import EvoPressConfig
    >>> model = AutoModelForCausalLM.from_pretrained(
    ...     "path/to/model", quantization_config=EvoPressConfig(compression="quantization", target=3.0))  # doctest: +SKIP
"""

import importlib

from .version import __version__

_LAZY = {
    "embedded_model_path": "optimum_evo.embedded_models",
    "resolve_model": "optimum_evo.embedded_models",
    "SearchArguments": "optimum_evo.settings",
    "run_search": "optimum_evo.pipeline",
    "register_method": "optimum_evo.methods",
    "get_method": "optimum_evo.methods",
    "register_exporter": "optimum_evo.exporters",
    "export": "optimum_evo.exporters",
    "EvoPressQuantLinear": "optimum_evo.compressors.packed_linear",
    "EvoPressConfig": "optimum_evo.integrations.transformers",
    "EvoPressHfQuantizer": "optimum_evo.integrations.transformers",
    "EvoPressLoadError": "optimum_evo.integrations.transformers",
    "check_evopress_model": "optimum_evo.integrations.transformers",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    # Lazy: `import optimum_evo.search` must not pull in torch / transformers.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optimum_evo' has no attribute {name!r}")


from .integrations import transformers_hook as _transformers_hook  # noqa: E402  (torch-free)

_transformers_hook.install()
