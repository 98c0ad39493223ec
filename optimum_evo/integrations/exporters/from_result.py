"""Rebuild the compressed EvoPress model of a finished ``optimum-evo search`` run from its ``result.json``
(the base model, the found candidate / levels and the level database), so it can be exported.

Example:
    >>> from optimum_evo.integrations.exporters.from_result import export_result
    >>> export_result("out/q/result.json", "gptq", "out/q/export-gptq")      # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


@torch.no_grad()
def compressed_model_from_result(result, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: the base model of ``result`` (a ``result.json`` dict or path) compressed as
    the run found: depth stand-ins / removed blocks, sparse weights, or packed
    :class:`~optimum_evo.integrations.transformers.EvoPressQuantLinear` layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ...compressors.database import LevelDatabase
    from ...models import resolve_model
    from ...spaces.depth import DepthSpace
    from ..transformers.quantizer import apply_levels

    if not isinstance(result, dict):
        result = json.loads(Path(result).read_text())
    path = resolve_model(result["model"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    kind, args = result["compression"], result["arguments"]
    if kind == "depth":
        DepthSpace(model, args["target"], args["mode"]).compress(model, tuple(result["candidate"]))
    else:
        apply_levels(model, kind, result["levels"], LevelDatabase.open(result["database"]["path"], verify=False))
    return model, tokenizer


def export_result(result, format: str, save_dir, **kwargs) -> dict:
    """Export the model of a search ``result`` (dict or ``result.json`` path) in ``format``."""
    from . import export

    model, tokenizer = compressed_model_from_result(result)
    return export(model, save_dir, format, tokenizer=tokenizer, **kwargs)
