"""Shared pieces of the exporters: the plain (plugin-free) model rebuilt from an EvoPress model, and
the bookkeeping of which modules are packed / dropped. (The int32 bit-stream packing that GPTQ and
compressed-tensors share is `optimum_evo.compressors.packing.pack_int32`.)

Examples:
    >>> contents = model_contents(model)                  # doctest: +SKIP
    >>> sorted(contents.quantized)[:1], contents.dropped   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..compressors.gguf_linear import EvoPressGGUFLinear
from ..compressors.packed_linear import EvoPressQuantLinear
from ..decoder import DroppedAttention, DroppedMLP

logger = logging.getLogger(__name__)

#: ``config`` attributes that only mean something to optimum-evo (removed from exported configs).
EVOPRESS_CONFIG_KEYS = ("quantization_config",)


class ExportError(ValueError):
    """The model cannot be written in the requested format (the message says why and what to do)."""


# ---------------------------------------------------------------------- what the model holds
@dataclass
class ModelContents:
    """What an EvoPress model holds, by module name."""

    quantized: dict = field(default_factory=dict)  # name -> EvoPressQuantLinear
    dropped: dict = field(default_factory=dict)  # name -> "attention" | "mlp" (stand-in modules)
    gguf: dict = field(default_factory=dict)  # name -> EvoPressGGUFLinear (GGUF tensor types)

    def refuse_gguf(self, format: str) -> None:
        """`ExportError` when the model holds GGUF-type linears, which ``format`` cannot store."""
        if self.gguf:
            types = sorted({m.qtype for m in self.gguf.values()})
            raise ExportError(f"{len(self.gguf)} linears hold GGUF tensor types ({', '.join(types)}), which {format} "
                              "cannot store; export with 'gguf' (llama.cpp, the exact bytes) or 'dense'.")


def model_contents(model: nn.Module) -> ModelContents:
    contents = ModelContents()
    for name, module in model.named_modules():
        if isinstance(module, EvoPressQuantLinear):
            contents.quantized[name] = module
        elif isinstance(module, EvoPressGGUFLinear):
            contents.gguf[name] = module
        elif isinstance(module, DroppedAttention):
            contents.dropped[name] = "attention"
        elif isinstance(module, DroppedMLP):
            contents.dropped[name] = "mlp"
    return contents


def plain_config(model: nn.Module):
    """A copy of ``model.config`` without optimum-evo's keys (``quantization_config``, depth /
    level records), i.e. the config of the plain transformers architecture."""
    config = copy.deepcopy(model.config)
    for key in EVOPRESS_CONFIG_KEYS:
        if hasattr(config, key):
            try:
                delattr(config, key)
            except AttributeError:
                setattr(config, key, None)
    return config


def dense_state_dict(model: nn.Module, contents: ModelContents, dtype: torch.dtype | None = None,
                     skip_quantized: bool = False) -> dict:
    """``model``'s state dict with every packed linear replaced by its dequantized ``weight`` (or,
    with ``skip_quantized``, left out entirely), floating tensors cast to ``dtype``."""
    sd = model.state_dict()
    for name, module in {**contents.quantized, **contents.gguf}.items():
        for key in ("qweight", "scales", "qzeros", "g_idx", "weight"):
            sd.pop(f"{name}.{key}", None)
        if not skip_quantized:
            sd[f"{name}.weight"] = module.dequantize_weight(torch.float32)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


@torch.no_grad()
def build_plain_model(model: nn.Module, dtype: torch.dtype | None = None, partial_drops: str = "zero",
                      contents: ModelContents | None = None, keep_quantized: bool = False):
    """A plain transformers model (same class, plugin-free config) computing what ``model`` computes.

    Packed linears become dense ``nn.Linear`` holding the dequantized weight (unless
    ``keep_quantized``: then they are left out of the copy and the caller writes them itself).
    Attention-/MLP-only drops (stand-in modules) have no plain-transformers equivalent; with
    ``partial_drops="zero"`` the sub-block is kept with **all its parameters zero**, which adds
    exactly nothing to the residual stream (attention: zero values and output projection; MLP: zero
    down projection), so the outputs are unchanged but those sub-blocks take their full size. With
    ``partial_drops="error"`` such a model is refused; ``"omit"`` zeroes them as ``"zero"`` does,
    without its warning, for a caller that leaves them out of what it writes (GGUF's per-layer shapes).

    Returns ``(plain_model, state_dict_keys_skipped)``.
    """
    if partial_drops not in ("zero", "error", "omit"):
        raise ValueError(f"partial_drops must be 'zero', 'error' or 'omit', got {partial_drops!r}.")
    from transformers.initialization import no_init_weights

    contents = contents or model_contents(model)
    if contents.dropped and partial_drops == "error":
        raise ExportError(
            f"{len(contents.dropped)} attention-/MLP-only drops ({', '.join(sorted(contents.dropped)[:4])}"
            f"{', ...' if len(contents.dropped) > 4 else ''}) cannot be expressed in plain transformers (no model "
            "class can skip only the attention or only the MLP of a block). Export with partial_drops='zero' "
            "(exact outputs; those sub-blocks keep their size, as zeros), search with mode='block' (whole blocks "
            "only), or keep the EvoPress format (save_pretrained, loads with `import optimum_evo`).")
    if contents.dropped and partial_drops == "zero":
        logger.warning("Exporting %d attention-/MLP-only drops as zeroed sub-blocks (exact outputs, no size saving "
                       "for them): plain transformers cannot skip half a block.", len(contents.dropped))
    dtype = dtype or _model_dtype(model)
    sd = dense_state_dict(model, contents, dtype, skip_quantized=keep_quantized)
    config = plain_config(model)
    with no_init_weights():
        plain = type(model)(config)
    plain.to(dtype)
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    if unexpected:
        raise ExportError(f"The EvoPress model has tensors the plain {type(model).__name__} does not: {unexpected[:5]}.")
    # Non-persistent buffers (rotary inv_freq, ...) are not in the state dict: copy them by name.
    source_buffers = dict(model.named_buffers())
    for name, buf in plain.named_buffers():
        if name in source_buffers and source_buffers[name].shape == buf.shape:
            buf.copy_(source_buffers[name])
    allowed = tuple(f"{prefix}." for prefix in contents.dropped)
    quantized = tuple(f"{name}.weight" for name in {**contents.quantized, **contents.gguf}) if keep_quantized else ()
    tied = set(_tied_keys(plain))
    left = [k for k in missing if not k.startswith(allowed) and k not in quantized and k not in tied]
    if left:
        raise ExportError(f"Could not fill {left[:5]} of the plain {type(model).__name__} from the EvoPress model.")
    for prefix in contents.dropped:
        for p in plain.get_submodule(prefix).parameters():
            p.zero_()
    plain.tie_weights()
    plain.eval()
    return plain


def _tied_keys(model) -> list:
    keys = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or []
    return list(keys.keys()) if isinstance(keys, dict) else list(keys)


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def save_tokenizer(tokenizer, save_dir) -> None:
    if tokenizer is None:
        return
    from ..loading import load_tokenizer

    load_tokenizer(tokenizer).save_pretrained(save_dir)


def source_tokenizer(model):
    """The tokenizer folder of ``model`` (its ``name_or_path``) when it has one, else ``None``."""
    from pathlib import Path

    path = getattr(model, "name_or_path", None)
    if path and Path(path, "tokenizer_config.json").exists():
        return str(path)
    return None


def save_quantized(plain: nn.Module, save_dir, qconfig: dict, model: nn.Module, tokenizer=None,
                   max_shard_size="5GB"):
    """Save the plain model (packed tensors in its state dict), put ``qconfig`` into its
    ``config.json`` as ``quantization_config``, and save the tokenizer (``model``'s own by default)."""
    import json
    from pathlib import Path

    save_dir = Path(save_dir)
    plain.save_pretrained(save_dir, max_shard_size=max_shard_size)
    config_path = save_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = qconfig
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_tokenizer(tokenizer if tokenizer is not None else source_tokenizer(model), save_dir)
    return save_dir
