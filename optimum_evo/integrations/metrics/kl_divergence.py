"""KL divergence between next-token distributions, as an `evaluate` metric module.

Load it with ``evaluate.load`` from its file (no Hub access): ``evaluate.load(KL_DIVERGENCE)``
with ``from optimum_evo.integrations.metrics import KL_DIVERGENCE``. The module is standalone (it
imports only numpy, datasets and evaluate), as ``evaluate`` copies it into its module cache.
"""

import datasets
import evaluate
import numpy as np

_CITATION = """@inproceedings{sieberling2025evopress,
  title     = {{EvoPress}: Accurate Dynamic Model Compression via Evolutionary Search},
  author    = {Sieberling, Oliver and Kuznedelev, Denis and Kurtic, Eldar and Alistarh, Dan},
  booktitle = {Proceedings of the 42nd International Conference on Machine Learning (ICML)},
  year      = {2025}
}"""

_DESCRIPTION = """Mean per-token KL(reference || prediction) between two models' next-token distributions: the
fitness EvoPress scores compressed models by, with the dense model as the reference (teacher)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the evaluated model's logits (or log-probabilities), one ``[tokens, vocabulary]``
        array per example.
    references: the reference (dense) model's logits on the same tokens, same shapes.
    mask: optional ``[examples, tokens]`` booleans: the positions that count (default: all).
    from_logits: ``True`` (default): the inputs are logits and are normalised with a log-softmax;
        ``False``: they are log-probabilities already.
Returns:
    kl_divergence: the mean over the counted positions, in nats.
    tokens: the number of counted positions.
Examples:
    >>> kl = evaluate.load(KL_DIVERGENCE)                                        # doctest: +SKIP
    >>> kl.compute(predictions=student_logits, references=teacher_logits)      # doctest: +SKIP
    {'kl_divergence': 0.0312, 'tokens': 2048}
"""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KLDivergence(evaluate.Metric):
    """KL(reference || prediction) per token, averaged."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                "references": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
            }),
            reference_urls=["https://arxiv.org/abs/2410.14649"],
        )

    def _compute(self, predictions, references, mask=None, from_logits=True):
        total, count = 0.0, 0
        for i, (pred, ref) in enumerate(zip(predictions, references)):
            pred, ref = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
            if pred.shape != ref.shape:
                raise ValueError(f"Example {i}: predictions {pred.shape} and references {ref.shape} differ in shape.")
            if from_logits:
                pred, ref = _log_softmax(pred), _log_softmax(ref)
            per_token = (np.exp(ref) * (ref - pred)).sum(axis=-1)
            if mask is not None:
                keep = np.asarray(mask[i], dtype=bool)[: per_token.shape[0]]
                per_token = per_token[keep]
            total += float(per_token.sum())
            count += int(per_token.size)
        if count == 0:
            raise ValueError("No positions to compare: every position is masked out.")
        return {"kl_divergence": total / count, "tokens": count}
