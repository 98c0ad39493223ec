"""``EvoPressConfig``: the ``quantization_config`` that runs an EvoPress search inside ``from_pretrained``.

Example:
    >>> import optimum_evo                                    # registers quant_method "evopress"
    >>> from transformers import AutoModelForCausalLM
    >>> from optimum_evo import EvoPressConfig
    >>> cfg = EvoPressConfig(compression="quantization", target=3.0, levels=[2, 3, 4], dataset="brown")
    >>> model = AutoModelForCausalLM.from_pretrained("path/to/model", quantization_config=cfg)  # doctest: +SKIP
    >>> model.config.quantization_config.profile["modules"]["model.layers.0.self_attn.q_proj"]  # doctest: +SKIP
    3
    >>> model.save_pretrained("compressed")   # packed weights + config with the profile + README.md  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "evopress"
FORMAT_VERSION = 1

# EvoPressConfig field -> SearchArguments field (the search settings; validated by SearchArguments).
SEARCH_FIELDS = {
    "compression": "compression", "target": "target", "dataset": "calibration", "mode": "mode",
    "preset": "preset", "generations": "generations", "offspring": "offspring", "confirm_tokens": "confirm_tokens", "num_samples": "num_samples",
    "seq_len": "seq_len", "fitness": "fitness", "top_k": "top_k", "eval_dataset": "evaluation",
    "eval_windows": "eval_windows", "eval_seq_len": "eval_seq_len", "init": "init",
    "random_candidates": "random_candidates", "search_dtype": "search_dtype", "levels": "levels",
    "group_size": "group_size", "sparsity_step": "sparsity_step", "max_offset": "max_offset",
    "modules": "modules", "cache_dir": "database_dir", "output_dir": "output_dir", "seed": "seed", "progress": "progress",
}
# Written to config.json (everything else, e.g. a tokenizer object, stays out).
SERIALIZED_FIELDS = ("quant_method", "format_version", *SEARCH_FIELDS, "lora_correction", "profile", "metrics")
# ``lora_correction`` dict key -> SearchArguments field.
LORA_FIELDS = {"rank": "lora_correction", "method": "lora_method", "inputs": "lora_inputs",
               "train_steps": "lora_train_steps", "learning_rate": "lora_learning_rate",
               "param_budget": "lora_param_budget"}


class EvoPressConfigError(ValueError):
    """An invalid :class:`EvoPressConfig` (the message says what to change)."""


class EvoPressConfig(QuantizationConfigMixin):
    """Configuration of an EvoPress compression run inside ``from_pretrained`` (and, once the model
    is compressed, the record of what was found: ``profile`` and ``metrics``, saved in
    ``config.json`` and used to rebuild the compressed modules on reload).

    Args:
        compression: ``"depth"`` (drop attention / MLP sub-blocks), ``"sparsity"`` (unstructured,
            SparseGPT levels) or ``"quantization"`` (mixed-bit GPTQ levels).
        target: depth: fraction of sub-blocks to drop (0.25); sparsity: fraction of weights to prune
            (0.5); quantization: average bits over the searched linears (3.0, 2.5).
        dataset: calibration text: a built-in name (``"brown"``, ``"sotu"``), a text file, a list of
            strings, or a ``datasets`` name. WikiText-2 is refused (it is the evaluation text).
        tokenizer: tokenizer (object or path) for the calibration text; default: the model's own.
            Not saved.
        preset: ``"fast"`` (CPU), ``"paper"`` or ``"superfast"``; ``generations``, ``offspring`` and
            ``confirm_tokens`` override it.
        levels: quantization bit widths (default 2,3,4,5,6,8); ``group_size`` of GPTQ (0 = per row).
        num_samples, seq_len: calibration windows of ``seq_len`` tokens.
        eval_dataset, eval_windows, eval_seq_len: held-out evaluation (perplexity and KL of the dense
            and compressed model, recorded in ``metrics``); ``eval_windows=0`` skips it,
            ``None`` uses the whole text.
        modules: regular expression over module names restricting a sparsity / quantization search
            to some linears (e.g. ``r"mlp"``); the others stay dense. Default: every decoder linear.
        cache_dir: level database folder (default: a shared cache keyed by model, data and settings,
            reused by later loads).
        output_dir: optional folder for the search checkpoint and teacher cache (a repeated load
            with the same settings resumes from it).
        lora_correction: LoRA error-correction adapters computed right after compression
            (sparsity and quantization): a rank (``16``), or a dict with ``rank`` and optionally
            ``method`` (``"eora"`` / ``"svd"``), ``inputs`` (``"dense"`` / ``"compressed"`` / ``"auto"``),
            ``train_steps`` (KL distillation steps, 0 = closed form only), ``learning_rate`` and
            ``param_budget`` (total adapter parameters, allocated where they remove the most
            error, ranks capped at ``rank``).
            The returned model carries the adapter (transformers' PEFT integration, adapter
            ``"default"``, active); ``save_pretrained(dir)`` writes the compressed model to ``dir``
            and the adapter to ``dir/lora-correction`` (load that folder to get both). See
            :mod:`optimum_evo.correction`.
        mode, fitness, top_k, init, random_candidates, search_dtype, sparsity_step, max_offset, seed,
            progress: as in :class:`optimum_evo.SearchArguments`.
        profile, metrics: filled in by the search (do not set them by hand).

    Raises:
        EvoPressConfigError: at construction, when a value is invalid.
    """

    def __init__(self, compression: str = "depth", target: float = 0.25, dataset="brown", tokenizer=None,
                 mode: str = "separate", preset: str = "fast", generations: int | None = None,
                 offspring: int | None = None, confirm_tokens: int | None = None, num_samples: int = 128, seq_len: int = 512, fitness: str = "topk",
                 top_k: int = 512, eval_dataset="wikitext2", eval_windows: int | None = 40,
                 eval_seq_len: int = 512, init: str = "baselines", random_candidates: int = 16,
                 search_dtype: str = "auto", levels=None, group_size: int = 128, sparsity_step: float = 0.05,
                 max_offset: int = 5, modules: str | None = None, cache_dir: str | None = None,
                 output_dir: str | None = None, seed: int = 0, progress: bool = True, lora_correction=None,
                 profile: dict | None = None, metrics: dict | None = None,
                 format_version: int = FORMAT_VERSION, quant_method: str = QUANT_METHOD):
        if quant_method != QUANT_METHOD:
            raise EvoPressConfigError(f"EvoPressConfig has quant_method={QUANT_METHOD!r}, got {quant_method!r}.")
        if format_version != FORMAT_VERSION:
            raise EvoPressConfigError(
                f"This checkpoint was written in EvoPress format {format_version}; this version of optimum-evo "
                f"reads format {FORMAT_VERSION}. Upgrade optimum-evo (pip install -U optimum-evo).")
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION
        self.compression, self.target, self.dataset, self.tokenizer = compression, target, dataset, tokenizer
        self.mode, self.preset, self.generations, self.offspring = mode, preset, generations, offspring
        self.confirm_tokens = confirm_tokens
        self.num_samples, self.seq_len, self.fitness, self.top_k = num_samples, seq_len, fitness, top_k
        self.eval_dataset, self.eval_windows, self.eval_seq_len = eval_dataset, eval_windows, eval_seq_len
        self.init, self.random_candidates, self.search_dtype = init, random_candidates, search_dtype
        self.levels = list(levels) if levels is not None else None
        self.group_size, self.sparsity_step, self.max_offset = group_size, sparsity_step, max_offset
        self.modules = modules
        self.cache_dir, self.output_dir, self.seed, self.progress = cache_dir, output_dir, seed, progress
        self.lora_correction = _lora_dict(lora_correction)
        self.profile = copy.deepcopy(profile)
        self.metrics = copy.deepcopy(metrics)
        self.post_init()

    # ------------------------------------------------------------------ validation
    def post_init(self):
        """Validate (the search settings through :class:`optimum_evo.SearchArguments`)."""
        if isinstance(self.eval_windows, bool) or (self.eval_windows is not None and (
                not isinstance(self.eval_windows, int) or self.eval_windows < 0)):
            raise EvoPressConfigError(f"eval_windows must be a non-negative integer (0 = no evaluation, None = the "
                                      f"whole evaluation text), got {self.eval_windows!r}.")
        if isinstance(self.dataset, (list, tuple)) and not all(isinstance(t, str) for t in self.dataset):
            raise EvoPressConfigError("dataset must be a name, a file path or a list of strings.")
        if self.dataset is not None and not isinstance(self.dataset, (str, list, tuple)):
            raise EvoPressConfigError(f"dataset must be a name, a file path or a list of strings, got "
                                      f"{type(self.dataset).__name__}.")
        if self.profile is not None and not isinstance(self.profile, dict):
            raise EvoPressConfigError("profile must be a dict written by the search; leave it unset.")
        self.search_arguments()  # raises with the field name translated
        if self.compression == "quantization":
            self.levels = sorted(int(b) for b in self.search_arguments().levels)

    @classmethod
    def from_search_arguments(cls, args) -> "EvoPressConfig":
        """The config equivalent to a :class:`optimum_evo.SearchArguments` (the command line's
        settings), e.g. to save a model compressed by :func:`optimum_evo.run_search` as an EvoPress
        checkpoint."""
        kwargs = {src: getattr(args, dst) for src, dst in SEARCH_FIELDS.items()}
        if getattr(args, "lora_correction", 0):
            kwargs["lora_correction"] = {key: getattr(args, dst) for key, dst in LORA_FIELDS.items()}
        if not isinstance(kwargs["dataset"], (str, list, tuple)):
            kwargs["dataset"] = None  # e.g. a datasets.Dataset object: not serializable, not recorded
        return cls(**kwargs)

    def search_arguments(self, model: str = "model", **overrides):
        """The :class:`optimum_evo.SearchArguments` of this config (``model`` names the checkpoint)."""
        from ...pipeline import SearchArguments

        kwargs = {dst: getattr(self, src) for src, dst in SEARCH_FIELDS.items()}
        if self.eval_windows == 0:  # "no evaluation" (SearchArguments has no such value; the search skips it)
            kwargs["eval_windows"] = 1
        if isinstance(kwargs["calibration"], list):
            kwargs["calibration"] = list(kwargs["calibration"])
        for key, dst in LORA_FIELDS.items():
            if self.lora_correction and key in self.lora_correction:
                kwargs[dst] = self.lora_correction[key]
        kwargs.update(model=str(model), save_model=False, **overrides)
        try:
            return SearchArguments(**kwargs)
        except (ValueError, TypeError) as e:
            message = str(e)
            for src, dst in SEARCH_FIELDS.items():
                if src != dst:
                    message = message.replace(f"{dst}=", f"{src}=").replace(f"The {dst} text", f"The {src} text")
            raise EvoPressConfigError(f"Invalid EvoPressConfig: {message}") from None

    @property
    def evaluate(self) -> bool:
        """Whether the search evaluates on held-out text (``eval_windows != 0``)."""
        return self.eval_windows != 0

    @property
    def is_compressed(self) -> bool:
        """Whether this config records a finished search (a compressed checkpoint)."""
        return bool(self.profile)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        """JSON-serializable settings, profile and metrics (whitelisted: no tokenizer, no tensors)."""
        out = {}
        for key in SERIALIZED_FIELDS:
            value = getattr(self, key)
            if key == "dataset" and not isinstance(value, (str, list, tuple, type(None))):
                value = f"<{type(value).__name__}>"
            out[key] = _jsonable(copy.deepcopy(value))
        if isinstance(self.dataset, (list, tuple)):
            total = sum(len(t) for t in self.dataset)
            out["dataset"] = f"<list of {len(self.dataset)} texts, {total} characters>"
        return out

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """Rebuild a config from ``config.json``'s ``quantization_config`` (unknown keys are refused
        with a message, a newer format is refused with an upgrade hint)."""
        known = set(SERIALIZED_FIELDS) | {"tokenizer"}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise EvoPressConfigError(f"Unknown EvoPressConfig keys {unknown}; known keys: {sorted(known)}. "
                                      "Was the checkpoint written by a newer optimum-evo?")
        config_dict = dict(config_dict)
        if isinstance(config_dict.get("dataset"), str) and config_dict["dataset"].startswith("<list of"):
            config_dict["dataset"] = None  # calibration texts are not stored; the search is done anyway
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __repr__(self):
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, sort_keys=True)}"

    # ------------------------------------------------------------------ summary
    def summary(self) -> dict:
        """A short, human-readable summary of the found profile (used by the model card)."""
        p = self.profile or {}
        if self.compression == "depth":
            return {"removed whole blocks": p.get("removed_layers", []),
                    "attention-only drops (new layer indices)": p.get("dropped_attention", []),
                    "MLP-only drops (new layer indices)": p.get("dropped_mlp", []),
                    "layers": f"{p.get('original_num_layers', '?')} -> "
                              f"{(p.get('original_num_layers') or 0) - len(p.get('removed_layers', []))}"}
        modules = p.get("modules", {})
        if not modules:
            return {}
        counts: dict = {}
        for level in modules.values():
            level = round(level, 4) if isinstance(level, float) else level
            counts[level] = counts.get(level, 0) + 1
        key = "average_bits" if self.compression == "quantization" else "sparsity"
        return {key: p.get(key), "modules per level": dict(sorted(counts.items())), "modules": len(modules)}


def _lora_dict(value) -> dict | None:
    """Normalise ``lora_correction`` (``None`` / ``0`` / a rank / a dict) to ``None`` or a dict with ``rank``."""
    if value is None or value is False or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"rank": value}
    if not isinstance(value, dict):
        raise EvoPressConfigError(f"lora_correction must be a rank (e.g. 16) or a dict such as "
                                  f"{{'rank': 16, 'train_steps': 200}}, got {value!r}.")
    unknown = sorted(set(value) - set(LORA_FIELDS))
    if unknown:
        raise EvoPressConfigError(f"Unknown lora_correction keys {unknown}; known keys: {sorted(LORA_FIELDS)}.")
    rank = value.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise EvoPressConfigError(f"lora_correction needs a positive integer 'rank', got {rank!r}.")
    choices = {"method": ("eora", "svd"), "inputs": ("dense", "compressed", "auto")}
    for key, allowed in choices.items():
        if key in value and value[key] not in allowed:
            raise EvoPressConfigError(f"lora_correction[{key!r}] must be one of {allowed}, got {value[key]!r}.")
    steps = value.get("train_steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise EvoPressConfigError(f"lora_correction['train_steps'] must be an integer >= 0, got {steps!r}.")
    budget = value.get("param_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
        raise EvoPressConfigError(f"lora_correction['param_budget'] must be a positive integer, got {budget!r}.")
    lr = value.get("learning_rate", 5e-4)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise EvoPressConfigError(f"lora_correction['learning_rate'] must be a positive number, got {lr!r}.")
    return dict(value)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)
