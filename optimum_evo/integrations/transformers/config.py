"""``EvoPressConfig``: the ``quantization_config`` that runs an EvoPress search inside ``from_pretrained``.

Its fields are the settings of `optimum_evo.SearchArguments` marked for the config (every
setting except ``model``, ``eval_dtype``, ``save_model`` and ``export``), with the same names,
defaults, validation and messages; once the model is compressed it also holds the ``profile`` and
``metrics`` the checkpoint records (`optimum_evo.checkpoint`).

Examples:
    >>> import optimum_evo                                    # registers quant_method "evopress"
    >>> from transformers import AutoModelForCausalLM
    >>> from optimum_evo import EvoPressConfig
    >>> cfg = EvoPressConfig(compression="quantization", target=3.0, levels=[2, 3, 4], dataset="brown", sym=True)
    >>> model = AutoModelForCausalLM.from_pretrained("path/to/model", quantization_config=cfg)  # doctest: +SKIP
    >>> model.config.quantization_config.profile["modules"]["model.layers.0.self_attn.q_proj"]  # doctest: +SKIP
    3
    >>> model.save_pretrained("compressed")   # packed weights + config with the profile + README.md  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json

from transformers.utils.quantization_config import QuantizationConfigMixin

from ...record import FORMAT_VERSION, QUANT_METHOD, READABLE_FORMATS, checkpoint_record, upgrade_record
from ...methods import get_method
from ...settings import DEPRECATED_NAMES, SearchArguments, config_fields

__all__ = ["EvoPressConfig", "EvoPressConfigError", "QUANT_METHOD"]

#: ``lora_correction`` dict keys (the short form ``lora_correction={"rank": 16, ...}``) -> settings.
LORA_KEYS = {"rank": "lora_correction", "method": "lora_method", "inputs": "lora_inputs",
             "train_steps": "lora_train_steps", "learning_rate": "lora_learning_rate",
             "param_budget": "lora_param_budget"}


class EvoPressConfigError(ValueError):
    """An invalid `EvoPressConfig` (the message says what to change)."""


def _lora_settings(value) -> dict:
    """The ``lora_*`` settings of ``lora_correction`` given as ``None`` / ``0`` / a rank / a dict of
    `LORA_KEYS` (each dict value checked with the dict's own key names)."""
    if value is None or value is False or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return {"lora_correction": 0}
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"rank": value}
    if not isinstance(value, dict):
        raise EvoPressConfigError(f"lora_correction must be a rank (e.g. 16) or a dict such as "
                                  f"{{'rank': 16, 'train_steps': 200}}, got {value!r}.")
    unknown = sorted(set(value) - set(LORA_KEYS))
    if unknown:
        raise EvoPressConfigError(f"Unknown lora_correction keys {unknown}; known keys: {sorted(LORA_KEYS)}.")
    rank = value.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise EvoPressConfigError(f"lora_correction needs a positive integer 'rank', got {rank!r}.")
    for key, allowed in {"method": ("eora", "svd"), "inputs": ("dense", "compressed", "auto")}.items():
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
    return {LORA_KEYS[k]: v for k, v in value.items()}


class EvoPressConfig(QuantizationConfigMixin):
    """Configuration of an EvoPress compression run inside ``from_pretrained`` (and, once the model
    is compressed, the record of what was found: ``profile`` and ``metrics``, saved in
    ``config.json`` and used to rebuild the compressed modules on reload).

    Takes every setting of `optimum_evo.SearchArguments` except ``model``, ``eval_dtype``,
    ``save_model`` and ``export`` (the first two may be given positionally: ``compression``,
    ``target``), with the same meaning: e.g. ``compression``, ``target``, ``dataset`` (the
    calibration text), ``levels``, ``group_size``, ``sym``, ``desc_act``, ``damp_percent``, ``mse``,
    ``modules``, ``modules_to_not_convert``, ``preset``, ``eval_windows`` (0 = no evaluation),
    ``database_dir``, ``lora_correction`` (a rank) and the ``lora_*`` settings. Besides:

    Args:
        tokenizer: tokenizer (object or path) for the calibration text; default: the model's own.
            Not saved.
        lora_correction: also accepts a dict ``{"rank": 16, "method": ..., "inputs": ...,
            "train_steps": ..., "learning_rate": ..., "param_budget": ...}``. The returned model
            carries the adapter (transformers' PEFT integration, adapter ``"default"``, active);
            ``save_pretrained(dir)`` writes the compressed model to ``dir`` and the adapter to
            ``dir/lora-correction`` (see `optimum_evo.correction`).
        profile, metrics: filled in by the search (do not set them by hand).

    Raises:
        EvoPressConfigError: at construction, when a value is invalid.
    """

    def __init__(self, *args, tokenizer=None, profile: dict | None = None, metrics: dict | None = None,
                 format_version: int = FORMAT_VERSION, quant_method: str = QUANT_METHOD, **settings):
        if quant_method != QUANT_METHOD:
            raise EvoPressConfigError(f"EvoPressConfig has quant_method={QUANT_METHOD!r}, got {quant_method!r}.")
        if format_version not in READABLE_FORMATS:
            raise EvoPressConfigError(
                f"This checkpoint was written in EvoPress format {format_version}; this version of optimum-evo "
                f"reads formats {list(READABLE_FORMATS)}. Upgrade optimum-evo (pip install -U optimum-evo).")
        if len(args) > 2:
            raise TypeError("EvoPressConfig takes at most 2 positional arguments (compression, target).")
        for name, value in zip(("compression", "target"), args):
            if name in settings:
                raise TypeError(f"EvoPressConfig got multiple values for {name!r}.")
            settings[name] = value
        if "lora_correction" in settings:
            lora = _lora_settings(settings.pop("lora_correction"))
            clash = sorted(set(lora) & set(settings))
            if clash:
                raise EvoPressConfigError(f"Give the LoRA settings once: {clash} also appear in lora_correction.")
            settings.update(lora)
        allowed = set(config_fields()) | set(DEPRECATED_NAMES)
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise EvoPressConfigError(f"Unknown EvoPressConfig settings {unknown}; known settings: {sorted(allowed)}.")
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION
        self.tokenizer = tokenizer
        args = self._validated(settings)
        for name in config_fields():
            setattr(self, name, getattr(args, name))
        self.profile = copy.deepcopy(profile)
        self.metrics = copy.deepcopy(metrics)
        self.post_init()

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _validated(settings: dict, model: str = "model") -> SearchArguments:
        try:
            return SearchArguments(model=model, save_model=False, **settings)
        except (ValueError, TypeError) as e:
            raise EvoPressConfigError(f"Invalid EvoPressConfig: {e}") from None

    def post_init(self):
        """Validate the current values (after changes made to the attributes)."""
        if self.profile is not None and not isinstance(self.profile, dict):
            raise EvoPressConfigError("profile must be a dict written by the search; leave it unset.")
        self.search_arguments()

    def search_arguments(self, model: str = "model", **overrides) -> SearchArguments:
        """The `optimum_evo.SearchArguments` of this config (``model`` names the checkpoint;
        ``overrides`` replace settings)."""
        settings = {name: getattr(self, name) for name in config_fields()}
        if isinstance(settings["dataset"], list):
            settings["dataset"] = list(settings["dataset"])
        settings.update(overrides)
        return self._validated(settings, model=str(model))

    @classmethod
    def from_search_arguments(cls, args: SearchArguments) -> "EvoPressConfig":
        """The config equivalent to a `optimum_evo.SearchArguments`."""
        return cls(**{name: getattr(args, name) for name in config_fields()})

    @property
    def method(self):
        """The compression method (`optimum_evo.methods`)."""
        return get_method(self.compression)

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
        """The checkpoint record: JSON-serializable settings, profile and metrics (no tokenizer, no
        tensors; a calibration text given as a list is summarised)."""
        return checkpoint_record(self, self.profile, self.metrics)

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """Rebuild a config from ``config.json``'s ``quantization_config`` (earlier formats are
        upgraded; unknown keys are refused with a message, a newer format with an upgrade hint)."""
        config_dict = upgrade_record(dict(config_dict))
        known = set(config_fields()) | {"quant_method", "format_version", "profile", "metrics", "tokenizer"}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise EvoPressConfigError(f"Unknown EvoPressConfig keys {unknown}; known keys: {sorted(known)}. "
                                      "Was the checkpoint written by a newer optimum-evo?")
        if isinstance(config_dict.get("dataset"), str) and config_dict["dataset"].startswith("<"):
            config_dict["dataset"] = None  # calibration texts are not stored; the search is done anyway
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __repr__(self):
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, sort_keys=True)}"

    # ------------------------------------------------------------------ summary
    def summary(self) -> dict:
        """A short, human-readable summary of the found profile (used by the model card)."""
        return self.method.summary(self.profile or {})


def _signature() -> inspect.Signature:
    fields = {f.name: f for f in dataclasses.fields(SearchArguments)}
    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=fields[name].default)
              for name in config_fields()]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
               for name in ("tokenizer", "profile", "metrics")]
    return inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *params])


EvoPressConfig.__init__.__signature__ = _signature()
