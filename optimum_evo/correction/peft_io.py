"""Correction adapters as standard PEFT LoRA: attach, save beside the compressed model, reload, merge.

Layout written by `save_correction` (``model_dir`` holds the compressed model):

    model_dir/                      config.json, model.safetensors, tokenizer ... (compressed model)
    model_dir/lora-correction/      adapter_config.json   (base_model_name_or_path -> model_dir)
                                    adapter_model.safetensors
                                    evopress_correction.json (method, ranks, kinds, sizes)

so every standard entry point restores compressed model + adapter:

    AutoPeftModelForCausalLM.from_pretrained("model_dir/lora-correction")
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("model_dir"), "model_dir/lora-correction")
    AutoModelForCausalLM.from_pretrained("model_dir/lora-correction")   # transformers' PEFT integration

Merging: ``peft``'s own ``merge_and_unload`` adds ``B A`` into the weight, which silently destroys a
sparsity pattern or a quantization grid. `merge_correction` does it correctly for sparse
layers (the merged weight is re-masked, so the layer keeps its exact sparsity) and refuses for
quantized layers unless ``allow_dense=True`` (the result is then an uncompressed float weight).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch

from .eora import Adapter, compressed_weight

logger = logging.getLogger(__name__)

ADAPTER_SUBFOLDER = "lora-correction"
METADATA_NAME = "evopress_correction.json"


def _lora_config(adapters: dict, ranks_are_uniform: bool, rank_pattern: dict | None = None):
    from peft import LoraConfig

    ranks = {n: a.rank for n, a in adapters.items()}
    default = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 8
    if rank_pattern is None:  # per-module ranks (clipped, or uneven): exact names
        rank_pattern = {} if ranks_are_uniform else {n.replace(".", r"\."): r for n, r in ranks.items() if r != default}
    return LoraConfig(
        r=default, lora_alpha=default, rank_pattern=dict(rank_pattern), alpha_pattern=dict(rank_pattern),
        target_modules=sorted(adapters), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        init_lora_weights=True,
    )


@torch.no_grad()
def attach_adapters(model, adapters: dict, adapter_name: str = "default"):
    """Wrap ``model`` (the compressed model) in a ``PeftModelForCausalLM`` whose LoRA layers are the
    given corrections (scaling 1: ``lora_alpha = r`` per module).

    Args:
        model: a transformers causal LM whose compressed linears are ``nn.Linear`` (or subclasses).
        adapters: ``{full module name: Adapter}`` from
            `closed_form_adapters`.

    Returns:
        the ``PeftModel`` (the base model is modified in place, as with ``get_peft_model``).

    Examples:
        >>> peft_model = attach_adapters(compressed, adapters)     # doctest: +SKIP
        >>> peft_model.print_trainable_parameters()                # doctest: +SKIP
    """
    from peft import get_peft_model

    if not adapters:
        raise ValueError("No adapters to attach: the model has no compressed linear with a non-zero residual.")
    uniform = len({a.rank for a in adapters.values()}) == 1
    config = _lora_config(adapters, uniform)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    load_adapter_weights(peft_model, adapters, adapter_name)
    return peft_model


@torch.no_grad()
def load_adapter_weights(peft_model, adapters: dict, adapter_name: str = "default") -> None:
    """Copy ``Adapter`` factors into the LoRA layers of an existing ``PeftModel``."""
    base = peft_model.get_base_model()
    for name, ad in adapters.items():
        layer = base.get_submodule(name)
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if a.shape != ad.A.shape or b.shape != ad.B.shape:
            raise ValueError(f"{name}: LoRA shapes {tuple(a.shape)}/{tuple(b.shape)} do not match the adapter's "
                             f"{tuple(ad.A.shape)}/{tuple(ad.B.shape)}.")
        a.copy_(ad.A)
        b.copy_(ad.B)
        if layer.scaling[adapter_name] != 1.0:
            raise ValueError(f"{name}: LoRA scaling is {layer.scaling[adapter_name]}, expected 1 (lora_alpha = r).")


def extract_adapters(peft_model, adapter_name: str = "default") -> dict:
    """``{full module name: Adapter}`` of a ``PeftModel``'s (or an adapter-carrying transformers
    model's) LoRA layers (scaling folded into ``B``)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            s = module.scaling[adapter_name]
            out[name] = Adapter(module.lora_A[adapter_name].weight.detach().float().clone(),
                                module.lora_B[adapter_name].weight.detach().float().clone() * s)
    return out


def adapter_bytes(peft_model, dtype: torch.dtype = torch.float16, adapter_name: str = "default") -> int:
    """Size of the adapter's tensors when stored in ``dtype``."""
    return sum(a.A.numel() + a.B.numel() for a in extract_adapters(peft_model, adapter_name).values()) * \
        torch.empty(0, dtype=dtype).element_size()


def save_correction(peft_model, model_dir, base_model_name_or_path: str | None = None,
                    subfolder: str = ADAPTER_SUBFOLDER, dtype: torch.dtype | None = torch.float16,
                    metadata: dict | None = None, adapter_name: str = "default") -> Path:
    """Save the correction adapter in ``model_dir/subfolder`` with ``base_model_name_or_path``
    pointing at the compressed model, so ``AutoPeftModelForCausalLM.from_pretrained`` restores
    compressed model + adapter.

    Args:
        peft_model: the corrected model: a ``PeftModel`` (`attach_adapters` or trained) or a
            transformers model carrying the adapter through transformers' PEFT integration.
        model_dir: folder of the saved compressed model (must hold its ``config.json``).
        base_model_name_or_path: what the adapter config points at; default the absolute path of
            ``model_dir``. Use the Hub repo id when the folder is pushed.
        dtype: storage dtype of the LoRA tensors (``None`` keeps the training dtype); float16
            halves the adapter against float32.
        metadata: extra entries for ``evopress_correction.json``.

    Returns:
        the adapter folder.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no saved model (config.json): save the compressed model first "
                                "(model.save_pretrained), then the correction beside it.")
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    if adapter_name not in (getattr(base, "peft_config", None) or {}):
        raise ValueError(f"The model carries no adapter named {adapter_name!r}.")
    from ..utils import publish_folder, staging_folder

    final = model_dir / subfolder
    out = staging_folder(final)  # a crash leaves no half-written adapter that a loader would trust
    config = copy.deepcopy(base.peft_config[adapter_name])
    config.base_model_name_or_path = base_model_name_or_path or str(model_dir.resolve())
    config.save_pretrained(str(out))
    saved = json.loads((out / "adapter_config.json").read_text())
    if isinstance(saved.get("target_modules"), list):  # peft keeps a set: write it in a reproducible order
        saved["target_modules"] = sorted(saved["target_modules"])
        (out / "adapter_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    state = get_peft_model_state_dict(base, adapter_name=adapter_name)
    state = {f"base_model.model.{k}": (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             .detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    info = {"adapter_bytes": os.path.getsize(out / "adapter_model.safetensors"),
            "ranks": {n: a.rank for n, a in extract_adapters(base, adapter_name).items()}, **(metadata or {})}
    (out / METADATA_NAME).write_text(json.dumps(info, indent=1, sort_keys=True))
    return publish_folder(out, final, last="adapter_config.json")


def adopt_adapter(peft_model):
    """The base model of ``peft_model`` (modified in place by peft), registered with transformers'
    PEFT integration: it stays a plain ``PreTrainedModel`` whose adapter ``"default"`` is active,
    as after ``model.load_adapter(...)`` (e.g. ``Trainer`` accepts it for fine-tuning the adapter).
    transformers 5.24's adapter methods (``active_adapters()``, ``disable_adapters()``, ...) need
    peft >= 0.22; with peft 0.21 use `set_correction_enabled`."""
    base = peft_model.get_base_model()
    base._hf_peft_config_loaded = True
    return base


def set_correction_enabled(model, enabled: bool = True) -> int:
    """Switch the LoRA layers of ``model`` (a ``PeftModel`` or a model carrying the correction) on
    or off, e.g. to compare with and without it; returns the number of layers switched. (Works
    with peft 0.21, which transformers 5's own ``disable_adapters()`` refuses.)

    Examples:
        >>> set_correction_enabled(model, False)   # the compressed model alone   # doctest: +SKIP
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(enabled)
    return len(layers)


def has_lora_layers(model) -> bool:
    """Whether ``model`` holds LoRA tensors (an adapter injected by peft, active or not)."""
    return any(".lora_" in name for name, _ in model.named_parameters())


def base_state_dict(model) -> dict:
    """``model``'s state dict without its LoRA tensors and with the names it has without adapters
    (``q_proj.base_layer.weight`` -> ``q_proj.weight``): what the compressed model alone saves."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def load_corrected(path, **kwargs):
    """Load compressed model + correction from an adapter folder (or a model folder holding
    ``lora-correction/``); keyword arguments go to ``AutoPeftModelForCausalLM.from_pretrained``."""
    from peft import AutoPeftModelForCausalLM

    path = Path(path)
    if not (path / "adapter_config.json").is_file() and (path / ADAPTER_SUBFOLDER / "adapter_config.json").is_file():
        path = path / ADAPTER_SUBFOLDER
    return AutoPeftModelForCausalLM.from_pretrained(str(path), **kwargs)


def read_metadata(path) -> dict:
    """The ``evopress_correction.json`` of an adapter folder (``{}`` when absent)."""
    p = Path(path) / METADATA_NAME
    return json.loads(p.read_text()) if p.is_file() else {}


def merge_rules(model) -> dict:
    """``{full module name: MERGE_MASKED | MERGE_REFUSED}`` of an EvoPress model's compressed
    linears, from its compression method and the profile in its ``quantization_config``
    (``{}`` for a model without an EvoPress record)."""
    from ..methods import get_method
    from ..record import read_record

    record = read_record(model)
    if record is None:
        return {}
    return get_method(record["compression"]).merge_rules(record.get("profile") or {})


class MergeRefusedError(ValueError):
    """Merging would leave the compressed format (quantization grid, packed codes)."""


@torch.no_grad()
def merge_correction(peft_model, kinds: dict | None = None, allow_dense: bool = False,
                     adapter_name: str = "default", rules: dict | None = None):
    """Merge the correction into the base weights *without* breaking the compression, and unload.

    * sparse layers: ``W <- (W_c + B A) * mask`` with ``mask = (W_c != 0)``: the merged layer keeps
      exactly its sparsity (the part of ``B A`` that falls on pruned weights is dropped, so a merged
      model is usually worse than base + adapter);
    * quantized layers (dequantized weights or packed codes): the merged weight is off the
      quantization grid, so this raises `MergeRefusedError` unless ``allow_dense=True``
      (the merged layer is then a plain float layer and no longer compressed);
    * layers of unknown kind are treated as quantized.

    Args:
        kinds: ``{full module name: compression method name}`` (e.g. ``"sparsity"``), for models
            without an EvoPress record; by default the rules come from the model's record
            (`merge_rules`).
        rules: ``{full module name: MERGE_MASKED | MERGE_REFUSED}`` directly.

    Returns:
        the unwrapped base model with merged weights.

    Examples:
        >>> model = merge_correction(peft_model)     # sparse model: keeps its exact sparsity  # doctest: +SKIP
    """
    from peft.tuners.lora import LoraLayer

    from ..methods import MERGE_MASKED, get_method

    base = peft_model.get_base_model()
    if rules is None:
        rules = {n: get_method(k).merge_rule for n, k in kinds.items()} if kinds is not None else merge_rules(base)
    layers = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}
    blocked = [n for n, m in layers.items() if rules.get(n) != MERGE_MASKED
               and (not allow_dense or not isinstance(getattr(m.get_base_layer(), "weight", None), torch.nn.Parameter))]
    if blocked:
        packed = [n for n in blocked if not isinstance(getattr(layers[n].get_base_layer(), "weight", None),
                                                       torch.nn.Parameter)]
        if packed:
            raise MergeRefusedError(
                f"{len(packed)} corrected layers (e.g. {packed[0]}) store packed codes; merging the float correction "
                "would need re-quantization, which would undo it. Keep the adapter separate (PeftModel) instead.")
        raise MergeRefusedError(
            f"{len(blocked)} corrected layers (e.g. {blocked[0]}) are quantized (or of unknown kind): adding B A puts "
            "their weights off the quantization grid, so the merged model would no longer be quantized. Keep the "
            "adapter separate (PeftModel), or pass allow_dense=True to get an uncompressed float model.")
    for n, layer in layers.items():
        w = layer.get_base_layer().weight
        delta = (layer.lora_B[adapter_name].weight.float() @ layer.lora_A[adapter_name].weight.float()) \
            * layer.scaling[adapter_name]
        merged = compressed_weight(layer.get_base_layer()) + delta
        if rules.get(n) == MERGE_MASKED:
            merged = merged * (w != 0)
        w.copy_(merged.to(w.dtype))
    return peft_model.unload()
