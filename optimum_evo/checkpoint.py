"""The EvoPress checkpoint: a transformers model folder that records how it was compressed.

``config.json`` carries ``quantization_config``, the *record* of the run (`optimum_evo.record`),
and ``model.safetensors`` the compressed model's own tensors (packed codes and scales, exact zeros,
fewer blocks). Reloading rebuilds the compressed modules from the profile before the tensors load
(`build_skeleton`); the compression method of ``record["compression"]`` does the work. A LoRA
correction adapter, when the model carries one, goes to ``lora-correction/`` beside the model.

This module is the format; the transformers integration
(`optimum_evo.integrations.transformers`) only adapts it to ``from_pretrained`` and
``save_pretrained``.

Examples:
    >>> record = checkpoint_record(args, profile, metrics)             # doctest: +SKIP
    >>> save_checkpoint(model, "out/model", record, tokenizer=tok)     # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from .methods import CompressedModelError, get_method
from .record import read_record

CARD_NAME = "README.md"
PLUGIN_HINT = ("Run `import optimum_evo` before `from_pretrained` (pip install optimum-evo); the model as loaded "
               "computes garbage.")

__all__ = ["CARD_NAME", "CompressedModelError", "EvoPressLoadError", "build_skeleton", "check_evopress_model",
           "checkpoint_state_dict", "finalize_loaded", "has_adapter", "save_checkpoint", "verify"]


class EvoPressLoadError(CompressedModelError):
    """An EvoPress checkpoint was loaded without the modules its profile needs (typically: without
    ``import optimum_evo``, so transformers skipped the unknown quantization method and filled the
    missing weights with random values)."""


def build_skeleton(model, record: dict) -> None:
    """Swap the modules of a (meta) model skeleton for the compressed ones the record's profile
    needs, so the checkpoint's tensors load into them."""
    get_method(record["compression"]).build_skeleton(model, record.get("profile") or {})


def finalize_loaded(model, record: dict) -> None:
    """Finish a model whose checkpoint tensors loaded into `build_skeleton`'s modules."""
    get_method(record["compression"]).after_load(model, record.get("profile") or {})


def checkpoint_state_dict(model, record: dict) -> dict:
    """The tensors an EvoPress checkpoint stores: the model's own (without LoRA tensors, under the
    names they have without adapters), as the compression method stores them."""
    from .correction.peft_io import base_state_dict

    return get_method(record["compression"]).checkpoint_tensors(model, record.get("profile") or {},
                                                                base_state_dict(model))


def verify(model, record: dict) -> None:
    """Raise `CompressedModelError` when ``model`` lacks the compressed
    modules of ``record``'s profile."""
    get_method(record["compression"]).verify(model, record.get("profile") or {})


def check_evopress_model(model):
    """Raise `EvoPressLoadError` when ``model`` comes from an EvoPress checkpoint but lacks
    the compressed modules of its profile (loaded without ``import optimum_evo``: transformers then
    leaves the unknown ``quantization_config`` a plain dict and randomly initialises the packed
    weights' places). Returns the model's ``quantization_config``, or ``None`` for a model that is
    not an EvoPress one.

    Examples:
        >>> model = AutoModelForCausalLM.from_pretrained("compressed")   # forgot `import optimum_evo`  # doctest: +SKIP
        >>> import optimum_evo; optimum_evo.check_evopress_model(model)                               # doctest: +SKIP
        Traceback (most recent call last):
        EvoPressLoadError: ... was loaded without the optimum-evo plugin ...
    """
    record = read_record(model)
    if record is None:
        return None
    qc = model.config.quantization_config
    if isinstance(qc, dict):
        raise EvoPressLoadError(f"{getattr(model, 'name_or_path', '') or 'This model'} is an EvoPress checkpoint but "
                                f"was loaded without the optimum-evo plugin, so transformers randomly initialised the "
                                f"compressed weights. {PLUGIN_HINT}")
    try:
        verify(model, record)
    except CompressedModelError as e:
        raise EvoPressLoadError(f"{e} {PLUGIN_HINT}") from None
    return qc


def has_adapter(model) -> bool:
    """Whether ``model`` carries an attached LoRA correction adapter ``"default"``."""
    return bool(getattr(model, "_hf_peft_config_loaded", False)) and "default" in (getattr(model, "peft_config", None)
                                                                                    or {})


def save_checkpoint(model, folder, record: dict, tokenizer=None, repo_id: str | None = None, card_tags=None,
                    **save_kwargs) -> Path:
    """Write ``model`` (compressed as ``record`` says) as an EvoPress checkpoint in ``folder``.

    Writes what ``save_pretrained`` writes (``config.json`` with ``quantization_config = record``,
    ``model.safetensors``, ``generation_config.json``), a ``README.md`` model card, the tokenizer
    (when given) and an attached LoRA correction adapter in ``folder/lora-correction`` (its
    ``base_model_name_or_path`` is ``repo_id``, or the folder's absolute path). ``repo_id`` also
    names the model in the card's loading snippet.

    Raises:
        CompressedModelError: ``model`` lacks the compressed modules of the profile (a model loaded
            without the plugin is never saved).
    """
    from transformers import PreTrainedModel

    from .card import model_card
    from .correction.peft_io import save_correction
    from .faults import fault_point
    from .utils import publish_folder, staging_folder

    verify(model, record)
    folder = Path(folder)
    main = save_kwargs.get("is_main_process", True)
    final, folder = folder, staging_folder(folder) if main else folder
    previous = model.config.__dict__.get("quantization_config", None)
    had = "quantization_config" in model.config.__dict__
    if read_record(model) != record:
        model.config.quantization_config = record
    adapter = has_adapter(model)
    if getattr(model, "hf_quantizer", None) is None:
        # With a quantizer transformers ignores `state_dict` and takes the quantizer's
        # (EvoPressHfQuantizer.get_state_dict_and_metadata gives the same tensors).
        save_kwargs.setdefault("state_dict", checkpoint_state_dict(model, record))
    try:
        if adapter:
            model._hf_peft_config_loaded = False  # else transformers writes the adapter alone
        try:
            PreTrainedModel.save_pretrained(model, folder, **save_kwargs)
        finally:
            if adapter:
                model._hf_peft_config_loaded = True
    finally:
        if had:
            model.config.quantization_config = previous
        elif "quantization_config" in model.config.__dict__:
            del model.config.quantization_config
    if not main:
        return folder
    if adapter:
        metadata = (record.get("metrics") or {}).get("lora_correction") or {}
        save_correction(model, folder, base_model_name_or_path=repo_id or str(final.resolve()),
                        metadata={k: v for k, v in metadata.items() if k != "path"})
    if tokenizer is not None:
        if isinstance(tokenizer, (str, Path)):
            from .loading import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        tokenizer.save_pretrained(folder)
    (folder / CARD_NAME).write_text(model_card(record, repo_id or str(final), tags=card_tags, adapter=adapter),
                                    encoding="utf-8")
    fault_point("model.write")
    return publish_folder(folder, final)

