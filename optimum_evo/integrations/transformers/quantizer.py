"""``EvoPressHfQuantizer``: the transformers quantizer of ``quant_method="evopress"``.

Two ways in:

* ``from_pretrained(dense_path, quantization_config=EvoPressConfig(...))``: the dense weights load,
  then :meth:`EvoPressHfQuantizer._process_model_after_weight_loading` runs the EvoPress search
  (the level database is built or reused from its cache) and compresses the model in place:
  dropped blocks removed / sub-blocks replaced (depth), exact zeros written (sparsity), linears
  replaced by packed :class:`~.modules.EvoPressQuantLinear` (quantization). The found profile and
  metrics go into ``model.config.quantization_config``.
* ``from_pretrained(compressed_path)`` (after ``import optimum_evo``): the config in
  ``config.json`` carries the profile, so :meth:`_process_model_before_weight_loading` swaps the
  modules of the meta skeleton and the packed tensors load straight into them. No search runs.

Example:
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
from torch import nn
from transformers.quantizers.base import HfQuantizer

from ...modeling import DroppedAttention, DroppedMLP, find_decoder_layout
from ...spaces.depth import apply_depth_record
from .config import QUANT_METHOD, EvoPressConfig, EvoPressConfigError, _jsonable
from .modules import EvoPressQuantLinear

logger = logging.getLogger(__name__)


class EvoPressLoadError(RuntimeError):
    """An EvoPress checkpoint was loaded without the modules its profile needs (typically: without
    ``import optimum_evo``, so transformers skipped the unknown quantization method and filled the
    missing weights with random values)."""


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
        if not self.pre_quantized and isinstance(device_map, dict) and len(set(device_map.values())) > 1:
            raise ValueError("Compressing on load needs the whole model on one device (device_map='cpu', 'cuda' or "
                             "'auto' with one GPU); save the compressed model and reload it to spread it.")

    def update_dtype(self, dtype):
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"EvoPress models run in float32, bfloat16 or float16, got dtype={dtype}.")
        return dtype

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            build_compressed_skeleton(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from ..hub import attach_hub_methods

        if self.pre_quantized:
            check_evopress_model(model)
        else:
            compress_on_load(model, self.quantization_config)
        attach_hub_methods(model)
        return model

    def _dequantize(self, model, dtype=None):
        """Replace packed linears by dense ones (depth / sparsity changes stay)."""
        for name, module in list(model.named_modules()):
            if isinstance(module, EvoPressQuantLinear):
                _set_submodule(model, name, module.to_linear(dtype or module.compute_dtype))
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    def get_state_dict_and_metadata(self, model):
        """What ``save_pretrained`` writes: the compressed model's own tensors. With a LoRA correction
        attached (``lora_correction``), its LoRA tensors are left out and the wrapped layers keep
        their plain names (the adapter is saved separately, see :mod:`optimum_evo.integrations.hub`)."""
        from ...correction.peft_io import base_state_dict, has_lora_layers

        if has_lora_layers(model):
            return base_state_dict(model), {}
        return None, {}

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (LoRA) train on top of the compressed modules


# ---------------------------------------------------------------------- module surgery
def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def build_compressed_skeleton(model, config: EvoPressConfig) -> None:
    """Swap the modules of a (meta) model skeleton for the compressed ones recorded in ``config``,
    so the checkpoint's tensors load into them (used before weight loading)."""
    profile = config.profile or {}
    if config.compression == "depth":
        layout = find_decoder_layout(model)
        expected = profile.get("original_num_layers", 0) - len(profile.get("removed_layers", []))
        if len(layout) != expected:
            raise EvoPressLoadError(f"The config has {len(layout)} decoder layers but the EvoPress profile expects "
                                    f"{expected}; config.json and its quantization_config disagree.")
        apply_depth_record(model, profile)
    elif config.compression == "quantization":
        group_size, act_order = profile["group_size"], profile.get("act_order", False)
        for name, bits in profile["modules"].items():
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                raise EvoPressLoadError(f"The EvoPress profile names {name!r}, which this model does not have.") from None
            if not isinstance(linear, nn.Linear):
                raise EvoPressLoadError(f"The EvoPress profile names {name!r}, a {type(linear).__name__}, not a linear.")
            dtype = linear.weight.dtype if linear.weight is not None else None
            _set_submodule(model, name, EvoPressQuantLinear(
                linear.in_features, linear.out_features, int(bits), group_size, bias=linear.bias is not None,
                act_order=act_order, device="meta", dtype=dtype))
    # sparsity: plain linears holding zeros, nothing to swap


def check_evopress_model(model) -> EvoPressConfig | None:
    """Raise :class:`EvoPressLoadError` when ``model`` comes from an EvoPress checkpoint but lacks
    the compressed modules of its profile (loaded without ``import optimum_evo``: transformers then
    skips the unknown quantization method and randomly initialises the packed weights' places).
    Returns the model's :class:`EvoPressConfig`, or ``None`` for a model that is not an EvoPress one.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("compressed")   # forgot `import optimum_evo`  # doctest: +SKIP
        >>> import optimum_evo; optimum_evo.check_evopress_model(model)                               # doctest: +SKIP
        Traceback (most recent call last):
        EvoPressLoadError: ... was loaded without the optimum-evo plugin ...
    """
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if method != QUANT_METHOD:
        return None
    hint = ("Run `import optimum_evo` before `from_pretrained` (pip install optimum-evo); the model as loaded "
            "computes garbage.")
    if isinstance(qc, dict) or not isinstance(getattr(model, "hf_quantizer", None), EvoPressHfQuantizer):
        raise EvoPressLoadError(f"{model.name_or_path or 'This model'} is an EvoPress checkpoint but was loaded "
                                f"without the optimum-evo plugin, so transformers randomly initialised the "
                                f"compressed weights. {hint}")
    profile = qc.profile or {}
    if qc.compression == "quantization":
        for name, bits in profile.get("modules", {}).items():
            module = model.get_submodule(name)
            module = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # under LoRA
            if not isinstance(module, EvoPressQuantLinear) or module.bits != int(bits):
                raise EvoPressLoadError(f"{name} should be a {bits}-bit EvoPressQuantLinear, found {module!r}. {hint}")
            if module.scales.device.type == "meta" or not bool(module.scales.abs().sum() > 0):
                raise EvoPressLoadError(f"The packed weights of {name} were not loaded (missing from the checkpoint?).")
    elif qc.compression == "depth":
        layout = find_decoder_layout(model)
        for i in profile.get("dropped_attention", []):
            if not isinstance(getattr(layout.layers[i], layout.attn_name), DroppedAttention):
                raise EvoPressLoadError(f"The attention of layer {i} should be dropped. {hint}")
        for i in profile.get("dropped_mlp", []):
            if not isinstance(getattr(layout.layers[i], layout.mlp_name), DroppedMLP):
                raise EvoPressLoadError(f"The MLP of layer {i} should be dropped. {hint}")
    return qc


# ---------------------------------------------------------------------- search on load
def _is_plain_cpu_float32(model) -> bool:
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return False
    return all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def _load_work_model(model, path: str):
    """The float32 CPU model the search runs on: ``model`` itself when it already is one, else a
    fresh float32 load of the same checkpoint (the user's model may be bfloat16 or on a GPU)."""
    if _is_plain_cpu_float32(model):
        return model
    from transformers import AutoModelForCausalLM

    logger.info("EvoPress searches in float32 on the CPU: loading a float32 copy of %s.", path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _tokenizer(config: EvoPressConfig, path: str):
    from transformers import AutoTokenizer

    tok = config.tokenizer
    if tok is None or isinstance(tok, str):
        return AutoTokenizer.from_pretrained(tok or path)
    return tok


@torch.no_grad()
def compress_on_load(model, config: EvoPressConfig) -> None:
    """Run the search for ``model`` (just loaded, dense) and compress it in place; fill
    ``config.profile`` and ``config.metrics``. With ``config.lora_correction``, the correction
    adapter is then computed and attached through transformers' PEFT integration."""
    from ...pipeline import search_loaded
    from ...spaces.depth import DepthSpace

    path = model.name_or_path
    if not path:
        raise EvoPressConfigError("EvoPress needs the model's checkpoint path (model.name_or_path) to calibrate.")
    work = _load_work_model(model, path)
    tokenizer = _tokenizer(config, path)
    args = config.search_arguments(model=path)
    outcome = search_loaded(args, work, tokenizer, path, evaluate_models=config.evaluate)
    if work is not model:
        if config.compression == "depth":  # the depth space must be bound to the model it compresses
            outcome.space = DepthSpace(model, args.target, args.mode)
        del work
    apply_search_outcome(model, config, outcome)
    if config.lora_correction:
        from ...correction.peft_io import adopt_adapter
        from ...correction.pipeline_step import lora_correction_step

        with torch.enable_grad():  # the optional distillation trains (this function runs under no_grad)
            adopt_adapter(lora_correction_step(args, model, path, outcome.report))  # adapter "default", active
        config.metrics = _jsonable({**_metrics(outcome.report), "lora_correction": outcome.report["lora_correction"]})


@torch.no_grad()
def apply_search_outcome(model, config: EvoPressConfig, outcome) -> None:
    """Compress ``model`` in place with what a search found (:class:`optimum_evo.pipeline.SearchOutcome`)
    and record ``config.profile`` / ``config.metrics``; then :func:`mark_compressed` makes it save as
    an EvoPress checkpoint. ``outcome.space`` must be bound to ``model`` for depth."""
    report, best = outcome.report, outcome.best
    args = outcome.report["arguments"]
    if config.compression == "depth":
        record = outcome.space.compress(model, best)
        profile = {"mode": args["mode"], **record}
    else:
        profile = apply_levels(model, config.compression, outcome.space.profile(best), outcome.db)
        key = "average_bits" if config.compression == "quantization" else "sparsity"
        profile.update({k: report["profile"][k] for k in (key, "effective_bits") if k in report["profile"]})
    config.profile = _jsonable(profile)
    config.metrics = _jsonable(_metrics(report))


@torch.no_grad()
def apply_levels(model, compression: str, levels: dict, db) -> dict:
    """Put the database levels ``{module name: level}`` into ``model`` in place: packed
    :class:`EvoPressQuantLinear` layers (quantization) or the sparse weights (sparsity). Returns the
    profile recorded in the config (``modules`` and, for quantization, the grid settings)."""
    if compression == "quantization":
        settings = db.manifest["settings"]
        group_size = settings.get("group_size") or 0
        act_order = bool(settings.get("act_order", False))
        for name, bits in levels.items():
            linear = model.get_submodule(name)
            bias = linear.bias.detach() if linear.bias is not None else None
            _set_submodule(model, name, EvoPressQuantLinear.from_packed(
                db.tensors(name, int(bits)), linear.in_features, linear.out_features, int(bits), group_size,
                bias=bias, act_order=act_order, device=linear.weight.device, dtype=linear.weight.dtype))
        return {"modules": {n: int(b) for n, b in levels.items()}, "group_size": group_size, "act_order": act_order}
    for name, level in levels.items():
        linear = model.get_submodule(name)
        linear.weight.copy_(db.weight(name, level, dtype=linear.weight.dtype).to(linear.weight.device))
    return {"modules": {n: float(v) for n, v in levels.items()}}


def mark_compressed(model, config: EvoPressConfig) -> None:
    """Make a model compressed outside ``from_pretrained`` (e.g. by the command line) look like one
    loaded with ``quantization_config=config``: its config carries ``config``, it has the EvoPress
    quantizer, and ``save_pretrained`` / ``push_to_hub`` write the EvoPress checkpoint and model card."""
    from ..hub import attach_hub_methods

    model.config.quantization_config = config
    model.hf_quantizer = EvoPressHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    attach_hub_methods(model)


def _metrics(report: dict) -> dict:
    search = report["search"]
    metrics = {
        "model": report["model"],
        "search": {"fitness_kl": search["fitness"], "generations": search["generations"],
                   "candidate_tokens": search["tokens"], "seconds": round(search["seconds"], 1),
                   "search_dtype": report["search_dtype"]},
        "profile": report["profile"],
    }
    if report["results"]:
        metrics["evaluation"] = {
            **report["evaluation"],
            **{name: {k: row[k] for k in ("perplexity", "kl") if k in row} for name, row in report["results"].items()},
        }
    return metrics
