"""Fitness and evaluation: teacher cache, KL divergence to the dense model, perplexity.

Teacher cache modes and their memory per cached token (V = vocabulary size, K = ``top_k``):

| mode | stores | bytes per token |
|---|---|---|
| ``full`` | all teacher log-probs (float16) | ``2 V``  (SmolLM2: 98,304; Gemma-3: 524,288) |
| ``topk`` | top-K log-probs (float32), their ids (int32) and the log of the rest mass | ``8 K + 4`` (K=512: 4,100, whatever V is) |

Top-K KL is the exact KL between the teacher and student distributions coarsened to
``top-K tokens + one "rest" bucket``; it is a lower bound of the full KL and, for K >= 256, ranks
candidates like the full KL.

Examples:
    >>> teacher = TeacherCache.build(model, windows, mode="topk", top_k=512)   # doctest: +SKIP
    >>> objective = KLObjective(model, windows, teacher, space)                # doctest: +SKIP
    >>> perplexity(model, evaluation_windows("wikitext2", tok))                # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .decoder import find_decoder_layout, logits_from_hidden, unwrap

CHUNK_TOKENS = 256  # rows of logits materialized at once
logger = logging.getLogger(__name__)


def _final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The last hidden state of ``input_ids`` (moved to the device of the model's embeddings)."""
    out = model.base_model(input_ids=input_ids.to(model.get_input_embeddings().weight.device), use_cache=False)
    return out.last_hidden_state


def _chunks(total: int, size: int = CHUNK_TOKENS):
    for s in range(0, total, size):
        yield slice(s, min(total, s + size))


class TeacherCache:
    """Dense-model next-token distributions on a fixed set of windows, computed once."""

    def __init__(self, mode: str, values: torch.Tensor, indices: torch.Tensor | None = None,
                 rest: torch.Tensor | None = None, vocab_size: int | None = None):
        if mode not in ("topk", "full"):
            raise ValueError(f"Teacher cache mode must be 'topk' or 'full', got {mode!r}.")
        self.mode, self.values, self.indices, self.rest = mode, values, indices, rest
        self.vocab_size = vocab_size or values.shape[-1]

    @property
    def num_windows(self) -> int:
        return self.values.shape[0]

    @property
    def bytes_per_token(self) -> int:
        per = self.values[0, 0].numel() * self.values.element_size()
        if self.indices is not None:
            per += self.indices[0, 0].numel() * self.indices.element_size() + self.rest.element_size()
        return per

    @classmethod
    @torch.inference_mode()
    def build(cls, model, windows: torch.Tensor, mode: str = "topk", top_k: int = 512,
              progress: bool = True) -> "TeacherCache":
        """Run the dense ``model`` on ``windows`` ([N, T] token ids) and keep its log-probs."""
        model = unwrap(model)
        if mode not in ("topk", "full"):
            raise ValueError(f"Teacher cache mode must be 'topk' or 'full', got {mode!r}.")
        n, t = windows.shape
        vocab = model.get_output_embeddings().weight.shape[0]
        if mode == "topk":
            k = min(top_k, vocab)
            values = torch.empty(n, t, k, dtype=torch.float32)
            indices = torch.empty(n, t, k, dtype=torch.int32)
            rest = torch.empty(n, t, dtype=torch.float32)
        else:
            values = torch.empty(n, t, vocab, dtype=torch.float16)
            indices = rest = None
        for i in tqdm(range(n), desc="Teacher cache", disable=not progress, dynamic_ncols=True):
            hidden = _final_hidden(model, windows[i : i + 1])[0]
            for sl in _chunks(t):
                lp = F.log_softmax(logits_from_hidden(model, hidden[sl]).float(), dim=-1)
                if mode == "topk":
                    top, idx = lp.topk(k, dim=-1)
                    values[i, sl], indices[i, sl] = top, idx.to(torch.int32)
                    rest[i, sl] = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
                else:
                    values[i, sl] = lp.to(torch.float16)
        return cls(mode, values, indices, rest, vocab)

    def save(self, path, manifest: dict) -> None:
        """Write the cache as safetensors plus a JSON manifest (written last, atomically)."""
        from safetensors.torch import save_file

        from .search.checkpoint import atomic_write_json

        from .faults import fault_point

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"values": self.values}
        if self.indices is not None:
            tensors.update(indices=self.indices, rest=self.rest)
        # the old manifest goes first: a crash below must not leave it describing new tensors
        (path / "manifest.json").unlink(missing_ok=True)
        tmp = path / "teacher.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, path / "teacher.safetensors")
        fault_point("teacher.write")
        atomic_write_json(path / "manifest.json", {**manifest, "mode": self.mode, "vocab_size": self.vocab_size})

    @classmethod
    def load(cls, path, manifest: dict) -> "TeacherCache | None":
        """Load a cache saved with the same ``manifest``; ``None`` if missing, stale or corrupt."""
        from safetensors.torch import load_file

        path = Path(path)
        try:
            saved = json.loads((path / "manifest.json").read_text())
            differ = sorted(k for k in manifest if saved.get(k) != manifest[k])
            if differ:
                logger.warning("The teacher cache in %s was built with another %s; rebuilding it.", path,
                               ", ".join(differ))
                return None
            t = load_file(str(path / "teacher.safetensors"))
            return cls(saved["mode"], t["values"], t.get("indices"), t.get("rest"), saved["vocab_size"])
        except Exception:  # missing or corrupt: rebuild
            return None

    def kl(self, window: int, rows: slice, student_logits: torch.Tensor) -> torch.Tensor:
        """Sum over ``rows`` of KL(teacher || student) for one window, on the student's device (the
        cache stays in host memory; one window's rows are moved)."""
        lq = F.log_softmax(student_logits.float(), dim=-1)
        device = lq.device
        if self.mode == "full":
            lp = self.values[window, rows].to(device).float()
            return (lp.exp() * (lp - lq)).sum()
        lp = self.values[window, rows].to(device)
        lq_top = lq.gather(-1, self.indices[window, rows].to(device).long())
        kl_top = (lp.exp() * (lp - lq_top)).sum(-1)
        rest_p = self.rest[window, rows].to(device)
        rest_q = torch.log1p(-lq_top.exp().sum(-1).clamp(max=1 - 1e-7))
        return (kl_top + rest_p.exp() * (rest_p - rest_q)).sum()


@torch.inference_mode()
def window_kl(model, input_ids: torch.Tensor, teacher: TeacherCache, window: int,
              hidden: torch.Tensor | None = None) -> float:
    """Mean per-token KL(teacher || model) on one cached window."""
    if hidden is None:
        hidden = _final_hidden(model, input_ids.unsqueeze(0))[0]
    total = 0.0
    for sl in _chunks(hidden.shape[0]):
        total += float(teacher.kl(window, sl, logits_from_hidden(model, hidden[sl])))
    return total / hidden.shape[0]


@torch.inference_mode()
def evaluate(model, windows: torch.Tensor, teacher: TeacherCache | None = None, progress: bool = True,
             desc: str = "Evaluating", per_window: bool = False) -> dict:
    """Perplexity (exp of the mean next-token NLL over all windows) and, with a teacher cache of
    the same windows, the mean per-token KL to the teacher. ``model`` may be a ``peft.PeftModel``.
    ``per_window=True`` adds ``window_nll`` (and ``window_kl``): the per-token means of each window,
    for paired comparisons of models on the same windows."""
    model = unwrap(model)
    window_nll, window_kl, window_targets = [], [], []
    for i in tqdm(range(windows.shape[0]), desc=desc, disable=not progress, dynamic_ncols=True):
        ids = windows[i]
        hidden = _final_hidden(model, ids.unsqueeze(0))[0]
        nll, count, kl = 0.0, 0, 0.0
        for sl in _chunks(ids.numel()):
            logits = logits_from_hidden(model, hidden[sl])
            if teacher is not None:
                kl += float(teacher.kl(i, sl, logits))
            targets = ids[sl.start + 1 : sl.stop + 1].to(logits.device)
            logits = logits[: targets.numel()]
            nll += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            count += targets.numel()
        window_nll.append(nll)
        window_kl.append(kl)
        window_targets.append(count)
    nll, count = sum(window_nll), sum(window_targets)
    out = {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}
    if teacher is not None:
        out["kl"] = sum(window_kl) / windows.numel()
    if per_window:
        out["window_nll"] = [v / c for v, c in zip(window_nll, window_targets)]
        if teacher is not None:
            out["window_kl"] = [v / windows.shape[1] for v in window_kl]
    return out


def perplexity(model, windows: torch.Tensor, progress: bool = True) -> float:
    """WikiText-style perplexity over non-overlapping windows."""
    return evaluate(model, windows, progress=progress)["perplexity"]


class KLObjective:
    """EvoPress fitness: mean per-token KL(dense || candidate) on calibration windows.

    Reuses work between a parent and its children: the inputs of every decoder layer under the
    current parent are cached per window, so a child that differs from the parent from layer ``d``
    on only runs layers ``d..L-1``. The parent's own score on a window is cached too, which makes
    its re-scoring at the last selection stage free when the window was seen before.

    Args:
        model: the model to score (its units are switched by ``space.apply``).
        windows: ``[N, T]`` calibration token ids (the pool the engine samples from).
        teacher: teacher cache of the same windows.
        space: a model search space with ``apply(model, candidate)`` and ``layer_of_unit``.
        reuse_prefix: turn the prefix reuse off (for measurements).
        cache_bytes: the most bytes of cached layer inputs kept on the model's device (``None``: no
            limit). Past it, inputs go to host memory, up to ``spill_bytes`` more (on a CPU model
            both are host memory); past both, a window's cache stops growing (its later layers are
            recomputed, the scores do not change). `stats` reports the bytes held.
        spill_bytes: the most bytes of cached inputs kept in host memory when the model is on
            another device (default 0).
    """

    def __init__(self, model, windows: torch.Tensor, teacher: TeacherCache, space, reuse_prefix: bool = True,
                 cache_bytes: int | None = None, spill_bytes: int = 0):
        if teacher.num_windows != windows.shape[0]:
            raise ValueError("The teacher cache must cover the same windows as the objective.")
        self.model, self.windows, self.teacher, self.space = unwrap(model), windows, teacher, space
        self.num_samples, self.tokens_per_sample = windows.shape
        self.reuse_prefix = reuse_prefix
        self.layers = find_decoder_layout(model).layers
        self.num_layers = len(self.layers)
        self.parent = None
        self.states: dict = {}  # window -> list of layer inputs under the parent (prefix)
        self.parent_scores: dict = {}
        self.cache_bytes, self.spill_bytes = cache_bytes, int(spill_bytes or 0)
        first = next(p for p in self.model.parameters())
        self.device = first.device
        hidden = getattr(self.model.config.get_text_config(), "hidden_size", None)
        # one cached entry: one window's input to one layer, in the dtype the layers run in
        self.entry_bytes = self.tokens_per_sample * (hidden or 1) * first.element_size()
        self.held = {"device": 0, "host": 0}
        self.peak_bytes = 0
        self.reset_stats()

    # -- the cache's memory
    def _tier(self, t: torch.Tensor) -> str:
        return "host" if t.device.type == "cpu" and self.device.type != "cpu" else "device"

    def _room(self) -> int:
        """How many more entries the budgets allow (on the device first, then spilled)."""
        if self.cache_bytes is None:
            return self.num_layers * self.num_samples
        device = max(0, self.cache_bytes - self.held["device"]) // self.entry_bytes
        host = max(0, self.spill_bytes - self.held["host"]) // self.entry_bytes if self.device.type != "cpu" else 0
        return int(device + host)

    def _keep(self, entries: list, start: int) -> None:
        """Account for the new entries ``entries[start:]``, moving those past the device budget to
        host memory (in place)."""
        for i in range(start, len(entries)):
            t = entries[i]
            size = t.numel() * t.element_size()
            if self.cache_bytes is not None and self.device.type != "cpu" and \
                    self.held["device"] + size > self.cache_bytes:
                t = entries[i] = t.to("cpu")
            self.held[self._tier(t)] += size
        self.peak_bytes = max(self.peak_bytes, self.held["device"] + self.held["host"])

    def _drop(self, entries: list) -> None:
        for t in entries:
            self.held[self._tier(t)] -= t.numel() * t.element_size()

    # -- prefix bookkeeping
    def first_changed_layer(self, a, b) -> int:
        diff = [self.space.layer_of_unit[u] for u, (x, y) in enumerate(zip(a, b)) if x != y]
        return min(diff) if diff else self.num_layers

    def set_parent(self, candidate) -> None:
        candidate = tuple(candidate)
        if self.parent is not None:
            d = self.first_changed_layer(self.parent, candidate)
            for w in self.states:
                self._drop(self.states[w][d + 1 :])
                del self.states[w][d + 1 :]
        self.parent = candidate
        self.parent_scores = {}

    @torch.inference_mode()
    def score(self, candidates: Sequence, sample_ids: Sequence[int]) -> list:
        """Mean KL of each candidate on the windows ``sample_ids``. In a multi-process run
        (`optimum_evo.distributed`) process ``r`` scores candidates ``r, r + world, ...`` and
        the scores are gathered, so every process returns the full list."""
        from . import distributed

        world, rank = distributed.world_size(), distributed.rank()
        mine = {}
        for i, cand in enumerate(candidates):
            if i % world != rank:
                continue
            cand = tuple(cand)
            self.space.apply(self.model, cand)
            total = 0.0
            for w in sample_ids:
                total += self._score_window(cand, int(w))
            mine[i] = total / len(sample_ids)
        if world == 1:
            return [mine[i] for i in range(len(candidates))]
        gathered = {}
        for part in distributed.all_gather_objects(mine):
            gathered.update(part)
        return [gathered[i] for i in range(len(candidates))]

    def _score_window(self, cand, w: int) -> float:
        self.window_scores += 1
        is_parent = cand == self.parent
        if is_parent and w in self.parent_scores:
            self.parent_hits += 1
            return self.parent_scores[w]
        if not self.reuse_prefix or self.parent is None:
            plan = dict(start=0, inject=None, record=range(0), sink=[])
        else:
            cached = self.states.setdefault(w, [])
            d = self.first_changed_layer(cand, self.parent)
            have = len(cached) - 1  # inputs of layers 0..have are cached
            start = min(d, have) if have >= 0 else 0
            record = range(max(start, have + 1), min(d, self.num_layers - 1) + 1)
            inject = cached[start].to(self.device) if have >= 0 else None
            plan = dict(start=start, inject=inject, record=record[: self._room()], sink=cached)
        before = len(plan["sink"])
        with _run_from_layer(self.layers, **plan):
            value = window_kl(self.model, self.windows[w], self.teacher, w)
        self._keep(plan["sink"], before)
        self.layers_run += self.num_layers - plan["start"]
        if is_parent:
            self.parent_scores[w] = value
        return value

    def reset_stats(self) -> None:
        self.layers_run = 0  # decoder-layer forwards actually executed
        self.window_scores = 0  # (candidate, window) scores asked for
        self.parent_hits = 0  # ... answered from the parent's score cache

    def stats(self) -> dict:
        """Work done so far: decoder-layer forwards run vs what scoring without reuse would run."""
        naive = self.window_scores * self.num_layers
        return {
            "window_scores": self.window_scores,
            "parent_cache_hits": self.parent_hits,
            "decoder_layer_forwards": self.layers_run,
            "decoder_layer_forwards_without_reuse": naive,
            "compute_saved": round(1 - self.layers_run / naive, 4) if naive else 0.0,
            "prefix_cache_bytes": self.held["device"] + self.held["host"],
            "prefix_cache_spilled_bytes": self.held["host"],
            "prefix_cache_peak_bytes": self.peak_bytes,
            "prefix_cache_budget_bytes": None if self.cache_bytes is None else self.cache_bytes + (
                self.spill_bytes if self.device.type != "cpu" else 0),
        }


class _SkippedLayer(nn.Module):
    """Stands in for a decoder layer whose output is replaced anyway: returns its input."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


_SKIPPED = _SkippedLayer()


def _hidden_states(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _run_from_layer(layers: nn.ModuleList, start: int, inject, record, sink: list):
    """While active, a forward of the model computes only layers ``start..``: the layers before
    ``start`` are swapped for a pass-through and layer ``start`` gets ``inject`` as its input
    (unless ``None``). The inputs of the layers in ``record`` are appended to ``sink``."""
    def injector(module, args, kwargs):
        if args:
            return (inject, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": inject}

    handles = []
    if inject is not None:
        handles.append(layers[start].register_forward_pre_hook(injector, with_kwargs=True))
    for i in record:  # registered after the injector: layer `start` records the injected input
        handles.append(layers[i].register_forward_pre_hook(
            lambda module, args, kwargs: sink.append(_hidden_states(args, kwargs)), with_kwargs=True))
    skipped = [layers[i] for i in range(start)]
    for i in range(start):
        layers[i] = _SKIPPED
    try:
        yield
    finally:
        for i, layer in enumerate(skipped):
            layers[i] = layer
        for h in handles:
            h.remove()


def best_by_kl(objective: "KLObjective", candidates: dict, tokens: int, seed: int, progress: bool = True,
               desc: str = "Scoring") -> tuple:
    """Score named candidates on one seeded minibatch of about ``tokens`` calibration tokens
    (whole windows); returns ``(name of the best, {name: KL})``."""
    windows = objective.windows
    n = min(len(windows), max(1, -(-tokens // windows.shape[1])))
    ids = sorted(random.Random(seed).sample(range(len(windows)), n))
    names = list(candidates)
    with tqdm(total=len(names), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        values = objective.score([candidates[n] for n in names], ids)  # one call: spread over processes
        bar.update(len(names))
    scores = dict(zip(names, values))
    return min(scores, key=scores.get), scores
