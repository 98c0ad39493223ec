"""Budget-preserving level-switch mutation (EvoPress).

A mutation applies ``min(U{1..3}, U{1..3})`` switches (biased toward one switch). A switch picks a
switch group, raises one of its units by one level and lowers another unit of the same group by
one level. Per-group level sums, and therefore the global budget, are unchanged.
"""

from __future__ import annotations

import random
from typing import Sequence

from .space import Candidate, LevelSpace


def num_switches(rng: random.Random, max_switches: int = 3) -> int:
    """Number of switches of one mutation: ``min(U{1..max}, U{1..max})``."""
    return min(rng.randint(1, max_switches), rng.randint(1, max_switches))


def _switchable_groups(space: LevelSpace, levels: Sequence[int]) -> list:
    """Groups with one unit that can go up and a *different* unit that can go down."""
    ups: dict = {}
    downs: dict = {}
    for i, (g, level) in enumerate(zip(space.groups, levels)):
        if level + 1 < space.num_levels[i]:
            ups.setdefault(g, []).append(i)
        if level > 0:
            downs.setdefault(g, []).append(i)
    out = []
    for g in sorted(set(ups) & set(downs), key=str):
        if len(set(ups[g]) | set(downs[g])) >= 2:  # then some up-unit differs from some down-unit
            out.append(g)
    return out


def level_switch(levels: Sequence[int], space: LevelSpace, rng: random.Random) -> Candidate:
    """One switch: one unit up one level, another unit of the same group down one level.

    Returns ``levels`` unchanged (as a tuple) when no switch is possible.
    """
    levels = list(levels)
    groups = _switchable_groups(space, levels)
    if not groups:
        return tuple(levels)
    g = rng.choice(groups)
    members = [i for i, gi in enumerate(space.groups) if gi == g]
    while True:
        up = rng.choice(members)
        down = rng.choice(members)
        if up != down and levels[up] + 1 < space.num_levels[up] and levels[down] > 0:
            break
    levels[up] += 1
    levels[down] -= 1
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
