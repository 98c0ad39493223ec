"""LoRA error correction for compressed models (any compression optimum-evo produces).

One call: closed-form rank-``r`` adapters from the compression residual weighted by calibration
activations (EoRA-style; plain SVD as ablation), optionally followed by KL distillation to the
dense model with ``transformers.Trainer``; the result is a standard ``peft`` LoRA model.

Examples:
    >>> from optimum_evo.correction import correct, save_correction
    >>> peft_model = correct(compressed, "path/to/dense", "brown", rank=16, train=200)   # doctest: +SKIP
    >>> compressed.save_pretrained("out/model")                                         # doctest: +SKIP
    >>> save_correction(peft_model, "out/model")     # out/model/lora-correction/        # doctest: +SKIP
    >>> from peft import AutoPeftModelForCausalLM
    >>> AutoPeftModelForCausalLM.from_pretrained("out/model/lora-correction")           # doctest: +SKIP
"""

from __future__ import annotations

import logging

import torch

from .eora import (
    INPUTS, Adapter, adapter_parameters, allocate_ranks, closed_form_adapters, compressed_weight,
    low_rank_correction, resolve_ranks, select_inputs,
)
from .peft_io import (
    ADAPTER_SUBFOLDER, MergeRefusedError, adapter_bytes, attach_adapters, extract_adapters, load_corrected,
    merge_correction, read_metadata, save_correction, set_correction_enabled,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_SUBFOLDER", "Adapter", "MergeRefusedError", "adapter_bytes", "adapter_parameters", "allocate_ranks",
    "attach_adapters",
    "closed_form_adapters", "compressed_weight", "correct", "extract_adapters", "load_corrected",
    "low_rank_correction", "merge_correction", "read_metadata", "resolve_ranks", "save_correction",
    "select_inputs", "set_correction_enabled",
]


def _load_dense(dense_model_or_path, dtype):
    if isinstance(dense_model_or_path, torch.nn.Module):
        return dense_model_or_path
    from ..loading import load_model

    return load_model(dense_model_or_path, dtype)


def _windows(calibration, tokenizer, dense, num_samples, seq_len, seed):
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise ValueError(f"calibration windows must be [N, T] token ids, got shape {tuple(calibration.shape)}.")
        return calibration
    from ..data import calibration_windows
    from ..loading import load_tokenizer

    if tokenizer is None:
        name = getattr(dense.config, "_name_or_path", None) or getattr(dense, "name_or_path", None)
        if not name:
            raise ValueError("Pass tokenizer= (or calibration as [N, T] token ids): the dense model has no path "
                             "to load its tokenizer from.")
        tokenizer = load_tokenizer(name)
    return calibration_windows(calibration, tokenizer, num_samples, seq_len, seed)


def correct(model, dense_model_or_path, calibration, rank: int = 16, rank_pattern: dict | None = None,
            method: str = "eora", inputs: str = "dense", train=False, tokenizer=None, num_samples: int = 64,
            seq_len: int = 512, seed: int = 0, teacher="topk", top_k: int = 512, damp: float = 0.01,
            param_budget: int | None = None, progress: bool = True):
    """Attach LoRA error-correction adapters to a compressed model; returns a ``PeftModel``.

    Args:
        model: the compressed causal LM (sparse weights, or quantized weights loaded as
            dequantized floats, or any ``nn.Linear`` subclass with ``dequantize()``). Wrapped in
            place, as with ``peft.get_peft_model``.
        dense_model_or_path: the dense model it was compressed from (module, folder, embedded name
            or Hub id).
        calibration: ``[N, T]`` token ids or a text source (``"brown"``, a file, a list of strings,
            a ``datasets.Dataset``; see `optimum_evo.data`). Never the evaluation text.
        rank: global adapter rank; ``rank_pattern``: per-module overrides (peft semantics: regex
            matched at the end of the module name, e.g. ``{"down_proj": 32}``; 0 = no adapter).
        param_budget: total adapter parameters; ``rank`` then caps each module's rank and the
            ranks are allocated where they remove the most relative output error
            (`allocate_ranks`).
        method: ``"eora"`` (residual in the activation eigenspace) or ``"svd"`` (plain SVD).
        inputs: activation statistics from the ``"dense"`` model (EoRA) or the ``"compressed"``
            model, block by block with earlier blocks corrected, fitting the dense outputs; or
            ``"auto"``: both, each fitted on 7/8 of the windows and scored by KL to the dense model
            on the remaining 1/8; the better one is refitted on all windows (see
            `select_inputs`).
        train: ``False`` (closed form only), a number of training steps, or a dict of
            `distill` arguments (``max_steps``,
            ``learning_rate``, ...), for KL distillation to the dense model.
        tokenizer: for text calibration (default: the dense model's).
        num_samples, seq_len, seed: calibration windows drawn from a text source.
        teacher: ``"topk"`` (a top-``top_k`` teacher cache; 4.1 kB/token at K=512), ``"model"``
            (the dense model on the fly) or an existing
            `TeacherCache` of the calibration windows, for training.

    Returns:
        a ``peft.PeftModelForCausalLM``; save it with `save_correction` beside the
        compressed model.
    """
    if inputs not in INPUTS + ("auto",):
        raise ValueError(f"inputs must be one of {INPUTS + ('auto',)}, got {inputs!r}.")
    dense = _load_dense(dense_model_or_path, next(model.parameters()).dtype)
    windows = _windows(calibration, tokenizer, dense, num_samples, seq_len, seed)
    fit = dict(rank=rank, rank_pattern=rank_pattern, method=method, damp=damp, param_budget=param_budget,
               progress=progress)
    selection = None
    if inputs == "auto":
        inputs, adapters, selection = select_inputs(model, dense, windows, **fit)
    else:
        adapters = closed_form_adapters(model, dense, windows, inputs=inputs, **fit)
    peft_model = attach_adapters(model, adapters)
    peft_model.evopress_correction = {"method": method, "inputs": inputs, "rank": rank,
                                      "rank_pattern": rank_pattern or {}, "param_budget": param_budget,
                                      "adapter_parameters": adapter_parameters(adapters), "calibration_windows": list(windows.shape),
                                      "trained_steps": 0}
    if selection is not None:
        peft_model.evopress_correction["selection"] = selection
    if train:
        from ..fitness import TeacherCache
        from .train import distill

        kwargs = {"max_steps": int(train)} if not isinstance(train, dict) else dict(train)
        if isinstance(teacher, TeacherCache):
            t = teacher
        elif teacher == "topk":
            t = TeacherCache.build(dense, windows, "topk", top_k, progress=progress)
        elif teacher == "model":
            t = dense
        else:
            raise ValueError(f"teacher must be 'topk' or 'model', got {teacher!r}.")
        kwargs.setdefault("disable_tqdm", not progress)
        distill(peft_model, windows, t, **kwargs)
        peft_model.evopress_correction["trained_steps"] = kwargs.get("max_steps")
    return peft_model
