"""transformers integration: ``EvoPressConfig`` and its ``HfQuantizer``.

Importing this package registers ``quant_method="evopress"`` with transformers (``import optimum_evo``
arranges that too, lazily). Registration is idempotent.

Examples:
    >>> from optimum_evo.integrations.transformers import EvoPressConfig, register
    >>> register()                     # no-op when already registered
    >>> EvoPressConfig(compression="sparsity", target=0.5).compression
    'sparsity'
"""

from .config import QUANT_METHOD, EvoPressConfig, EvoPressConfigError
from .quantizer import EvoPressHfQuantizer, EvoPressLoadError, check_evopress_model, mark_compressed

__all__ = ["EvoPressConfig", "EvoPressConfigError", "EvoPressHfQuantizer", "EvoPressLoadError", "check_evopress_model",
           "mark_compressed", "register"]


def register() -> None:
    """Register `EvoPressConfig` and `EvoPressHfQuantizer` under ``"evopress"`` with
    transformers. Safe to call repeatedly (and after ``importlib.reload``); raises if another
    package registered a different ``"evopress"`` method."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer,
    )

    for mapping, cls, decorator in ((AUTO_QUANTIZATION_CONFIG_MAPPING, EvoPressConfig, register_quantization_config),
                                    (AUTO_QUANTIZER_MAPPING, EvoPressHfQuantizer, register_quantizer)):
        existing = mapping.get(QUANT_METHOD)
        if existing is cls:
            continue
        if existing is None:
            decorator(QUANT_METHOD)(cls)
        elif (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__):
            mapping[QUANT_METHOD] = cls  # this module was reloaded
        else:
            raise RuntimeError(f"quant_method {QUANT_METHOD!r} is already registered with transformers by "
                               f"{existing.__module__}.{existing.__qualname__}; uninstall the conflicting package.")


register()
