"""``transformers.Trainer`` callbacks for compressed models.

* `SparsityPreservingCallback`: re-applies each layer's sparsity mask after every optimizer
  step, so fine-tuning a pruned model keeps exactly its zeros.
* `EvaluationCallback`: at every evaluation, adds ``eval_kl`` (KL to the dense teacher) and
  ``eval_ppl`` (perplexity) on fixed token windows to the metrics, and logs them to every
  ``report_to`` integration (W&B, TensorBoard, ...).
* `CompressAfterTrainingCallback`: at the end of training, runs an EvoPress search on the
  trained model and saves (optionally pushes) the compressed result.

Examples:
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds,                 # doctest: +SKIP
    ...                   callbacks=[SparsityPreservingCallback(model),
    ...                              EvaluationCallback(eval_ids, teacher=TeacherCache.build(dense, eval_ids))])

For a KL metric computed by the Trainer itself (``compute_metrics``), see
`optimum_evo.integrations.metrics.KLDivergenceMetric`.
"""

from __future__ import annotations

import copy
import logging
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from ..decoder import unwrap

logger = logging.getLogger(__name__)


class SparsityPreservingCallback(TrainerCallback):
    """Keep every sparse linear's zeros at zero during fine-tuning.

    Masks (``weight != 0``) are taken from the model when the callback is created, or at the start
    of training when ``model`` is not given, for every ``nn.Linear`` whose fraction of zeros is at
    least ``min_sparsity`` (or for the ``modules`` listed). After each optimizer step the masked
    weights are zeroed again, so each layer keeps exactly its sparsity and pattern (optimizer
    states such as momentum do not leak into pruned weights).

    Args:
        model: the model to protect (optional; else the Trainer's model at ``on_train_begin``).
        min_sparsity: smallest fraction of exact zeros for a linear to count as sparse.
        modules: explicit module names (as in ``model.named_modules()``) instead of the threshold.

    Examples:
        >>> cb = SparsityPreservingCallback(pruned_model)                  # doctest: +SKIP
        >>> Trainer(model=pruned_model, args=args, train_dataset=ds, callbacks=[cb]).train()  # doctest: +SKIP
        >>> cb.sparsity()       # {module: fraction of zeros}, unchanged  # doctest: +SKIP
    """

    def __init__(self, model=None, min_sparsity: float = 0.05, modules=None):
        if not 0 < min_sparsity <= 1:
            raise ValueError(f"min_sparsity must be in (0, 1], got {min_sparsity}.")
        self.min_sparsity, self.modules = min_sparsity, None if modules is None else list(modules)
        self.masks: dict = {}
        self._params: dict = {}
        if model is not None:
            self.capture(model)

    @torch.no_grad()
    def capture(self, model) -> dict:
        """Record the masks of ``model``'s sparse linears; returns ``{name: fraction of zeros}``."""
        self.masks, self._params = {}, {}
        named = dict(unwrap(model).named_modules())
        if self.modules is not None:
            missing = [n for n in self.modules if n not in named]
            if missing:
                raise ValueError(f"Modules not found in the model: {missing[:3]}.")
            chosen = {n: named[n] for n in self.modules}
        else:  # adapter factors (peft's lora_A / lora_B, zero-initialised) are never "sparse"
            chosen = {n: m for n, m in named.items() if isinstance(m, nn.Linear)
                      and not any(part.startswith("lora_") for part in n.split("."))}
        for name, m in chosen.items():
            w = getattr(m, "weight", None)
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                continue
            keep = w != 0
            if self.modules is not None or 1 - keep.float().mean() >= self.min_sparsity:
                self.masks[name], self._params[name] = keep, w
        if not self.masks:
            logger.warning("SparsityPreservingCallback found no sparse linear (min_sparsity=%s).", self.min_sparsity)
        return self.sparsity()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights again."""
        for name, keep in self.masks.items():
            w = self._params[name]
            if keep.device != w.device:
                self.masks[name] = keep = keep.to(w.device)
            w.mul_(keep)

    def sparsity(self) -> dict:
        """Current fraction of zeros of every protected linear."""
        return {n: float((self._params[n] == 0).float().mean()) for n in self.masks}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.masks and model is not None:
            self.capture(model)
        elif self.masks and model is not None:
            # the Trainer may have moved the model: re-bind the (same-named) parameters
            named = dict(unwrap(model).named_modules())
            for n in self.masks:
                if n in named:
                    self._params[n] = named[n].weight
        self.apply()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.apply()


class EvaluationCallback(TrainerCallback):
    """Log ``eval_kl`` and ``eval_ppl`` at every evaluation, to every ``report_to`` integration.

    Runs `optimum_evo.fitness.evaluate` on fixed ``[N, T]`` token windows (e.g. WikiText-2,
    `optimum_evo.data.evaluation_windows`): perplexity, and the mean per-token
    KL(teacher || model) when a teacher cache of the same windows is given. The values, under
    ``{prefix}_kl`` and ``{prefix}_ppl``, are:

    * logged through the Trainer's callbacks (``on_log``), so W&B, TensorBoard, MLflow and any other
      ``report_to`` integration record them at the evaluation's step (transformers logs the
      evaluation metrics *before* the ``on_evaluate`` event, so adding them to ``metrics`` alone
      would not reach those integrations);
    * added to the metrics dict returned by ``trainer.evaluate()``;
    * merged into the evaluation entry of ``trainer.state.log_history`` (hence
      ``trainer_state.json``).

    The callback logs through the Trainer that runs it (its ``callback_handler``): the one given
    as ``trainer``, else the one whose event it is handling.

    Args:
        windows: ``[N, T]`` token ids.
        teacher: a `TeacherCache` built on ``windows`` by the dense
            model (``None``: perplexity only).
        prefix: metric prefix (``"eval"``).
        trainer: the ``Trainer`` to log through (optional).

    Examples:
        >>> ids = evaluation_windows("wikitext2", tok, 512, max_windows=8)                # doctest: +SKIP
        >>> cb = EvaluationCallback(ids, teacher=TeacherCache.build(dense, ids))           # doctest: +SKIP
        >>> trainer = Trainer(..., eval_dataset=ds, callbacks=[cb])                         # doctest: +SKIP
        >>> trainer.evaluate()["eval_ppl"]       # also logged to TensorBoard, W&B, ...   # doctest: +SKIP
    """

    def __init__(self, windows: torch.Tensor, teacher=None, prefix: str = "eval", trainer=None):
        if windows.dim() != 2:
            raise ValueError(f"windows must be [N, T] token ids, got shape {tuple(windows.shape)}.")
        if teacher is not None and teacher.num_windows != windows.shape[0]:
            raise ValueError("The teacher cache must be built on the same windows.")
        self.windows, self.teacher, self.prefix, self.trainer = windows, teacher, prefix, trainer
        self.history: list = []
        self._warned = False

    def compute(self, model) -> dict:
        from ..fitness import evaluate

        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            # a PeftModel's LoRA layers live inside its base model, which `evaluate` understands
            r = evaluate(unwrap(model), self.windows.to(device), self.teacher, progress=False)
        finally:
            model.train(was_training)
        out = {f"{self.prefix}_ppl": r["perplexity"]}
        if "kl" in r:
            out[f"{self.prefix}_kl"] = r["kl"]
        return out

    def _handler(self):
        """The Trainer's ``CallbackHandler``: the given trainer's, else the one calling this event."""
        if self.trainer is not None:
            return self.trainer.callback_handler
        from transformers.trainer_callback import CallbackHandler

        frame = sys._getframe(1)
        for _ in range(16):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler):
                return owner
            frame = frame.f_back
        return None

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if model is None:
            return
        values = self.compute(model)
        self.history.append({"step": state.global_step, **values})
        if metrics is not None:
            metrics.update(values)
        # the Trainer logged the metrics just before this event: complete its log entry ...
        for entry in reversed(state.log_history):
            if entry.get("step") == state.global_step and any(k.startswith(f"{self.prefix}_") for k in entry):
                entry.update(values)
                break
        else:
            state.log_history.append({**values, "step": state.global_step})
        logger.info("step %d: %s", state.global_step, values)
        # ... and send the values to the integrations (report_to), which only see `on_log`
        handler = self._handler()
        if handler is None:
            if not self._warned:
                self._warned = True
                logger.warning("EvaluationCallback is not run by a Trainer; pass trainer= to log %s to the "
                               "report_to integrations.", sorted(values))
            return control
        logs = dict(values)
        if state.epoch is not None:
            logs["epoch"] = state.epoch
        return handler.on_log(args, state, control, logs)


class CompressAfterTrainingCallback(TrainerCallback):
    """Run an EvoPress search on the trained model when training ends; save (and push) the result.

    The trained model (merged first when it is a ``PeftModel``, on a copy) is saved to a temporary
    folder with the tokenizer, then `optimum_evo.pipeline.run_search` compresses it with
    ``search_arguments`` (``model`` and ``output_dir`` are filled in). The compressed model lands in
    ``output_dir/model``; the search report is kept in `report`.

    Args:
        search_arguments: a `SearchArguments` or a dict of its
            fields (e.g. ``{"compression": "depth", "target": 0.25}``).
        output_dir: where the search writes (default: ``<trainer output_dir>/evopress``).
        push_to_hub: a repo id to upload ``output_dir/model`` to (created when missing).
        hub_kwargs: more arguments of `optimum_evo.integrations.hub.upload_folder` (``private``, ``token``, ...).
        tokenizer: saved with the model (default: the Trainer's ``processing_class``).

    Examples:
        >>> cb = CompressAfterTrainingCallback({"compression": "depth", "target": 0.25})   # doctest: +SKIP
        >>> Trainer(..., callbacks=[cb]).train()                                          # doctest: +SKIP
        >>> cb.report["results"]["evopress"]["perplexity"]                               # doctest: +SKIP
    """

    def __init__(self, search_arguments, output_dir: str | None = None, push_to_hub: str | None = None,
                 tokenizer=None, hub_kwargs: dict | None = None):
        from ..settings import SearchArguments

        if isinstance(search_arguments, dict):
            fields = {"model": "unused", **search_arguments}
            SearchArguments(**fields)  # validate now, not after hours of training
            self.search_arguments = dict(search_arguments)
        elif isinstance(search_arguments, SearchArguments):
            self.search_arguments = {k: getattr(search_arguments, k) for k in search_arguments.__dataclass_fields__}
        else:
            raise TypeError("search_arguments must be a SearchArguments or a dict of its fields.")
        self.output_dir, self.push_to_hub, self.tokenizer = output_dir, push_to_hub, tokenizer
        self.hub_kwargs = hub_kwargs or {}
        self.report = None

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        from ..pipeline import run_search
        from ..settings import SearchArguments

        if model is None:
            raise ValueError("CompressAfterTrainingCallback needs the model at on_train_end.")
        if not state.is_world_process_zero:
            return
        tokenizer = self.tokenizer or processing_class
        if tokenizer is None:
            raise ValueError("CompressAfterTrainingCallback needs a tokenizer: pass tokenizer= or give the Trainer a "
                             "processing_class.")
        out = Path(self.output_dir or Path(args.output_dir) / "evopress")
        trained = model
        if callable(getattr(model, "merge_and_unload", None)):
            trained = copy.deepcopy(model).merge_and_unload()
        from ..card import public_model_name

        # the folder's name is what the saved checkpoint records as its base model
        name = (public_model_name(getattr(model, "name_or_path", None)) or "model").split("/")[-1] + "-fine-tuned"
        with tempfile.TemporaryDirectory(prefix="evopress-trained-") as tmp:
            folder = Path(tmp) / name
            trained.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            fields = {**self.search_arguments, "model": str(folder), "output_dir": str(out), "save_model": True}
            self.report = run_search(SearchArguments(**fields))
        # the saved config records where the model came from; point it at the result, not the temp folder
        self.report["model"] = "trained model (CompressAfterTrainingCallback)"
        logger.info("Compressed the trained model into %s", out / "model")
        if self.push_to_hub:
            from .hub import upload_folder

            upload_folder(out / "model", self.push_to_hub, **{"commit_message": "EvoPress-compressed model (optimum-evo)",
                                                               **self.hub_kwargs})
        return control
