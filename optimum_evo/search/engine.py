"""The (1 + lambda) evolutionary engine with multi-step selection (EvoPress).

Model-agnostic: it sees a space (a `LevelSpace` of exact budgets or a `BudgetSpace` of
costs under a budget: anything with ``validate``, ``check_initial``, ``mutate`` and
``fingerprint``) and an *objective*, any
object with

* ``num_samples`` (int): size of the calibration pool, in samples (sequences);
* ``tokens_per_sample`` (int): tokens in one sample;
* ``score(candidates, sample_ids) -> list[float]``: fitness of each candidate on those samples,
  lower is better (e.g. KL divergence to the dense model);
* optionally ``set_parent(candidate)``: told the current parent, so it can reuse work shared by
  the parent and its children (e.g. activations of an unchanged prefix).

A space whose ``structure_share()`` is not ``None`` (a `BudgetSpace` with sub-trees, such as the
joint depth + bits space) has two kinds of move: structural ones (a sub-block dropped or restored)
and level ones (a linear up or down a level). By default a switch's primary unit is drawn
uniformly, so structural moves come at the share of sub-blocks among the units. With
``SearchConfig(structure_moves="adaptive")`` the engine adapts that share as it goes, with
the two-rate scheme of the self-adjusting (1 + lambda) EA (Doerr, Giessen, Witt and Yang, 2017):
half of a generation's offspring are drawn at half the current rate, half at twice it, and the rate
moves to the one whose half produced the best child (or, with probability 1/2, to a random one of
the two, so it cannot get stuck). It starts at the space's uniform share, stays within one unit's
share and 1/2, and is part of the checkpoint. Spaces without sub-trees draw their moves the same way either way.

Examples:
    >>> space = LevelSpace(("a", "b", "c", "d"), (2, 2, 2, 2), (0, 0, 0, 0))
    >>> class Obj:
    ...     num_samples, tokens_per_sample = 8, 1
    ...     def score(self, cands, ids):
    ...         return [float(c[0] + 2 * c[1]) for c in cands]
    >>> cfg = SearchConfig(generations=10, offspring=4, stages=((1, 2),), init_tokens=2)
    >>> EvolutionarySearch(space, Obj(), cfg, progress=False).run([(1, 1, 0, 0)]).best
    (0, 0, 1, 1)
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from ..faults import fault_point
from .checkpoint import atomic_write_json, read_json, rng_state_from_json, rng_state_to_json
from .config import SearchConfig
from .budget import BudgetSpace
from .space import Candidate, LevelSpace

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "search_state.json"
#: 2: the checkpoint records the run's identity (see ``EvolutionarySearch(identity=...)``).
CHECKPOINT_VERSION = 2


@dataclass
class SearchResult:
    """Outcome of a search: the best candidate, its last fitness and the full history."""

    best: Candidate
    fitness: float
    history: list = field(default_factory=list)
    initial_scores: list = field(default_factory=list)
    generations: int = 0
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None

    def to_dict(self) -> dict:
        return {
            "best": list(self.best),
            "fitness": self.fitness,
            "generations": self.generations,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "resumed_from": self.resumed_from,
            "initial_scores": self.initial_scores,
            "history": self.history,
        }


@dataclass
class SearchState:
    """Where a search stands after a generation: what a checkpoint holds (besides the fingerprints
    of the space, the settings and the initial candidates that a resume must match)."""

    parent: Candidate
    fitness: float | None
    rng: random.Random
    generation: int = 0
    history: list = field(default_factory=list)
    initial_scores: list = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    stale: int = 0  # generations since the parent last changed
    structure_rate: float | None = None  # share of structural moves (spaces with sub-trees only)

    def to_json(self) -> dict:
        return {"generation": self.generation, "parent": list(self.parent), "fitness": self.fitness,
                "rng_state": rng_state_to_json(self.rng.getstate()), "history": self.history,
                "initial_scores": self.initial_scores, "tokens": self.tokens, "seconds": self.seconds,
                "stale": self.stale, "structure_rate": self.structure_rate}

    @classmethod
    def from_json(cls, data: dict) -> "SearchState":
        rng = random.Random()
        rng.setstate(rng_state_from_json(data["rng_state"]))
        return cls(parent=tuple(data["parent"]), fitness=data["fitness"], rng=rng, generation=data["generation"],
                   history=data["history"], initial_scores=data["initial_scores"], tokens=data["tokens"],
                   seconds=data["seconds"], stale=data["stale"], structure_rate=data.get("structure_rate"))


class EvolutionarySearch:
    """Run EvoPress's evolutionary search.

    Args:
        space: the units and levels, and how a mutation keeps the budget (`LevelSpace`,
            `BudgetSpace`).
        objective: scores candidates (see module docstring).
        config: generations, offspring, selection stages, seed.
        checkpoint_dir: when given, the state is written atomically after every generation to
            ``checkpoint_dir/search_state.json`` and a later ``run`` with the same settings resumes
            from it (and ends exactly where an uninterrupted run ends).
        progress: show a tqdm bar with the best fitness.
        callback: called as ``callback(generation, entry)`` after each checkpoint: ``entry`` is the
            generation's history entry plus ``"parent"``, the parent after it (an exception raised
            there stops the search, which resumes from that checkpoint).
        identity: what else decides the result (e.g. the model's weight digest, the calibration
            tokens' digest, the fitness mode, its K, the dtype), as ``{setting: value}``; a resume
            whose identity differs is refused with a message naming each differing setting.
        write_checkpoints: write the checkpoint (in a multi-process run only process 0 does; every
            process reads it to resume).
    """

    def __init__(
        self,
        space: "LevelSpace | BudgetSpace",
        objective,
        config: SearchConfig,
        checkpoint_dir=None,
        progress: bool = True,
        callback: Callable | None = None,
        identity: dict | None = None,
        write_checkpoints: bool = True,
    ):
        if config.generations is None:
            raise ValueError("config.generations is None: call config.resolve_generations(...) first.")
        self.space = space
        self.objective = objective
        self.config = config
        self.checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
        self.progress = progress
        self.callback = callback
        self.identity = dict(identity or {})
        self.write_checkpoints = write_checkpoints

    # ------------------------------------------------------------------ helpers
    def _num_samples(self, tokens: int) -> int:
        per = max(1, int(self.objective.tokens_per_sample))
        return max(1, min(int(self.objective.num_samples), math.ceil(tokens / per)))

    def _minibatch(self, rng: random.Random, tokens: int) -> list:
        k = self._num_samples(tokens)
        return sorted(rng.sample(range(int(self.objective.num_samples)), k))

    def _score(self, candidates: Sequence[Candidate], sample_ids: Sequence[int]) -> list:
        scores = [float(s) for s in self.objective.score(list(candidates), list(sample_ids))]
        if len(scores) != len(candidates):
            raise RuntimeError(f"Objective returned {len(scores)} scores for {len(candidates)} candidates.")
        return scores

    def _set_parent(self, parent: Candidate) -> None:
        hook = getattr(self.objective, "set_parent", None)
        if hook is not None:
            hook(parent)

    def _structure_share(self) -> float | None:
        share = getattr(self.space, "structure_share", None)
        return share() if share is not None else None

    def _make_offspring(self, parent: Candidate, rng: random.Random, rate: float | None = None) -> tuple:
        """``(children, halves)``: distinct children of ``parent``; with a structure ``rate``, the
        first half drawn at ``rate / 2`` and the rest at ``2 * rate`` (``halves[i]``: 0 or 1)."""
        children: list = []
        halves: list = []
        seen = {parent}
        attempts = 0
        max_attempts = 200 * self.config.offspring
        while len(children) < self.config.offspring and attempts < max_attempts:
            attempts += 1
            half = int(len(children) >= self.config.offspring // 2)
            if rate is None:
                child = self.space.mutate(parent, rng, self.config.max_switches)
            else:
                child = self.space.mutate(parent, rng, self.config.max_switches,
                                          structure_rate=min(1.0, rate * (2.0 if half else 0.5)))
            if child in seen:  # duplicates (and the parent itself) are rejected
                continue
            seen.add(child)
            children.append(child)
            halves.append(half)
        return children, halves

    def _adapt_rate(self, rate: float, winner_half: int | None, rng: random.Random, share: float) -> float:
        """The two-rate update: the winning half's rate, or (probability 1/2) a random one of the two;
        within ``[1 / num_units, max(share, 1/2)]``."""
        if winner_half is None:
            return rate
        if rng.random() < 0.5:
            rate = rate * (2.0 if winner_half else 0.5)
        else:
            rate = rate * rng.choice((0.5, 2.0))
        return min(max(share, 0.5), max(1.0 / self.space.num_units, rate))

    def _load_checkpoint(self) -> "SearchState | None":
        if self.checkpoint_path is None:
            return None
        data = read_json(self.checkpoint_path)
        if data is None:
            return None
        mismatch = []
        if data.get("version") != CHECKPOINT_VERSION:
            mismatch.append("checkpoint version")
        if data.get("space") != self.space.fingerprint():
            mismatch.append("search space (model, compression or target)")
        if data.get("config") != self.config.fingerprint():
            mismatch.append("search settings (preset, generations, offspring, stages or seed)")
        if data.get("initial") != self._initial_key:
            mismatch.append("initial candidates")
        saved = data.get("identity") or {}
        for key in sorted(set(saved) | set(self.identity)):
            if saved.get(key) != self.identity.get(key):
                mismatch.append(f"{key} ({saved.get(key)!r} there, {self.identity.get(key)!r} now)")
        if mismatch:
            raise ValueError(
                f"The checkpoint {self.checkpoint_path} was written by a search with a different "
                f"{', '.join(mismatch)}. Use another output directory, or delete the checkpoint to start afresh."
            )
        return SearchState.from_json(data)

    def _checkpoint(self, state: "SearchState") -> None:
        if self.checkpoint_path is None or not self.write_checkpoints:
            return
        fingerprints = {"version": CHECKPOINT_VERSION, "space": self.space.fingerprint(),
                        "config": self.config.fingerprint(), "initial": self._initial_key, "identity": self.identity}
        atomic_write_json(self.checkpoint_path, {**fingerprints, **state.to_json()}, fault="search.checkpoint.write")
        fault_point("search.checkpoint")

    # ------------------------------------------------------------------ main loop
    def run(self, initial: Sequence[Sequence[int]]) -> SearchResult:
        """Search from the best of ``initial`` (all with the same budget) and return the result."""
        if not initial:
            raise ValueError("run() needs at least one initial candidate.")
        initial = [self.space.validate(c) for c in initial]
        self.space.check_initial(initial)
        self._initial_key = [list(c) for c in initial]
        cfg = self.config

        state = self._load_checkpoint()
        if state is not None:
            logger.info("Resuming search at generation %d from %s", state.generation, self.checkpoint_path)
            resumed_from = state.generation
        else:
            rng = random.Random(cfg.seed)
            start = time.perf_counter()
            tokens = 0
            if len(initial) > 1:
                ids = self._minibatch(rng, cfg.init_tokens)
                initial_scores = self._score(initial, ids)
                tokens += len(initial) * len(ids) * self.objective.tokens_per_sample
                best_i = min(range(len(initial)), key=lambda i: (initial_scores[i], i))
            else:
                initial_scores, best_i = [], 0
            state = SearchState(parent=initial[best_i], fitness=initial_scores[best_i] if initial_scores else None,
                                rng=rng, initial_scores=initial_scores, tokens=tokens,
                                seconds=time.perf_counter() - start)
            resumed_from = None
            self._checkpoint(state)

        seconds_before = state.seconds
        rng = state.rng
        adaptive = cfg.structure_moves == "adaptive" and cfg.offspring >= 2  # two halves to compare
        share = self._structure_share() if adaptive else None
        if share is not None and state.structure_rate is None:
            state.structure_rate = share
        self._set_parent(state.parent)
        start = time.perf_counter()
        bar = tqdm(total=cfg.generations, initial=state.generation, desc="EvoPress search", disable=not self.progress,
                   dynamic_ncols=True)
        if state.fitness is not None:
            bar.set_postfix(best=f"{state.fitness:.4f}")
        while state.generation < cfg.generations and (cfg.patience is None or state.stale < cfg.patience):
            parent = state.parent
            rate = state.structure_rate if share is not None else None
            candidates, halves = self._make_offspring(parent, rng, rate)
            gen_tokens = 0
            parent_score = None
            for s_idx, stage in enumerate(cfg.stages):
                last = s_idx == len(cfg.stages) - 1
                ids = self._minibatch(rng, stage.tokens)
                pool = candidates + [parent] if last else candidates
                scores = self._score(pool, ids)
                gen_tokens += len(pool) * len(ids) * self.objective.tokens_per_sample
                if last:
                    parent_score = scores[-1]
                    child_scores = scores[:-1]
                else:
                    child_scores = scores
                order = sorted(range(len(candidates)), key=lambda i: (child_scores[i], i))
                keep = order[: stage.survivors]
                candidates = [candidates[i] for i in keep]
                halves = [halves[i] for i in keep]
                best_child_score = child_scores[keep[0]] if keep else math.inf
            changed = bool(candidates) and best_child_score < parent_score
            previous_score = parent_score  # the parent's score on the tokens that decided
            if changed and cfg.confirm_tokens:
                ids = self._minibatch(rng, cfg.confirm_tokens)
                best_child_score, parent_score = self._score([candidates[0], parent], ids)
                gen_tokens += 2 * len(ids) * self.objective.tokens_per_sample
                changed = best_child_score < parent_score
                previous_score = parent_score
            if rate is not None:
                state.structure_rate = self._adapt_rate(rate, halves[0] if halves else None, rng, share)
            if changed:
                state.parent, state.fitness, state.stale = candidates[0], best_child_score, 0
                self._set_parent(state.parent)
            else:
                state.fitness = parent_score
                state.stale += 1
            state.generation += 1
            state.tokens += gen_tokens
            state.seconds = seconds_before + time.perf_counter() - start
            state.history.append({
                "generation": state.generation,
                "best_fitness": state.fitness,
                "parent_changed": changed,
                "previous_parent_fitness": previous_score,
                "tokens": gen_tokens,
                "total_tokens": state.tokens,
                "seconds": round(state.seconds, 3),
                **({"structure_rate": rate} if rate is not None else {}),
            })
            self._checkpoint(state)
            bar.update(1)
            bar.set_postfix(best=f"{state.fitness:.4f}")
            if self.callback is not None:
                self.callback(state.generation, {**state.history[-1], "parent": list(state.parent)})
        bar.close()
        return SearchResult(
            best=state.parent,
            fitness=state.fitness,
            history=state.history,
            initial_scores=state.initial_scores,
            generations=state.generation,
            tokens=state.tokens,
            seconds=seconds_before + time.perf_counter() - start,
            resumed_from=resumed_from,
        )
