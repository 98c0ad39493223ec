"""The ``lora_correction`` step of the EvoPress pipeline (``--lora-correction RANK``).

Called by :func:`optimum_evo.pipeline.run_search` after the compressed model is saved: computes
the correction (closed form, then optional KL distillation), evaluates it on the same held-out
windows as the other rows, saves the adapter in ``model/lora-correction/`` and adds an
``"evopress+lora"`` row and a ``"lora_correction"`` section to the report.
"""

from __future__ import annotations

import time
from pathlib import Path


def lora_correction_step(args, model, path, report: dict, model_dir=None):
    """Correct ``model`` (compressed, already saved in ``model_dir``) and record it in ``report``.

    Args:
        args: the run's :class:`~optimum_evo.pipeline.SearchArguments` (``lora_correction`` = rank,
            ``lora_method``, ``lora_inputs``, ``lora_train_steps``, calibration and evaluation
            settings).
        model: the compressed model (wrapped in place by peft).
        path: the dense model's folder.
        report: the run's report (``results`` gets an ``"evopress+lora"`` row).
        model_dir: folder of the saved compressed model (``None``: do not save the adapter).

    Returns:
        the corrected ``PeftModel`` (its base is ``model``); the ``"lora_correction"`` section
        is in ``report``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import calibration_windows, evaluation_windows
    from ..fitness import TeacherCache, evaluate
    from . import adapter_bytes, correct, save_correction

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    device = next(model.parameters()).device
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype).to(device).eval()
    calib = calibration_windows(args.calibration, tokenizer, args.num_samples, args.seq_len, args.seed)
    train = {"max_steps": args.lora_train_steps, "learning_rate": args.lora_learning_rate} \
        if args.lora_train_steps else False
    peft_model = correct(model, dense, calib, rank=args.lora_correction, param_budget=args.lora_param_budget,
                         method=args.lora_method,
                         inputs=args.lora_inputs, train=train, top_k=args.top_k, progress=args.progress)
    section = {**peft_model.evopress_correction, "adapter_bytes_float16": adapter_bytes(peft_model)}
    if report.get("results"):
        eval_ids = evaluation_windows(args.evaluation, tokenizer, args.eval_seq_len, args.eval_windows)
        teacher = TeacherCache.build(dense, eval_ids, "topk", args.top_k, progress=False)
        row = evaluate(peft_model.get_base_model(), eval_ids, teacher, progress=args.progress, desc="Evaluating evopress+lora")
        row["parameters"] = sum(p.numel() for p in peft_model.parameters())
        budget = {k: v for k, v in report["results"].get("evopress", {}).items()
                  if k not in ("perplexity", "nll", "tokens", "kl", "parameters")}
        row.update(budget)  # same compressed weights: same bits / sparsity
        report["results"]["evopress+lora"] = row
    del dense
    if model_dir is not None and (Path(model_dir) / "config.json").is_file():
        folder = save_correction(peft_model, model_dir, metadata=section)
        section["path"] = str(folder)
    section["seconds"] = round(time.perf_counter() - start, 1)
    report["lora_correction"] = section
    return peft_model
