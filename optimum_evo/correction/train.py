"""Trained correction: KL distillation of the LoRA adapters to the dense teacher with ``Trainer``.

Starts from the closed-form adapters (or any ``PeftModel``) and minimises the mean per-token
``KL(dense || corrected)`` on calibration windows. Only the LoRA factors train; the compressed
weights stay frozen, so sparsity and quantization are untouched.

Memory: the teacher is either a `TeacherCache` built once (top-K:
4.1 kB per token for K=512, independent of the vocabulary, so the dense model can be freed) or
the dense model itself, run on the fly under ``no_grad`` (full KL, no cache, two models in memory).

Examples:
    >>> teacher = TeacherCache.build(dense, windows, mode="topk", top_k=512)          # doctest: +SKIP
    >>> distill(peft_model, windows, teacher, max_steps=200, learning_rate=2e-4)      # doctest: +SKIP
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from ..fitness import TeacherCache


class WindowDataset(torch.utils.data.Dataset):
    """Calibration windows as ``{"input_ids", "window"}`` items (``window`` indexes the teacher cache)."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self):
        return self.windows.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "window": torch.tensor(i)}


class KLDistillationTrainer(Trainer):
    """``Trainer`` whose loss is the mean per-token KL(teacher || student).

    Args:
        teacher: a `TeacherCache` of the training windows (items carry their ``window``
            index) or a dense ``PreTrainedModel`` run on the fly.
        *args, **kwargs: ``Trainer``'s arguments.
    """

    def __init__(self, *args, teacher=None, **kwargs):
        if teacher is None:
            raise ValueError("KLDistillationTrainer needs teacher= (a TeacherCache or the dense model).")
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        if not isinstance(teacher, TeacherCache):
            teacher.eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        logits = model(input_ids=ids, use_cache=False).logits
        if isinstance(self.teacher, TeacherCache):
            total = sum(self.teacher.kl(int(w), slice(None), logits[b].float())
                        for b, w in enumerate(inputs["window"].tolist()))
            loss = total / ids.numel()
        else:
            with torch.no_grad():
                t = F.log_softmax(self.teacher(input_ids=ids.to(self.teacher.device), use_cache=False).logits.float(), -1)
            s = F.log_softmax(logits.float(), -1)
            loss = F.kl_div(s, t.to(s.device), log_target=True, reduction="sum") / ids.numel()
        return (loss, {"logits": logits}) if return_outputs else loss


def distill(peft_model, windows: torch.Tensor, teacher, max_steps: int = 200, learning_rate: float = 2e-4,
            batch_size: int = 1, gradient_accumulation_steps: int = 1, warmup_ratio: float = 0.05,
            weight_decay: float = 0.0, seed: int = 0, output_dir: str | None = None, callbacks=None,
            logging_steps: int = 10, **training_kwargs):
    """Train the LoRA factors of ``peft_model`` by KL distillation; returns the ``Trainer``.

    Args:
        peft_model: the corrected model (only its LoRA parameters are trainable).
        windows: ``[N, T]`` calibration token ids (the teacher cache's windows, same order).
        teacher: `TeacherCache` of ``windows`` or the dense model.
        max_steps: training steps (cosine schedule, AdamW).
        learning_rate: peak learning rate.
        batch_size: windows per step.
        gradient_accumulation_steps: as in ``TrainingArguments``.
        warmup_ratio: fraction of the steps spent warming up.
        weight_decay: AdamW weight decay.
        seed: seed of the data order and of the initialisation.
        logging_steps: log every this many steps.
        output_dir: Trainer folder (default: a temporary one; nothing is checkpointed).
        callbacks: extra ``TrainerCallback`` objects.
        training_kwargs: more ``TrainingArguments``.

    Examples:
        >>> trainer = distill(peft_model, calib, teacher_cache, max_steps=100)   # doctest: +SKIP
        >>> trainer.state.log_history[-1]["train_loss"]                          # doctest: +SKIP
    """
    if isinstance(teacher, TeacherCache) and teacher.num_windows != windows.shape[0]:
        raise ValueError(f"The teacher cache covers {teacher.num_windows} windows, the training set "
                         f"{windows.shape[0]}; build the cache on the same windows.")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameters: attach LoRA adapters first (attach_adapters).")
    tmp = None
    if output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="evopress-distill-")
        output_dir = tmp.name
    args = TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        warmup_steps=max(0, round(warmup_ratio * max_steps)), lr_scheduler_type="cosine", weight_decay=weight_decay,
        logging_steps=logging_steps, save_strategy="no", report_to=[], remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=seed, data_seed=seed,
        **training_kwargs,
    )
    trainer = KLDistillationTrainer(model=peft_model, args=args, train_dataset=WindowDataset(windows),
                                    teacher=teacher, callbacks=callbacks)
    try:
        trainer.train()
    finally:
        peft_model.eval()
        if tmp is not None:
            tmp.cleanup()
    return trainer
