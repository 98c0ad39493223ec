"""Metrics for ``transformers.Trainer`` and ``evaluate``: the KL divergence to the dense model.

* `KL_DIVERGENCE`: the path of an `evaluate` metric module, ``evaluate.load(KL_DIVERGENCE)``
  (local, no Hub access): mean per-token KL(reference || prediction) from two models' logits.
* `KLDivergenceMetric`: a ``compute_metrics`` for ``Trainer``: runs the dense (teacher) model on
  the evaluation inputs and scores the trained model's logits with that module. The value reaches
  the logs (and every ``report_to`` integration) as ``eval_kl_divergence``.

Examples:
    >>> import evaluate
    >>> kl = evaluate.load(KL_DIVERGENCE)                                          # doctest: +SKIP
    >>> kl.compute(predictions=student_logits, references=teacher_logits)["kl_divergence"]  # doctest: +SKIP
    >>> trainer = Trainer(model=model, args=args, eval_dataset=ds,                # doctest: +SKIP
    ...                   compute_metrics=KLDivergenceMetric(teacher=dense_model))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["KL_DIVERGENCE", "KLDivergenceMetric", "load_kl_divergence"]

#: Path of the `evaluate` module (pass it to ``evaluate.load``).
KL_DIVERGENCE = str(Path(__file__).with_name("kl_divergence.py"))


def load_kl_divergence(**kwargs):
    """``evaluate.load(KL_DIVERGENCE, **kwargs)``."""
    import evaluate

    return evaluate.load(KL_DIVERGENCE, **kwargs)


class KLDivergenceMetric:
    """``Trainer(compute_metrics=KLDivergenceMetric(teacher))``: KL(teacher || model) on the
    evaluation set, through the `KL_DIVERGENCE` module.

    The Trainer gathers the model's logits over the evaluation set (so keep it small: it holds
    ``examples x tokens x vocabulary`` floats) and calls this with them; the teacher (the dense
    model) is run here on the same tokens: the evaluation inputs when the Trainer passes them
    (``TrainingArguments(include_for_metrics=["inputs"])``), else the labels (causal LM datasets
    whose labels are their ``input_ids``). Positions whose token is ``ignore_index`` (padding) do
    not count.

    Args:
        teacher: the dense reference model (a causal LM).
        batch_size: windows per teacher forward.
        ignore_index: the label value of padded positions.
        prefix: the metric's name in the returned dict (``eval_`` is prepended by the Trainer).
    """

    def __init__(self, teacher, batch_size: int = 8, ignore_index: int = -100, prefix: str = "kl_divergence"):
        if not callable(teacher):
            raise TypeError("teacher must be a model (the dense reference causal LM).")
        self.teacher, self.batch_size, self.ignore_index, self.prefix = teacher, batch_size, ignore_index, prefix
        self._metric = None

    def _teacher_logits(self, ids: np.ndarray) -> np.ndarray:
        import torch

        device = next(self.teacher.parameters()).device
        out = []
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            with torch.inference_mode():
                for s in range(0, len(ids), self.batch_size):
                    batch = torch.as_tensor(ids[s:s + self.batch_size], device=device)
                    out.append(self.teacher(input_ids=batch).logits.float().cpu().numpy())
        finally:
            self.teacher.train(was_training)
        return np.concatenate(out)

    def __call__(self, eval_pred) -> dict:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, (tuple, list)) else eval_pred.predictions
        tokens = getattr(eval_pred, "inputs", None)
        if tokens is None:
            tokens = eval_pred.label_ids
        if tokens is None:
            raise ValueError("KLDivergenceMetric needs the evaluation tokens: set TrainingArguments("
                             "include_for_metrics=['inputs']) or give the dataset labels.")
        tokens = np.asarray(tokens)
        mask = tokens != self.ignore_index
        ids = np.where(mask, tokens, 0)
        logits = np.asarray(logits, dtype=np.float32)
        if logits.shape[:2] != ids.shape:
            raise ValueError(f"The logits {logits.shape} do not match the evaluation tokens {ids.shape}.")
        if self._metric is None:
            self._metric = load_kl_divergence()
        result = self._metric.compute(predictions=logits, references=self._teacher_logits(ids), mask=mask)
        return {self.prefix: result["kl_divergence"]}
