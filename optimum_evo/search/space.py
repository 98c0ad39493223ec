"""Search spaces seen by the engine: a level per unit, switch groups, exact budgets.

The engine knows nothing about models. A :class:`LevelSpace` says how many units there are,
how many levels each unit has, and which units may trade a level with each other (a *switch
group*: units whose one-level step costs the same). A level switch raises one unit of a group by
one step and lowers another unit of the same group by one step, so the sum of levels inside every
group (and hence the global budget) never changes.

Example:
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
            opposite directions by one step; the per-group sums of levels are the budget.
    """

    unit_names: tuple
    num_levels: tuple
    groups: tuple

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
        """Sum of levels per switch group: the quantity every mutation keeps constant."""
        sums: dict = {}
        for g, level in zip(self.groups, levels):
            sums[g] = sums.get(g, 0) + int(level)
        return sums

    def fingerprint(self) -> str:
        """A short hash identifying the space (stored in checkpoints)."""
        payload = json.dumps([list(self.unit_names), list(self.num_levels), list(self.groups)])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
