"""The record an EvoPress model carries: its ``quantization_config``.

A compressed model's ``config.json`` holds ``quantization_config``:

    {"quant_method": "evopress", "format_version": 2,
     "compression": "quantization", "target": 3.0, ...every EvoPressConfig setting...,
     "profile": {...what the method made, e.g. the bit width of every linear...},
     "metrics": {...search fitness, held-out perplexity and KL...}}

The settings are those of `SearchArguments` that the config takes; the profile
is what the compression method's ``materialize`` returned; the metrics come from the run report.

Examples:
    >>> record = checkpoint_record(args, profile, metrics)             # doctest: +SKIP
    >>> read_record(model)["profile"]["modules"]                       # doctest: +SKIP
"""

from __future__ import annotations

import copy

from .settings import recorded_fields
from .utils import jsonable

QUANT_METHOD = "evopress"
#: 2: settings named as in `SearchArguments` (``database_dir``, flat ``lora_*``,
#: GPTQ's ``sym`` / ``desc_act`` / ``damp_percent`` / ``mse``, ``modules_to_not_convert``).
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "READABLE_FORMATS", "checkpoint_record", "metrics_from_report",
           "read_record", "settings_record", "upgrade_record"]


def settings_record(settings) -> dict:
    """The settings part of a record (JSON-safe: a calibration text given as a list or an object is
    summarised, never stored)."""
    out = {}
    for name in recorded_fields():
        value = getattr(settings, name)
        if name in ("dataset", "eval_dataset") and not isinstance(value, (str, type(None))):
            if isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
                value = f"<list of {len(value)} texts, {sum(len(t) for t in value)} characters>"
            else:
                value = f"<{type(value).__name__}>"
        out[name] = jsonable(copy.deepcopy(value))
    return out


def checkpoint_record(settings, profile: dict | None, metrics: dict | None) -> dict:
    """The ``quantization_config`` of a compressed model (see the module docstring)."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, **settings_record(settings),
            "profile": jsonable(copy.deepcopy(profile)), "metrics": jsonable(copy.deepcopy(metrics))}


def upgrade_record(record: dict) -> dict:
    """A record of an earlier format in the current one (format 1 named ``database_dir``
    ``cache_dir``, nested the LoRA settings in ``lora_correction`` and stored packed codes as bit
    streams)."""
    record = dict(record)
    if record.get("format_version", FORMAT_VERSION) == 1:
        if "cache_dir" in record:
            record["database_dir"] = record.pop("cache_dir")
        lora = record.get("lora_correction")
        if isinstance(lora, dict):
            record["lora_correction"] = lora.get("rank", 0)
            for key in ("method", "inputs", "train_steps", "learning_rate", "param_budget"):
                if key in lora:
                    record[f"lora_{key}"] = lora[key]
        elif lora is None:
            record["lora_correction"] = 0
        if isinstance(record.get("profile"), dict):  # packed codes were bit streams, not bit planes
            record["profile"] = {**record["profile"], "qweight_layout": "stream"}
        record["format_version"] = FORMAT_VERSION
    return record


def read_record(model_or_config) -> dict | None:
    """The EvoPress record of a model (or of its config), or ``None`` when it is not an EvoPress model."""
    config = getattr(model_or_config, "config", model_or_config)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    record = qc if isinstance(qc, dict) else qc.to_dict()
    return record if record.get("quant_method") == QUANT_METHOD else None


def metrics_from_report(report: dict) -> dict:
    """The ``metrics`` of a record from a run report: search figures, the profile and the held-out
    evaluation."""
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
    return jsonable(metrics)
