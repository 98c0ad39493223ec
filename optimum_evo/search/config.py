"""Search settings.

Presets are tables ``{preset name: SearchConfig keyword arguments}``; every compression method
has its own (`optimum_evo.methods.CompressionMethod.presets`).

Examples:
    >>> table = {"tiny": dict(generations=5, offspring=4, stages=((1, 64),), init_tokens=64)}
    >>> cfg = SearchConfig.from_preset("tiny", table, offspring=8)
    >>> cfg.offspring, [(s.survivors, s.tokens) for s in cfg.stages]
    (8, [(1, 64)])
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Stage:
    """One selection stage: score every remaining candidate on ``tokens`` fresh tokens and keep
    the best ``survivors``. At the last stage the parent is re-scored on the same tokens."""

    survivors: int
    tokens: int

    def __post_init__(self):
        if self.survivors < 1:
            raise ValueError(f"A stage must keep at least one survivor, got {self.survivors}.")
        if self.tokens < 1:
            raise ValueError(f"A stage must score on at least one token, got {self.tokens}.")


@dataclass(frozen=True)
class SearchConfig:
    """Settings of the (1 + lambda) evolutionary search.

    Args:
        generations: number of generations (``None`` = the preset's rule for the space size).
        offspring: children created per generation (lambda).
        stages: multi-step selection, e.g. ``(Stage(2, 2048), Stage(1, 32768))``. The last stage
            must keep exactly one survivor.
        init_tokens: tokens used to pick the best of several initial candidates.
        max_switches: a mutation applies ``min(U{1..m}, U{1..m})`` level switches.
        patience: stop after this many generations without a new parent (``None`` = never).
        seed: seed of every random choice (mutations and minibatches).
        confirm_tokens: when the best child beats the parent at the last stage, score both again
            on this many fresh tokens and replace the parent only if the child wins there too
            (``None`` = no confirmation). Near-ties are then decided on more tokens while the
            common case (no child beats the parent) costs nothing extra.
        structure_moves: in spaces with sub-trees (joint depth + levels), how a switch's primary
            unit is drawn: ``"uniform"`` uniformly from the movable units, ``"adaptive"`` with a
            share of structural moves adapted per generation (see `EvolutionarySearch`).
    """

    generations: int | None = 100
    offspring: int = 16
    stages: tuple = (Stage(2, 2048), Stage(1, 16384))
    init_tokens: int = 16384
    max_switches: int = 3
    patience: int | None = None
    seed: int = 0
    confirm_tokens: int | None = None
    structure_moves: str = "uniform"

    def __post_init__(self):
        stages = tuple(s if isinstance(s, Stage) else Stage(*s) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ValueError("SearchConfig.stages needs at least one stage.")
        if stages[-1].survivors != 1:
            raise ValueError("The last selection stage must keep exactly 1 survivor (it competes with the parent).")
        if self.offspring < 1:
            raise ValueError(f"offspring must be >= 1, got {self.offspring}.")
        if self.generations is not None and self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}.")
        if self.max_switches < 1:
            raise ValueError(f"max_switches must be >= 1, got {self.max_switches}.")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}.")
        if self.confirm_tokens is not None and self.confirm_tokens < 1:
            raise ValueError(f"confirm_tokens must be >= 1 or None, got {self.confirm_tokens}.")
        if self.structure_moves not in ("adaptive", "uniform"):
            raise ValueError(f"structure_moves must be 'adaptive' or 'uniform', got {self.structure_moves!r}.")

    @classmethod
    def from_preset(cls, preset: str, table: dict, **overrides) -> "SearchConfig":
        """Build a config from ``table[preset]`` (a method's presets); keyword overrides that are not
        ``None`` win."""
        if preset not in table:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(table)}.")
        values = dict(table[preset])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def resolve_generations(self, num_units: int, num_changed: int) -> "SearchConfig":
        """Fill ``generations=None`` with the paper's depth rule ``k (n - k) / 1.5``."""
        if self.generations is not None:
            return self
        k, n = num_changed, num_units
        return replace(self, generations=max(1, round(k * (n - k) / 1.5)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = [[s.survivors, s.tokens] for s in self.stages]
        if d["confirm_tokens"] is None:  # keeps fingerprints of configs without it unchanged
            del d["confirm_tokens"]
        if d["structure_moves"] == "uniform":  # keeps fingerprints of configs without it unchanged
            del d["structure_moves"]
        return d

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
