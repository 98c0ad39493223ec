"""``EvoPressHfQuantizer``: the transformers quantizer of ``quant_method="evopress"``, a thin adapter
over `optimum_evo.pipeline` (search and compress) and `optimum_evo.checkpoint` (the
checkpoint format).

Two ways in:

* ``from_pretrained(dense_path, quantization_config=EvoPressConfig(...))``: the dense weights load,
  then `EvoPressHfQuantizer._process_model_after_weight_loading` runs the EvoPress search
  (`optimum_evo.pipeline.compress`) and compresses the model in place. The found profile and
  metrics go into ``model.config.quantization_config``.
* ``from_pretrained(compressed_path)`` (after ``import optimum_evo``): the config in
  ``config.json`` carries the profile, so `_process_model_before_weight_loading` swaps the
  modules of the meta skeleton (`optimum_evo.checkpoint.build_skeleton`) and the packed
  tensors load straight into them. No search runs.

Examples:
    >>> import optimum_evo
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained(
    ...     "path/to/model", quantization_config=optimum_evo.EvoPressConfig(compression="depth", target=0.25))  # doctest: +SKIP
    >>> model.save_pretrained("compressed")                                    # doctest: +SKIP
    >>> again = AutoModelForCausalLM.from_pretrained("compressed")              # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers.quantizers.base import HfQuantizer

from ... import checkpoint
from ...checkpoint import EvoPressLoadError, check_evopress_model
from ...compressors.offload import onload_from_host
from ...compressors.packed_linear import EvoPressQuantLinear
from ...methods import CompressedModelError
from .config import EvoPressConfig, EvoPressConfigError

logger = logging.getLogger(__name__)

__all__ = ["EvoPressHfQuantizer", "EvoPressLoadError", "check_evopress_model", "compress_on_load", "mark_compressed"]


class EvoPressHfQuantizer(HfQuantizer):
    """Runs the EvoPress search on load (dense checkpoint) or rebuilds the compressed modules
    (EvoPress checkpoint). See the module docstring."""

    requires_calibration = False
    quantization_config: EvoPressConfig

    def __init__(self, quantization_config: EvoPressConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if self.pre_quantized and not quantization_config.is_compressed:
            raise EvoPressConfigError(
                "This checkpoint's config.json has an 'evopress' quantization_config without a profile: it was "
                "saved before any search ran. Load the dense model with quantization_config=EvoPressConfig(...).")
        if not self.pre_quantized:
            # Do not write the found profile into the caller's object (it may be reused for another model).
            self.quantization_config = copy.copy(quantization_config)
            self.quantization_config.profile = None
            self.quantization_config.metrics = None

    # ------------------------------------------------------------------ transformers hooks
    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("EvoPress models cannot be offloaded to disk; use device_map='cpu', 'cuda' or 'auto'.")

    def update_dtype(self, dtype):
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"EvoPress models run in float32, bfloat16 or float16, got dtype={dtype}.")
        return dtype

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            try:
                checkpoint.build_skeleton(model, self.quantization_config.to_dict())
            except CompressedModelError as e:
                raise EvoPressLoadError(str(e)) from None
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from ..hub import attach_hub_methods

        if self.pre_quantized:
            checkpoint.finalize_loaded(model, self.quantization_config.to_dict())
            check_evopress_model(model)
        else:
            compress_on_load(model, self.quantization_config)
        attach_hub_methods(model)
        return model

    def _dequantize(self, model, dtype=None):
        """Replace packed linears by dense ones (depth / sparsity changes stay)."""
        for name, module in list(model.named_modules()):
            if isinstance(module, EvoPressQuantLinear):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child,
                        module.to_linear(dtype or module.compute_dtype))
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    def get_state_dict_and_metadata(self, model):
        """What ``save_pretrained`` writes: the compressed model's own tensors as the checkpoint stores
        them (`optimum_evo.checkpoint.checkpoint_state_dict`: LoRA tensors left out, the adapter is
        saved separately; sparse weights as bitmask + values)."""
        return checkpoint.checkpoint_state_dict(model, self.quantization_config.to_dict()), {}

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (LoRA) train on top of the compressed modules


OFFLOAD_FIX = ("load the model with a device_map without 'disk' entries (offloading to host memory, 'cpu', works), "
               "or compress on one device with device_map='cpu' and reload the saved model with the device map you want")


def _offloaded_modules(model) -> list:
    """Names of the modules whose weights are still outside the module (meta tensors)."""
    return [name for name, module in model.named_modules()
            if any(p.is_meta for p in module.parameters(recurse=False))]


@torch.no_grad()
def compress_on_load(model, config: EvoPressConfig) -> None:
    """Run the search for ``model`` (just loaded, dense) and compress it in place; fill
    ``config.profile`` and ``config.metrics``. With ``config.lora_correction``, the correction
    adapter is then computed and attached through transformers' PEFT integration.

    The search runs where the model is, in its dtype: the teacher cache, the KL objective, the level
    database and the evaluation run on the model's device (float32 only for the reductions and the
    Hessian algebra). A model spread over several GPUs by ``device_map`` is searched as it is
    (accelerate's hooks move the activations between them). Blocks offloaded to host memory (a
    ``device_map`` with ``"cpu"`` entries next to GPUs, as ``"auto"`` makes for a model larger than
    its GPUs) get their weights back as host-memory parameters that move to the GPU for the time of
    their forward (`optimum_evo.compressors.offload.onload_from_host`), so the search can write its
    levels into them; the compressed blocks stay offloaded. Weights offloaded to disk are refused.
    On a CPU, ``search_dtype="auto"`` may score a copy in the faster of float32 and bfloat16; the
    memory estimate printed before the run lists it."""
    from ...loading import load_tokenizer
    from ...pipeline import compress

    path = model.name_or_path
    if not path:
        raise EvoPressConfigError("EvoPress needs the model's checkpoint path (model.name_or_path) to calibrate.")
    onloaded = onload_from_host(model)
    if onloaded:
        logger.info("Searching with %d modules offloaded to host memory (%s ...): each moves to its execution device "
                    "for the time of its forward.", len(onloaded), onloaded[0])
    offloaded = _offloaded_modules(model)
    if offloaded:
        raise ValueError(f"Compressing on load cannot search a model whose weights are not in memory ({len(offloaded)} "
                         f"modules, e.g. {offloaded[0]!r}, hold meta tensors): {OFFLOAD_FIX}.")
    ctx = compress(config.search_arguments(model=path), model, load_tokenizer(config.tokenizer or path), path)
    config.profile = ctx.record["profile"]
    config.metrics = ctx.record["metrics"]


def mark_compressed(model, config: EvoPressConfig) -> None:
    """Make a model compressed outside ``from_pretrained`` (e.g. by `optimum_evo.pipeline.run`)
    look like one loaded with ``quantization_config=config``: its config carries ``config``, it has
    the EvoPress quantizer, and ``save_pretrained`` / ``push_to_hub`` write the EvoPress checkpoint
    and model card."""
    from ..hub import attach_hub_methods

    model.config.quantization_config = config
    model.hf_quantizer = EvoPressHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    attach_hub_methods(model)
