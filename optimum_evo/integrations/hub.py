"""Model card, ``save_pretrained`` and ``push_to_hub`` for EvoPress-compressed models.

A model compressed (or reloaded) through :class:`~optimum_evo.integrations.transformers.EvoPressConfig`
gets instance versions of ``save_pretrained`` and ``push_to_hub``:

* ``save_pretrained(dir)`` writes what transformers writes (``config.json`` with the EvoPress
  ``quantization_config``, ``model.safetensors`` with the packed tensors, ``generation_config.json``)
  plus a generated ``README.md`` model card (method, target, per-layer profile, metrics, how to load
  and what happens without the plugin).
* ``push_to_hub(repo_id)`` creates the repository, runs that ``save_pretrained`` into a temporary
  folder and uploads exactly those files in one commit (transformers' own ``push_to_hub`` would
  replace the card by a generic one fetched from the Hub).

The same functions work on any model: :func:`save_pretrained`, :func:`push_to_hub`, :func:`model_card`.

Example:
    >>> model.save_pretrained("compressed")                                # doctest: +SKIP
    >>> print(open("compressed/README.md").read()[:200])                   # doctest: +SKIP
    >>> model.push_to_hub("me/smollm2-evopress-3bit", private=True)        # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
import types
from pathlib import Path

CARD_NAME = "README.md"
WHAT = {
    "depth": "depth pruning (attention / MLP sub-blocks dropped)",
    "sparsity": "unstructured sparsity (SparseGPT levels, per-layer sparsity)",
    "quantization": "mixed-bitwidth GPTQ quantization (per-layer bit widths, packed)",
}
TARGET = {"depth": "fraction of sub-blocks dropped", "sparsity": "fraction of weights pruned",
          "quantization": "average bits per weight"}


def _evopress_config(model):
    from .transformers.config import QUANT_METHOD

    qc = getattr(model.config, "quantization_config", None)
    return qc if getattr(qc, "quant_method", None) == QUANT_METHOD else None


def model_card(model, repo_id: str | None = None, tags=None) -> str:
    """The README.md text (YAML metadata + markdown) describing an EvoPress model; ``repo_id`` (a Hub
    id or folder) is the name used in the loading snippet."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = _evopress_config(model)
    if cfg is None:
        raise ValueError("This model has no EvoPress quantization_config (it was not compressed with EvoPressConfig).")
    kind = cfg.compression
    metrics = cfg.metrics or {}
    base = metrics.get("model") or ""
    is_hub_id = base.count("/") == 1 and not os.path.exists(base)
    card_tags = ["evopress", "optimum-evo", "compressed", kind] + [t for t in (tags or []) if t]
    data = ModelCardData(library_name="transformers", tags=list(dict.fromkeys(card_tags)),
                         base_model=base if is_hub_id else None, pipeline_tag="text-generation")
    name = repo_id or "path/to/this/model"
    lines = [
        f"# {Path(base).name or 'Model'}, EvoPress {kind} (target {cfg.target})",
        "",
        f"Compressed with [EvoPress](https://arxiv.org/abs/2410.14649) ({WHAT[kind]}) by "
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
        f"| method | {WHAT[kind]} |",
        f"| target | {cfg.target} ({TARGET[kind]}) |",
        f"| base model | {base or '-'} |",
        f"| calibration | {cfg.to_dict()['dataset']}, {cfg.num_samples} x {cfg.seq_len} tokens |",
        f"| search | preset `{cfg.preset}`, {metrics.get('search', {}).get('generations', '?')} generations, "
        f"fitness {cfg.fitness} KL |",
    ]
    if kind == "quantization":
        lines.append(f"| bit widths searched | {cfg.levels}, group size {cfg.profile.get('group_size')} |")
    lines += ["", "### Per-layer profile", ""]
    for key, value in cfg.summary().items():
        lines.append(f"- **{key}**: {value}")
    if kind != "depth" and cfg.profile and cfg.profile.get("modules"):
        lines += ["", "<details><summary>level of every module</summary>", "", "| module | level |", "|---|---|"]
        lines += [f"| `{m}` | {_level(lv)} |" for m, lv in cfg.profile["modules"].items()]
        lines += ["", "</details>"]
    evaluation = metrics.get("evaluation")
    lines += ["", "## Metrics", ""]
    search = metrics.get("search", {})
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
    if _has_adapter(model):
        from ..correction.peft_io import ADAPTER_SUBFOLDER

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


def save_pretrained(model, save_directory, *args, **kwargs):
    """``model.save_pretrained`` (transformers) plus the EvoPress ``README.md`` model card.
    ``push_to_hub=True`` uploads the folder afterwards (``repo_id``, ``commit_message``,
    ``create_pr``, ``token`` as in transformers). A LoRA correction adapter attached to the model
    (``EvoPressConfig(lora_correction=...)``) goes to ``save_directory/lora-correction`` beside the
    compressed model (transformers alone would save only the adapter)."""
    from .transformers.quantizer import check_evopress_model

    check_evopress_model(model)  # never save (or push) a randomly initialised "EvoPress" model
    push = kwargs.pop("push_to_hub", False)
    hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private") if k in kwargs}
    _save_folder(model, save_directory, hub.get("repo_id") if push else None, *args, **kwargs)
    if kwargs.get("is_main_process", True) and _evopress_config(model) is not None:
        name = hub.get("repo_id", str(save_directory))
        Path(save_directory, CARD_NAME).write_text(model_card(model, name), encoding="utf-8")
    if push:
        repo_id = hub.get("repo_id", Path(save_directory).name)
        return _upload(model, save_directory, repo_id, token=kwargs.get("token"), private=hub.get("private"),
                       commit_message=hub.get("commit_message"), create_pr=hub.get("create_pr", False))
    return None


def _upload(model, folder, repo_id, token=None, private=None, commit_message=None, commit_description=None,
            create_pr=False, revision=None):
    from transformers.utils.hub import hf_api

    repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    return model._upload_modified_files(folder, repo_id, files_timestamps={}, commit_message=commit_message,
                                        token=token, create_pr=create_pr, revision=revision,
                                        commit_description=commit_description)


def push_to_hub(model, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                private: bool | None = None, token=None, revision: str | None = None, create_pr: bool = False,
                max_shard_size="50GB", tags=None):
    """Upload exactly the files :func:`save_pretrained` writes (weights, configs, model card, LoRA
    correction) to ``repo_id`` in one commit; same keyword arguments as transformers' ``push_to_hub``."""
    from .transformers.quantizer import check_evopress_model

    check_evopress_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        _save_folder(model, tmp, repo_id, max_shard_size=max_shard_size, token=token)
        if _evopress_config(model) is not None:  # the card names the repository in its loading snippet
            Path(tmp, CARD_NAME).write_text(model_card(model, repo_id, tags), encoding="utf-8")
        return _upload(model, tmp, repo_id, token=token, private=private, commit_message=commit_message,
                       commit_description=commit_description, create_pr=create_pr, revision=revision)


def _has_adapter(model) -> bool:
    return bool(getattr(model, "_hf_peft_config_loaded", False)) and "default" in (getattr(model, "peft_config", None) or {})


def _level(value):
    return f"{value:.4f}".rstrip("0").rstrip(".") if isinstance(value, float) else value


def _save_folder(model, folder, adapter_base: str | None, *args, **kwargs) -> None:
    """transformers' ``save_pretrained`` of the compressed model; an attached adapter ``"default"``
    is saved beside it in ``lora-correction/`` with ``base_model_name_or_path = adapter_base``
    (default: the folder's absolute path)."""
    from transformers import PreTrainedModel

    if not _has_adapter(model):
        PreTrainedModel.save_pretrained(model, folder, *args, **kwargs)
        return
    from ..correction.peft_io import base_state_dict, save_correction

    if getattr(model, "hf_quantizer", None) is None:
        # With a quantizer transformers ignores `state_dict` and takes the quantizer's
        # (EvoPressHfQuantizer.get_state_dict_and_metadata leaves the LoRA tensors out).
        kwargs.setdefault("state_dict", base_state_dict(model))
    model._hf_peft_config_loaded = False  # else transformers writes the adapter alone
    try:
        PreTrainedModel.save_pretrained(model, folder, *args, **kwargs)
    finally:
        model._hf_peft_config_loaded = True
    if kwargs.get("is_main_process", True):
        cfg = _evopress_config(model)
        metadata = ((cfg.metrics or {}).get("lora_correction") if cfg is not None else None) or {}
        save_correction(model, folder, base_model_name_or_path=adapter_base,
                        metadata={k: v for k, v in metadata.items() if k != "path"})


def attach_hub_methods(model) -> None:
    """Give ``model`` (an instance) the EvoPress ``save_pretrained`` / ``push_to_hub`` above."""
    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.push_to_hub = types.MethodType(push_to_hub, model)


def read_card_metadata(folder) -> dict:
    """The YAML metadata of a saved model card (for tests and tools)."""
    from huggingface_hub import ModelCard

    return ModelCard(Path(folder, CARD_NAME).read_text(encoding="utf-8")).data.to_dict()


__all__ = ["attach_hub_methods", "model_card", "push_to_hub", "read_card_metadata", "save_pretrained"]
