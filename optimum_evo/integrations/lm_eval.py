"""lm-eval integration: the lm-eval model ``evopress``.

`EvoPressLM` is lm-eval's ``HFLM`` (the ``hf`` model) loading through optimum-evo: the EvoPress
checkpoint's packed / dropped modules are rebuilt before its tensors load, so lm-eval evaluates
the real compressed model, with its LoRA correction (``DIR/lora-correction``) when the checkpoint
has one. It is registered in lm-eval's model registry as ``evopress``, so after
``pip install optimum-evo[lm-eval]``:

    lm_eval --model evopress --model_args pretrained=DIR --tasks hellaswag

(``pretrained`` is a folder or a Hub id; the other ``--model_args`` are ``hf``'s, plus
``lora_correction=False`` to leave the correction out.) ``--model hf`` on an EvoPress checkpoint
evaluates **randomly initialised weights**: transformers does not know ``quant_method="evopress"``
without the plugin, warns and fills the compressed modules' places with random values.

How lm-eval finds the model: the distribution declares the entry point
``[project.entry-points."lm_eval.models"] evopress = "optimum_evo.integrations.lm_eval:EvoPressLM"``
(read by lm-eval versions that discover plugin models), and installs ``optimum_evo_lm_eval.pth``,
which adds the same lazy ``evopress`` entry to lm-eval's registry when lm-eval imports its model
list, for versions that do not (``_optimum_evo_lm_eval.py``; it imports nothing else).

Examples:
    >>> from optimum_evo.integrations.lm_eval import EvoPressLM, evaluate_tasks
    >>> lm = EvoPressLM(pretrained="out/q/model", device="cpu")                   # doctest: +SKIP
    >>> results = evaluate_tasks("out/q/model", ["hellaswag"], limit=100)        # doctest: +SKIP
    >>> results["results"]["hellaswag"]["acc,none"]                              # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it loads them only into an empty registry)
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

logger = logging.getLogger(__name__)

__all__ = ["MODEL_NAME", "EvoPressLM", "base_tokenizer", "correction_folder", "evaluate_tasks"]

#: The model's name in lm-eval (``--model evopress``).
MODEL_NAME = "evopress"


def _flag(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)


def correction_folder(pretrained, subfolder: str = "", revision: str | None = None) -> str | None:
    """The LoRA correction adapter folder of a checkpoint (``pretrained`` a folder or Hub id), or
    ``None``: ``pretrained/lora-correction`` when it holds ``adapter_config.json``; for a Hub id,
    that subfolder downloaded when the repository has it."""
    from ..correction.peft_io import ADAPTER_SUBFOLDER

    local = Path(str(pretrained), subfolder or "", ADAPTER_SUBFOLDER)
    if (local / "adapter_config.json").is_file():
        return str(local)
    if Path(str(pretrained)).exists():
        return None
    prefix = "/".join(p for p in (subfolder, ADAPTER_SUBFOLDER) if p)
    try:
        from huggingface_hub import file_exists, snapshot_download

        if not file_exists(str(pretrained), f"{prefix}/adapter_config.json", revision=revision):
            return None
        return str(Path(snapshot_download(str(pretrained), allow_patterns=[f"{prefix}/*"], revision=revision), prefix))
    except Exception as e:  # offline, private, not a model repository: evaluate without it
        logger.info("No LoRA correction looked up for %s (%s).", pretrained, e)
        return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def base_tokenizer(pretrained) -> str | None:
    """The folder of the tokenizer for a local checkpoint saved without one: its base model's (the
    model its record names, when it is found here); ``None`` when the checkpoint has its own."""
    import json

    folder = Path(str(pretrained))
    if not (folder / "config.json").is_file() or any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    qc = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    base = (qc.get("metrics") or {}).get("model") if isinstance(qc, dict) else None
    if not base:
        return None
    from ..embedded_models import resolve_model

    try:
        return resolve_model(base)
    except (FileNotFoundError, ValueError):
        return None


@register_model(MODEL_NAME)
class EvoPressLM(HFLM):
    """lm-eval's ``hf`` model for EvoPress checkpoints (see the module docstring).

    Args:
        pretrained: the EvoPress checkpoint (folder or Hub id), or a loaded model.
        lora_correction: load the checkpoint's LoRA correction (``lora-correction/``) when it has
            one (default ``True``); ``False`` evaluates the compressed model alone.
        tokenizer: as in ``hf``; default: the checkpoint's, or its base model's when it was saved
            without one.
        device: as in ``hf``; default: the GPU when there is one, else the CPU.
        **kwargs: every other argument of lm-eval's ``HFLM`` (``dtype``, ``batch_size``, ``peft``, ...).
    """

    def __init__(self, pretrained, lora_correction=True, device: str | None = None, **kwargs):
        from .transformers import register

        register()  # quant_method "evopress" known to transformers before anything loads
        self._evopress_correction = None
        if isinstance(pretrained, str) and _flag(lora_correction) and not kwargs.get("peft"):
            self._evopress_correction = correction_folder(pretrained, kwargs.get("subfolder") or "",
                                                          str(kwargs.get("revision") or "main"))
        if isinstance(pretrained, str) and kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = base_tokenizer(pretrained)
        super().__init__(pretrained=pretrained, device=device, **kwargs)
        self._check_loaded()

    def _create_model(self, pretrained, peft=None, **kwargs) -> None:
        super()._create_model(pretrained, peft=peft, **kwargs)
        if peft is None and self._evopress_correction is not None:
            from peft import PeftModel

            # not through HFLM's `peft`: it resizes the embeddings to the tokenizer's length first
            self._model = PeftModel.from_pretrained(self._model, self._evopress_correction)
            logger.info("Loaded the LoRA correction of %s from %s.", pretrained, self._evopress_correction)

    def _check_loaded(self) -> None:
        from ..checkpoint import check_evopress_model

        model = self._model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if check_evopress_model(base) is None:
            logger.warning("%s is not an EvoPress checkpoint; lm-eval evaluates it as a plain transformers model.",
                           getattr(base, "name_or_path", "The model"))

    @property
    def has_correction(self) -> bool:
        """Whether the LoRA correction is loaded."""
        return self._evopress_correction is not None


def evaluate_tasks(pretrained, tasks, include_path=None, num_fewshot: int | None = None, limit=None,
                   batch_size=1, device: str | None = None, lora_correction: bool = True, log_samples: bool = False,
                   **model_args) -> dict:
    """Run lm-eval's ``simple_evaluate`` on the EvoPress checkpoint ``pretrained`` (`EvoPressLM`)
    for ``tasks`` (names, or task definitions found under ``include_path``); returns lm-eval's
    results dict (print it with ``lm_eval.utils.make_table``)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("Give at least one lm-eval task (e.g. --tasks hellaswag,arc_easy).")
    manager = TaskManager(include_path=[str(p) for p in include_path] if isinstance(include_path, (list, tuple))
                          else (str(include_path) if include_path else None))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"Unknown lm-eval tasks {unknown}; list them with `lm_eval ls tasks`, or give the folder of "
                         "your own task definitions with --include-path.")
    lm = EvoPressLM(pretrained=str(pretrained), lora_correction=lora_correction, device=device, batch_size=batch_size,
                    **model_args)
    return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           log_samples=log_samples)
