"""Model cards (``README.md``) of EvoPress checkpoints and of their exports, built from the record.

`model_card` writes the card of an EvoPress checkpoint with `huggingface_hub.ModelCard` /
`huggingface_hub.ModelCardData`:

* metadata: the licence of the base model (read from the embedded model's entry, the base
  model's local card or the Hub cache, never from the network), ``base_model`` and
  ``base_model_relation`` (``quantized`` for methods that pack their weights, ``pruned``
  otherwise), tags, and a ``model-index`` with the held-out evaluation of the run;
* what was compressed and how (the method's description, target, calibration, search), the
  per-layer profile (the method's summary, the picture ``profile.png`` beside the card, a table of
  every module's level), the metrics, how to load it (with the plugin, with the LoRA correction,
  without the plugin through each export format, in lm-eval) and how to cite EvoPress.

`export_card` is the card of an export (a folder that loads without the plugin). Neither card
holds a local path: `public_record` replaces the base model's folder and local text files by names
(`public_model_name`, `public_text_name`), and the Hub integration uploads that record.

Examples:
    >>> from optimum_evo.record import read_record
    >>> print(model_card(read_record(model), "me/model-evopress")[:300])    # doctest: +SKIP
    >>> write_card("out/model", read_record(model), "me/model-evopress")     # README.md + profile.png  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

from .methods import get_method

__all__ = ["CITATION", "PICTURE_NAME", "base_model_license", "export_card", "model_card", "public_model_name",
           "public_record", "public_text_name", "write_card", "write_export_card"]

PICTURE_NAME = "profile.png"
PROJECT_URL = "https://github.com/optimum-evo/optimum-evo"

CITATION = """@inproceedings{sieberling2025evopress,
  title         = {{EvoPress}: Accurate Dynamic Model Compression via Evolutionary Search},
  author        = {Sieberling, Oliver and Kuznedelev, Denis and Kurtic, Eldar and Alistarh, Dan},
  booktitle     = {Proceedings of the 42nd International Conference on Machine Learning (ICML)},
  year          = {2025},
  eprint        = {2410.14649},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2410.14649}
}"""

#: The Hub repositories the embedded models were converted from (their GGUF files quantize these).
EMBEDDED_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}
#: Licence names of the embedded models -> Hub licence identifiers.
LICENSE_IDS = {"apache-2.0": "apache-2.0", "mit": "mit", "gemma terms of use": "gemma"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_CACHE = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\]")
_ABSOLUTE = re.compile(r"^(~|/|[A-Za-z]:[\\/])")
PLUGIN_WARNING = (
    "> **Load it with the plugin.** Run `pip install optimum-evo` and `import optimum_evo` *before* "
    "`from_pretrained`. Without it, transformers warns `Unknown quantization type, got evopress` and "
    "**randomly initialises** the compressed weights: the model loads but outputs garbage. "
    "`optimum_evo.check_evopress_model(model)` raises on such a model. The same holds for lm-eval: "
    "`lm_eval --model hf` evaluates random weights, `lm_eval --model evopress` the compressed model.")


# ---------------------------------------------------------------------------- names without paths
def _embedded_name(reference: str) -> str | None:
    """The canonical embedded-model name of an alias or of its converted folder."""
    from .embedded_models import MODEL_ALIASES

    if reference.strip().lower() in MODEL_ALIASES:
        return MODEL_ALIASES[reference.strip().lower()]
    manifest = Path(reference, "optimum_evo_manifest.json")
    try:
        name = json.loads(manifest.read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError):
        return None
    return name if name in MODEL_ALIASES.values() else None


def _is_path(text: str) -> bool:
    """Whether ``text`` names a local file or folder rather than a Hub name."""
    if _ABSOLUTE.match(text) or text.startswith(("./", "../", ".\\")):
        return True
    if _HUB_ID.match(text) and not Path(text).exists():
        return False
    return Path(text).exists() or os.sep in text or "\\" in text or \
        Path(text).suffix in (".txt", ".json", ".jsonl", ".csv", ".parquet")


def public_model_name(reference) -> str | None:
    """A name of the model ``reference`` (a Hub id, an embedded model name or a local folder)
    that is not a local path: a Hub id as is; an embedded model (name or converted folder) as the
    Hub id it was converted from; a folder of the Hugging Face cache as its Hub id; any other
    folder as its last component.

    Examples:
        >>> public_model_name("org/llama-1b")
        'org/llama-1b'
        >>> public_model_name("/data/hub/models--org--llama-1b/snapshots/0123abc")
        'org/llama-1b'
        >>> public_model_name("/home/me/checkpoints/my-llama")
        'my-llama'
    """
    if reference is None or str(reference).strip() == "":
        return None
    text = os.fspath(reference) if not isinstance(reference, str) else reference
    embedded = _embedded_name(text)
    if embedded is not None:
        return EMBEDDED_HUB_IDS.get(embedded, embedded)
    cached = _HF_CACHE.search(text)
    if cached:
        return f"{cached['org']}/{cached['name']}"
    if _HUB_ID.match(text) and not Path(text).exists():
        return text
    return Path(text.rstrip("/\\")).name or None


def public_text_name(source) -> str | None:
    """A name of a calibration / evaluation text that is not a local path: built-in names and
    Hub dataset names as they are, a local file as ``<local file NAME>`` (the ``<...>`` form the
    record uses for texts it does not store)."""
    if source is None:
        return None
    text = str(source)
    from .data import BUILTIN_TEXTS

    if text in BUILTIN_TEXTS or text.startswith("<"):
        return text
    if _is_path(text):
        return f"<local file {Path(text).name}>"
    return text


def _public_value(key: str, value):
    if isinstance(value, dict):
        return {k: _public_value(k, v) for k, v in value.items() if not (k == "path" and isinstance(v, str))}
    if isinstance(value, list):
        return [_public_value(key, v) for v in value]
    if isinstance(value, str) and _ABSOLUTE.match(value) and len(value) > 1:
        return f"<local path {Path(value).name}>"
    return value


def public_record(record: dict) -> dict:
    """A copy of ``record`` without local paths, for what is pushed (``config.json``, the card):
    ``metrics["model"]`` becomes `public_model_name` (and the base model's licence, when found, is
    recorded as ``metrics["base_model_license"]``), a local ``dataset`` / ``eval_dataset`` file
    becomes ``<local file NAME>``, ``path`` entries are dropped and any other absolute path becomes
    ``<local path NAME>``. Reloading such a record needs none of them."""
    out = copy.deepcopy(record)
    metrics = out.get("metrics") or {}
    base = metrics.get("model")
    if base:
        license_id = metrics.get("base_model_license") or base_model_license(base)
        metrics["model"] = public_model_name(base)
        if license_id:
            metrics["base_model_license"] = license_id
    for key in ("dataset", "eval_dataset"):
        if isinstance(out.get(key), str):
            out[key] = public_text_name(out[key])
    evaluation = metrics.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("text"), str):
        evaluation["text"] = public_text_name(evaluation["text"])
    return {k: (_public_value(k, v) if k not in ("dataset", "eval_dataset") else v) for k, v in out.items()}


# ---------------------------------------------------------------------------- the base model's licence
def _license_id(name: str | None) -> str | None:
    if not name:
        return None
    key = str(name).strip().lower()
    return LICENSE_IDS.get(key, key.replace(" ", "-"))


def _card_license(path: Path) -> str | None:
    from huggingface_hub import ModelCard

    try:
        return ModelCard(path.read_text(encoding="utf-8")).data.to_dict().get("license")
    except Exception:  # an unreadable or metadata-free card says nothing about the licence
        return None


def base_model_license(reference) -> str | None:
    """The Hub licence identifier (``apache-2.0``, ``gemma``, ...) of the model ``reference``, or
    ``None`` when it cannot be told without the network: an embedded model's licence, the
    ``license`` of a local folder's ``README.md``, or of the ``README.md`` of a Hub model in the
    local Hugging Face cache."""
    if not reference:
        return None
    text = str(reference)
    embedded = _embedded_name(text)
    if embedded is not None:
        from .embedded_models import EMBEDDED_MODELS

        return _license_id(EMBEDDED_MODELS[embedded].license)
    if Path(text, "README.md").is_file():
        return _card_license(Path(text, "README.md"))
    if _HUB_ID.match(text):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(text, "README.md")
        except Exception:
            cached = None
        if isinstance(cached, str) and Path(cached).is_file():
            return _card_license(Path(cached))
    return None


# ---------------------------------------------------------------------------- pieces of the cards
def _level(value):
    return f"{value:.4f}".rstrip("0").rstrip(".") if isinstance(value, float) else value


def _relation(method) -> str:
    return getattr(method, "base_model_relation", None) or ("quantized" if method.packs_weights else "pruned")


def _eval_results(metrics: dict, adapter: bool) -> list:
    """``model-index`` results: the held-out perplexity and KL of the compressed model."""
    from huggingface_hub import EvalResult

    from .data import BUILTIN_TEXTS

    evaluation = metrics.get("evaluation") or {}
    row = evaluation.get("evopress+lora" if adapter and "evopress+lora" in evaluation else "evopress")
    if not isinstance(row, dict):
        return []
    text = public_text_name(evaluation.get("text")) or "held-out text"
    hub = (BUILTIN_TEXTS[text].hub or {}) if text in BUILTIN_TEXTS else {}
    dataset = dict(dataset_type=hub.get("path", text), dataset_name=BUILTIN_TEXTS[text].description
                   if text in BUILTIN_TEXTS else text, dataset_config=hub.get("name"), dataset_split=hub.get("split"),
                   dataset_args={"windows": evaluation.get("windows"), "seq_len": evaluation.get("seq_len")})
    results = []
    for key, name in (("perplexity", "Perplexity"), ("kl", "KL divergence to the dense model")):
        if isinstance(row.get(key), (int, float)):
            results.append(EvalResult(task_type="text-generation", metric_type=key if key != "kl" else "kl_divergence",
                                      metric_value=round(float(row[key]), 4), metric_name=name,
                                      source_name="optimum-evo", source_url=PROJECT_URL,
                                      **dataset))
    return results


def _metrics_lines(metrics: dict) -> list:
    lines = ["## Metrics", ""]
    search = metrics.get("search") or {}
    if isinstance(search.get("fitness_kl"), (int, float)):
        lines.append(f"Search fitness (KL to the dense model on calibration text): {search['fitness_kl']:.4f}.")
    evaluation = metrics.get("evaluation")
    if evaluation:
        lines += ["", f"Held-out evaluation on `{public_text_name(evaluation.get('text'))}` "
                      f"({evaluation.get('windows')} windows of {evaluation.get('seq_len')} tokens):", "",
                  "| model | perplexity | KL to dense |", "|---|---|---|"]
        for row, label in (("dense", "dense"), ("evopress", "evopress"),
                           ("evopress+lora", "evopress + LoRA correction")):
            if row in evaluation:
                r = evaluation[row]
                lines.append(f"| {label} | {r.get('perplexity', float('nan')):.2f} | {r.get('kl', float('nan')):.4f} |")
    elif not search:
        lines.append("No metrics were recorded.")
    return lines


def _export_rows(method, name: str) -> list:
    from .exporters import available_exporters, get_exporter

    rows = ["| format | what it writes | loads with | command |", "|---|---|---|---|"]
    for fmt in available_exporters():
        exporter = get_exporter(fmt)
        if exporter.refusal(method) is None:
            rows.append(f"| `{fmt}` | {exporter.description} | {exporter.loads_with or '-'} | "
                        f"`optimum-evo export {name} --format {fmt} export-{fmt}` |")
    return rows


def _license_lines(license_id: str | None, base: str | None) -> list:
    if license_id:
        return ["## Licence", "", f"`{license_id}`, the licence of the base model{f' ({base})' if base else ''}."]
    return ["## Licence", "", f"The licence of the base model{f' ({base})' if base else ''} applies."]


def _citation_lines() -> list:
    return ["## Citation", "", "EvoPress ([arXiv 2410.14649](https://arxiv.org/abs/2410.14649), ICML 2025):", "",
            "```bibtex", CITATION, "```"]


def target_text(record: dict, method) -> str:
    """What a run aimed at: its budget (``target_size`` / ``target_speedup``) when it searched under
    one, else ``target`` with what it means for ``method``."""
    if record.get("target_size") is not None:
        return f"{record['target_size']} (target_size: the weights' bytes as stored, or a fraction of the dense size)"
    if record.get("target_speedup") is not None:
        return f"{record['target_speedup']} (target_speedup: decode speed-up over the dense model)"
    return f"{record.get('target')} ({method.target_help})"


def _compression_lines(record: dict, method, base: str | None) -> list:
    metrics = record.get("metrics") or {}
    search = metrics.get("search") or {}
    profile = record.get("profile") or {}
    lines = [
        "## Compression", "", "| setting | value |", "|---|---|",
        f"| method | {method.description} |",
        f"| target | {target_text(record, method)} |",
        f"| base model | {base or '-'} |",
        f"| calibration | {public_text_name(record.get('dataset'))}, {record.get('num_samples')} x "
        f"{record.get('seq_len')} tokens |",
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
    return lines


def _card(data, lines: list) -> str:
    from huggingface_hub import ModelCard

    return str(ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n"))


def _base_and_license(record: dict):
    metrics = record.get("metrics") or {}
    raw = metrics.get("model") or ""
    license_id = metrics.get("base_model_license") or base_model_license(raw)
    return public_model_name(raw), license_id


# ---------------------------------------------------------------------------- the cards
def model_card(record: dict, repo_id: str | None = None, tags=None, adapter: bool = False,
               picture: str | None = None) -> str:
    """The README.md text (YAML metadata + markdown) of an EvoPress model with ``record`` (its
    ``quantization_config``); ``repo_id`` (a Hub id or folder) is the name used in the loading
    snippets; ``adapter``: the model carries a LoRA correction adapter; ``picture``: file name of
    the per-layer profile picture beside the card."""
    from huggingface_hub import ModelCardData

    method = get_method(record["compression"])
    metrics = record.get("metrics") or {}
    base, license_id = _base_and_license(record)
    card_tags = ["evopress", "optimum-evo", "compressed", method.name, _relation(method)] + \
        [t for t in (tags or []) if t]
    name = repo_id or "path/to/this/model"
    results = _eval_results(metrics, adapter)
    is_hub_id = bool(base and _HUB_ID.match(base))
    data = ModelCardData(library_name="transformers", license=license_id, tags=list(dict.fromkeys(card_tags)),
                         base_model=base if is_hub_id else None,
                         base_model_relation=_relation(method) if is_hub_id else None,
                         pipeline_tag="text-generation", model_name=name if results else None,
                         eval_results=results or None)
    lines = [
        f"# {base or 'Model'}, EvoPress {method.name} (target {record.get('target')})",
        "",
        f"Compressed with [EvoPress](https://arxiv.org/abs/2410.14649) ({method.description}) by "
        f"[optimum-evo](https://github.com/optimum-evo/optimum-evo): an evolutionary search chose the "
        f"per-layer compression levels under an exact global budget, scoring candidates by their KL "
        f"divergence to the dense model.",
        "",
        PLUGIN_WARNING,
        "",
    ]
    if picture:
        lines += [f"![Per-layer profile found by EvoPress]({picture})", ""]
    lines += [
        "## How to load",
        "",
        "With the plugin (`pip install optimum-evo`):",
        "",
        "```python",
        "import optimum_evo  # registers quant_method='evopress' with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
    ]
    if adapter:
        from .correction.peft_io import ADAPTER_SUBFOLDER

        info = metrics.get("lora_correction") or {}
        lines += ["", "### LoRA error correction", "",
                  f"`{ADAPTER_SUBFOLDER}/` holds a LoRA adapter (PEFT format; method {info.get('method', '?')}, "
                  f"rank <= {info.get('rank', '?')}, {info.get('trained_steps', 0) or 0} distillation steps) that "
                  "corrects the compression error. Load the compressed model with it:", "", "```python",
                  "import optimum_evo", "from transformers import AutoModelForCausalLM",
                  "from peft import PeftModel", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{name}")',
                  f'model = PeftModel.from_pretrained(base, "{name}", subfolder="{ADAPTER_SUBFOLDER}")', "```"]
    lines += ["", "### Without the plugin", "",
              "This folder needs optimum-evo. For runtimes without it, export it to a format they read (the "
              "export holds the same compressed weights):", ""] + _export_rows(method, name)
    lines += ["", "### Evaluate with lm-eval", "",
              "`pip install optimum-evo[lm-eval]` registers the lm-eval model `evopress`, which loads this "
              "checkpoint with the plugin" + (" and its LoRA correction" if adapter else "") + ":", "", "```bash",
              f"lm_eval --model evopress --model_args pretrained={name} --tasks hellaswag",
              f"optimum-evo eval {name} --tasks hellaswag     # the same, plus perplexity / KL on WikiText-2",
              "```", "", "Do not use `--model hf` on this checkpoint: it evaluates randomly initialised weights.", ""]
    lines += _compression_lines(record, method, base)
    lines += [""] + _metrics_lines(metrics)
    lines += ["", "The full settings, profile and metrics are in `config.json` under `quantization_config`.", ""]
    lines += _license_lines(license_id, base) + [""] + _citation_lines()
    return _card(data, lines)


def export_card(record: dict, export_format: str, repo_id: str | None = None, tags=None,
                picture: str | None = None) -> str:
    """The README.md text of an export (``export_format``, a registered format) of the EvoPress
    model with ``record``: it loads without the plugin, with what the format's exporter names."""
    from huggingface_hub import ModelCardData

    from .exporters import get_exporter

    exporter = get_exporter(export_format)
    method = get_method(record["compression"])
    metrics = record.get("metrics") or {}
    base, license_id = _base_and_license(record)
    name = repo_id or "path/to/this/model"
    is_hub_id = bool(base and _HUB_ID.match(base))
    results = _eval_results(metrics, adapter=False)
    card_tags = ["evopress", "optimum-evo", "compressed", method.name, _relation(method), exporter.name] + \
        [t for t in (tags or []) if t]
    data = ModelCardData(library_name="transformers", license=license_id, tags=list(dict.fromkeys(card_tags)),
                         base_model=base if is_hub_id else None,
                         base_model_relation=_relation(method) if is_hub_id else None,
                         pipeline_tag="text-generation", model_name=name if results else None,
                         eval_results=results or None)
    lines = [f"# {base or 'Model'}, EvoPress {method.name} (target {record.get('target')}), `{exporter.name}` export",
             "",
             f"An EvoPress model ({method.description}; [arXiv 2410.14649](https://arxiv.org/abs/2410.14649)) "
             f"exported by [optimum-evo](https://github.com/optimum-evo/optimum-evo) as {exporter.description}. "
             "It loads **without** optimum-evo.", ""]
    if picture:
        lines += [f"![Per-layer profile found by EvoPress]({picture})", ""]
    lines += ["## How to load", "", f"Loads with {exporter.loads_with or 'the runtimes of this format'}:", ""]
    lines += exporter.usage(name)
    lines += _compression_lines(record, method, base)
    lines += [""] + _metrics_lines(metrics)
    lines += ["", "The metrics are those of the EvoPress model this export was made from.", ""]
    lines += _license_lines(license_id, base) + [""] + _citation_lines()
    return _card(data, lines)


# ---------------------------------------------------------------------------- writing them
def _picture(folder: Path, picture_from) -> str | None:
    target = folder / PICTURE_NAME
    if picture_from is not None and Path(picture_from).is_file():
        if Path(picture_from).resolve() != target.resolve():
            shutil.copyfile(picture_from, target)
        return PICTURE_NAME
    return PICTURE_NAME if target.is_file() else None


def write_card(folder, record: dict, repo_id: str | None = None, tags=None, adapter: bool | None = None,
               picture_from=None) -> Path:
    """Write ``folder/README.md`` (`model_card`) and, when ``picture_from`` (the ``profile.png``
    a search wrote) is given, a copy of it beside the card, which the card shows (a
    ``folder/profile.png`` already there is shown too). ``adapter`` defaults to whether ``folder``
    holds the LoRA correction. Returns the card's path."""
    from .correction.peft_io import ADAPTER_SUBFOLDER

    folder = Path(folder)
    if adapter is None:
        adapter = (folder / ADAPTER_SUBFOLDER / "adapter_config.json").is_file()
    picture = _picture(folder, picture_from)
    path = folder / "README.md"
    path.write_text(model_card(record, repo_id or str(folder), tags=tags, adapter=adapter, picture=picture),
                    encoding="utf-8")
    return path


def write_export_card(folder, record: dict, export_format: str, repo_id: str | None = None, tags=None,
                      picture_from=None) -> Path:
    """Write ``folder/README.md`` (`export_card`) of an export, with a copy of ``picture_from``
    beside it (as `write_card`)."""
    folder = Path(folder)
    picture = _picture(folder, picture_from)
    path = folder / "README.md"
    path.write_text(export_card(record, export_format, repo_id or str(folder), tags=tags, picture=picture),
                    encoding="utf-8")
    return path
