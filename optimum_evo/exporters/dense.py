"""Export an EvoPress model as a **plain transformers checkpoint** (no plugin needed to load it).

* depth: whole dropped blocks are already gone (config renumbered); attention-/MLP-only drops are
  written as zeroed sub-blocks (exact outputs; see `build_plain_model`) or refused
  with ``partial_drops="error"``.
* sparsity: the linears already hold exact zeros; the checkpoint is the dense model.
* quantization: packed linears are dequantized (the exact weights the search scored, in ``dtype``).

Examples:
    >>> from optimum_evo.exporters import export_dense
    >>> export_dense(model, "out/plain", tokenizer=tok)                          # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("out/plain")   # no `import optimum_evo` needed  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Exporter, register_exporter
from .common import build_plain_model, model_contents, save_tokenizer, source_tokenizer


def export_dense(model, save_dir, tokenizer=None, dtype: torch.dtype | None = None, partial_drops: str = "zero",
                 max_shard_size: str = "5GB") -> dict:
    """Write ``model`` (compressed by EvoPress, or any model) as a plain transformers checkpoint.

    Args:
        model: an EvoPress model (from ``from_pretrained(..., quantization_config=EvoPressConfig(...))``
            or reloaded with ``import optimum_evo``) or a plain one.
        save_dir: output folder (``config.json``, ``model.safetensors``, tokenizer files).
        tokenizer: tokenizer object or path saved alongside (default: the model's own folder, if any).
        dtype: dtype of the written weights (default: the model's).
        partial_drops: ``"zero"`` (attention-/MLP-only drops as zeroed sub-blocks) or ``"error"``.
        max_shard_size: as in ``save_pretrained``.

    Returns:
        A summary dict: ``format``, ``path``, ``zeroed_sub_blocks``, ``dequantized_modules``.
    """
    contents = model_contents(model)
    plain = build_plain_model(model, dtype=dtype, partial_drops=partial_drops, contents=contents)
    save_dir = Path(save_dir)
    plain.save_pretrained(save_dir, max_shard_size=max_shard_size)
    save_tokenizer(tokenizer if tokenizer is not None else source_tokenizer(model), save_dir)
    return {"format": "dense", "path": str(save_dir), "zeroed_sub_blocks": sorted(contents.dropped),
            "dequantized_modules": len(contents.quantized) + len(contents.gguf)}


class DenseExporter(Exporter):
    """Plain transformers checkpoints (`export_dense`)."""

    name = "dense"
    description = "plain transformers checkpoint: blocks removed, exact zeros, dequantized weights"
    loads_with = "AutoModelForCausalLM.from_pretrained (no plugin)"

    def export(self, model, save_dir, tokenizer=None, **kwargs) -> dict:
        return export_dense(model, save_dir, tokenizer=tokenizer, **kwargs)


register_exporter(DenseExporter())
