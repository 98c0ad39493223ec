"""Search spaces seen by the engine: a level per unit, switch groups, exact budgets.

The engine knows nothing about models. A `LevelSpace` says how many units there are,
how many levels each unit has, and which units may trade a level with each other (a *switch
group*: units whose one-level step costs the same). A level switch raises one unit of a group by
one step and lowers another unit of the same group by one step, so the sum of levels inside every
group (and hence the global budget) never changes.

Examples:
    >>> space = LevelSpace(unit_names=("a", "b", "c"), num_levels=(2, 2, 2), groups=(0, 0, 0))
    >>> space.group_sums((1, 0, 0))
    {0: 1}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

Candidate = tuple  # tuple[int, ...]: one level index per unit


@dataclass(frozen=True)
class LevelSpace:
    """Units, their number of levels and their switch groups.

    Args:
        unit_names: one readable name per unit (e.g. ``"layers.3.self_attn"``).
        num_levels: number of levels of each unit; a unit's level is in ``[0, num_levels[i] - 1]``.
        groups: switch group of each unit. A level switch moves two units of the same group in
            opposite directions by one step of equal cost; the per-group costs are the budget.
        step_costs: optional cost of each step of each unit (``step_costs[i][l]``: from level
            ``l`` to ``l + 1``), e.g. ``(1, 1, 1, 1, 2)`` for bit widths 2,3,4,5,6,8. Without it
            every step costs 1.
        meaning: optional text identifying what the levels *are* (e.g. a hash of the level values
            and of the database they come from). It goes into `fingerprint`, so a checkpoint
            written for 60% sparsity levels is not resumed on 70% ones with the same shape.
    """

    unit_names: tuple
    num_levels: tuple
    groups: tuple
    step_costs: tuple | None = None
    meaning: str | None = None

    def __post_init__(self):
        n = len(self.unit_names)
        if n == 0:
            raise ValueError("A search space needs at least one unit.")
        if len(self.num_levels) != n or len(self.groups) != n:
            raise ValueError(
                f"unit_names ({n}), num_levels ({len(self.num_levels)}) and groups ({len(self.groups)}) "
                "must have the same length."
            )
        if any(int(k) < 1 for k in self.num_levels):
            raise ValueError("Every unit needs at least one level.")
        if self.step_costs is not None:
            if len(self.step_costs) != n or any(len(c) != k - 1 for c, k in zip(self.step_costs, self.num_levels)):
                raise ValueError("step_costs needs, for every unit, one cost per step (num_levels - 1 values).")
            if any(c <= 0 for costs in self.step_costs for c in costs):
                raise ValueError("Step costs must be positive.")

    def step_cost(self, unit: int, level: int) -> int:
        """Cost of raising ``unit`` from ``level`` to ``level + 1`` (1 without ``step_costs``)."""
        return 1 if self.step_costs is None else self.step_costs[unit][level]

    def cost(self, unit: int, level: int) -> int:
        """Cumulative cost of ``unit`` at ``level`` (``level`` without ``step_costs``)."""
        return level if self.step_costs is None else sum(self.step_costs[unit][:level])

    @property
    def num_units(self) -> int:
        return len(self.unit_names)

    def validate(self, levels: Sequence[int]) -> Candidate:
        """Return ``levels`` as a candidate tuple, or raise ``ValueError`` naming the bad unit."""
        levels = tuple(int(x) for x in levels)
        if len(levels) != self.num_units:
            raise ValueError(f"Candidate has {len(levels)} levels but the space has {self.num_units} units.")
        for name, level, k in zip(self.unit_names, levels, self.num_levels):
            if not 0 <= level < k:
                raise ValueError(f"Level {level} of unit {name!r} is outside [0, {k - 1}].")
        return levels

    def group_sums(self, levels: Sequence[int]) -> dict:
        """Cost (by default the sum of levels) per switch group: what every mutation keeps constant."""
        sums: dict = {}
        for i, (g, level) in enumerate(zip(self.groups, levels)):
            sums[g] = sums.get(g, 0) + self.cost(i, int(level))
        return sums

    def check_initial(self, candidates: Sequence[Candidate]) -> None:
        """Refuse initial candidates of different budgets (per-group level sums)."""
        sums = self.group_sums(candidates[0]) if candidates else None
        for c in candidates[1:]:
            if self.group_sums(c) != sums:
                raise ValueError("All initial candidates must have the same budget (per-group level sums).")

    def mutate(self, levels: Sequence[int], rng, max_switches: int = 3) -> Candidate:
        """``min(U{1..3}, U{1..3})`` budget-preserving level switches (`mutation.mutate`)."""
        from .mutation import mutate

        return mutate(levels, self, rng, max_switches)

    def random_candidate(self, reference: Sequence[int], rng, switches: int | None = None) -> Candidate:
        """A random candidate with the budget of ``reference`` (`mutation.random_candidate`)."""
        from .mutation import random_candidate

        return random_candidate(self, reference, rng, switches)

    def fingerprint(self) -> str:
        """A short hash identifying the space (stored in checkpoints)."""
        costs = None if self.step_costs is None else [list(c) for c in self.step_costs]
        fields = [list(self.unit_names), list(self.num_levels), list(self.groups), costs]
        if self.meaning is not None:
            fields.append(self.meaning)
        payload = json.dumps(fields)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
