"""Rebuild the compressed model of a finished ``optimum-evo search`` run from its ``result.json``
(the base model, the found candidate and, for database methods, the level database), so it can be
exported later.

Examples:
    >>> from optimum_evo.exporters.from_result import export_result
    >>> export_result("out/q/result.json", "gptq", "out/q/export-gptq")      # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


@torch.no_grad()
def compressed_model_from_result(result, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: the base model of ``result`` (a ``result.json`` dict or path) compressed as
    the run found, by the run's compression method."""
    from ..loading import load_model, load_tokenizer
    from ..methods.registry import run_method

    if not isinstance(result, dict):
        result = json.loads(Path(result).read_text())
    model = load_model(result["model"], dtype)
    tokenizer = load_tokenizer(result["model"])
    method = run_method({**result.get("arguments", {}), "compression": result["compression"]})
    method.materialize(model, method.space_from_report(model, result), tuple(result["candidate"]))
    return model, tokenizer


def export_result(result, format: str, save_dir, **kwargs) -> dict:
    """Export the model of a search ``result`` (dict or ``result.json`` path) in ``format``."""
    from . import export

    model, tokenizer = compressed_model_from_result(result)
    return export(model, save_dir, format, tokenizer=tokenizer, **kwargs)
