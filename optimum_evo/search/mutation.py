"""Budget-preserving level-switch mutation (EvoPress).

A mutation applies ``min(U{1..3}, U{1..3})`` switches (biased toward one switch). A switch picks a
switch group and a step cost, raises one of its units by one level of that cost and lowers another
unit of the same group by one level of the same cost. Per-group costs, and therefore the global
budget, are unchanged.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # annotations only (space.py calls into this module)
    from .space import Candidate, LevelSpace


def num_switches(rng: random.Random, max_switches: int = 3) -> int:
    """Number of switches of one mutation: ``min(U{1..max}, U{1..max})``."""
    return min(rng.randint(1, max_switches), rng.randint(1, max_switches))


def _move_cost(space: LevelSpace, levels, unit: int, direction: int):
    """Cost of moving ``unit`` one level in ``direction`` (+1/-1), or ``None`` if impossible."""
    level = levels[unit]
    if direction > 0:
        return space.step_cost(unit, level) if level + 1 < space.num_levels[unit] else None
    return space.step_cost(unit, level - 1) if level > 0 else None


def level_switch(levels: Sequence[int], space: LevelSpace, rng: random.Random, max_tries: int = 20) -> Candidate:
    """One budget-preserving switch.

    A primary unit moves one level up (or down); other units of its group move the opposite way
    until their step costs add up to exactly the primary step's cost. With unit costs this is the
    classic switch (one unit up, another down); with a 2-bit step (6 -> 8 bits) it is compensated
    by two 1-bit steps. Returns ``levels`` unchanged (as a tuple) when no switch is found.
    """
    levels = list(levels)
    groups = sorted(set(space.groups), key=str)
    members = {g: [i for i, gi in enumerate(space.groups) if gi == g] for g in groups}
    for _ in range(max_tries):
        g = rng.choice(groups)
        direction = rng.choice((1, -1))
        primaries = [i for i in members[g] if _move_cost(space, levels, i, direction) is not None]
        if not primaries:
            continue
        p = rng.choice(primaries)
        trial = list(levels)
        remaining = _move_cost(space, trial, p, direction)
        trial[p] += direction
        while remaining > 0:
            options = [i for i in members[g] if i != p
                       and (c := _move_cost(space, trial, i, -direction)) is not None and c <= remaining]
            if not options:
                break
            j = rng.choice(options)
            remaining -= _move_cost(space, trial, j, -direction)
            trial[j] -= direction
        if remaining == 0:
            return tuple(trial)
    return tuple(levels)


def mutate(levels: Sequence[int], space: LevelSpace, rng: random.Random, max_switches: int = 3) -> Candidate:
    """Apply ``min(U{1..3}, U{1..3})`` level switches to ``levels``."""
    child = tuple(levels)
    for _ in range(num_switches(rng, max_switches)):
        child = level_switch(child, space, rng)
    return child


def random_candidate(
    space: LevelSpace, reference: Sequence[int], rng: random.Random, switches: int | None = None
) -> Candidate:
    """A random candidate with the same budget as ``reference``.

    Applies many random switches (by default ``4 * num_units * max_levels``) so the result is
    well mixed over the feasible set.
    """
    if switches is None:
        switches = 4 * space.num_units * max(space.num_levels)
    child = space.validate(reference)
    for _ in range(switches):
        child = level_switch(child, space, rng)
    return child
