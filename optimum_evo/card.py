"""The model card (``README.md``) of an EvoPress checkpoint, built from its record.

The card says what was compressed and how (the method's description, target, calibration,
search), the per-layer profile (the method's summary and, for per-linear levels, a table), the
held-out metrics, how to load the model (and that it needs the plugin), and, when the model carries
one, how to load the LoRA correction adapter.

Examples:
    >>> from optimum_evo.record import read_record
    >>> print(model_card(read_record(model), "me/model-evopress")[:300])    # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

from .methods import get_method

__all__ = ["model_card"]


def _level(value):
    return f"{value:.4f}".rstrip("0").rstrip(".") if isinstance(value, float) else value


def model_card(record: dict, repo_id: str | None = None, tags=None, adapter: bool = False) -> str:
    """The README.md text (YAML metadata + markdown) of an EvoPress model with ``record`` (its
    ``quantization_config``); ``repo_id`` (a Hub id or folder) is the name used in the loading
    snippet; ``adapter``: the model carries a LoRA correction adapter."""
    from huggingface_hub import ModelCard, ModelCardData

    method = get_method(record["compression"])
    metrics = record.get("metrics") or {}
    profile = record.get("profile") or {}
    base = metrics.get("model") or ""
    is_hub_id = base.count("/") == 1 and not os.path.exists(base)
    card_tags = ["evopress", "optimum-evo", "compressed", method.name] + [t for t in (tags or []) if t]
    data = ModelCardData(library_name="transformers", tags=list(dict.fromkeys(card_tags)),
                         base_model=base if is_hub_id else None, pipeline_tag="text-generation")
    name = repo_id or "path/to/this/model"
    search = metrics.get("search", {})
    lines = [
        f"# {Path(base).name or 'Model'}, EvoPress {method.name} (target {record.get('target')})",
        "",
        f"Compressed with [EvoPress](https://arxiv.org/abs/2410.14649) ({method.description}) by "
        f"[optimum-evo](https://github.com/optimum-evo/optimum-evo): an evolutionary search chose the "
        f"per-layer compression levels under an exact global budget, scoring candidates by their KL "
        f"divergence to the dense model.",
        "",
        "> **Load it with the plugin.** Run `pip install optimum-evo` and `import optimum_evo` *before* "
        "`from_pretrained`. Without it, transformers warns `Unknown quantization type, got evopress` and "
        "**randomly initialises** the compressed weights: the model loads but outputs garbage. "
        "`optimum_evo.check_evopress_model(model)` raises on such a model.",
        "",
        "## How to load",
        "",
        "```python",
        "import optimum_evo  # registers quant_method='evopress' with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        "## Compression",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | {method.description} |",
        f"| target | {record.get('target')} ({method.target_help}) |",
        f"| base model | {base or '-'} |",
        f"| calibration | {record.get('dataset')}, {record.get('num_samples')} x {record.get('seq_len')} tokens |",
        f"| search | preset `{record.get('preset')}`, {search.get('generations', '?')} generations, "
        f"fitness {record.get('fitness')} KL |",
    ]
    lines += [f"| {key} | {value} |" for key, value in method.card_rows(record)]
    lines += ["", "### Per-layer profile", ""]
    for key, value in method.summary(profile).items():
        lines.append(f"- **{key}**: {value}")
    if profile.get("modules"):
        lines += ["", "<details><summary>level of every module</summary>", "", "| module | level |", "|---|---|"]
        lines += [f"| `{m}` | {_level(lv)} |" for m, lv in profile["modules"].items()]
        lines += ["", "</details>"]
    evaluation = metrics.get("evaluation")
    lines += ["", "## Metrics", ""]
    if search:
        lines.append(f"Search fitness (KL to the dense model on calibration text): {search.get('fitness_kl'):.4f}.")
    if evaluation:
        lines += ["", f"Held-out evaluation on `{evaluation.get('text')}` ({evaluation.get('windows')} windows of "
                      f"{evaluation.get('seq_len')} tokens):", "", "| model | perplexity | KL to dense |", "|---|---|---|"]
        for row, label in (("dense", "dense"), ("evopress", "evopress"),
                           ("evopress+lora", "evopress + LoRA correction")):
            if row in evaluation:
                r = evaluation[row]
                lines.append(f"| {label} | {r.get('perplexity', float('nan')):.2f} | {r.get('kl', float('nan')):.4f} |")
    if adapter:
        from .correction.peft_io import ADAPTER_SUBFOLDER

        info = metrics.get("lora_correction") or {}
        lines += ["", "## LoRA error correction", "",
                  f"`{ADAPTER_SUBFOLDER}/` holds a LoRA adapter (PEFT format; method {info.get('method', '?')}, "
                  f"rank <= {info.get('rank', '?')}, {info.get('trained_steps', 0) or 0} distillation steps) that "
                  "corrects the compression error. Load the compressed model with it:", "", "```python",
                  "import optimum_evo", "from transformers import AutoModelForCausalLM", "from peft import PeftModel", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{name}")',
                  f'model = PeftModel.from_pretrained(base, "{name}", subfolder="{ADAPTER_SUBFOLDER}")', "```"]
    lines += ["", "The full settings, profile and metrics are in `config.json` under `quantization_config`.", ""]
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines))
    return str(card)
