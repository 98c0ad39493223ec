"""Loading the dense model and its tokenizer, the one way every part of optimum-evo does it.

Examples:
    >>> model = load_model("smollm2", torch.float32)        # embedded name, folder or Hub id  # doctest: +SKIP
    >>> tokenizer = load_tokenizer("smollm2")                # doctest: +SKIP
"""

from __future__ import annotations

import torch

from .embedded_models import resolve_model

__all__ = ["load_model", "load_tokenizer"]


def load_model(name_or_path, dtype: torch.dtype = torch.float32, device=None):
    """The dense causal LM at ``name_or_path`` (resolved by
    `resolve_model`) in ``dtype``, in eval mode, on ``device``
    (default: the CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(str(name_or_path)), dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_tokenizer(tokenizer_or_path):
    """A tokenizer object as is, or the tokenizer of a model folder / name."""
    if tokenizer_or_path is None or not isinstance(tokenizer_or_path, (str, bytes)) and not hasattr(
            tokenizer_or_path, "__fspath__"):
        return tokenizer_or_path
    from transformers import AutoTokenizer

    from .embedded_models import MODEL_ALIASES

    name = str(tokenizer_or_path)
    return AutoTokenizer.from_pretrained(resolve_model(name) if name.strip().lower() in MODEL_ALIASES else name)
