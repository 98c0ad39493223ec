"""Search spaces under a budget in user units (bytes, nanoseconds) instead of an exact level sum.

A `BudgetSpace` gives every level of every unit a non-negative integer *cost* (e.g. the bytes
the unit stores at that level, or its decode latency in nanoseconds) and a global ``budget``.
Units may have a *parent*: a unit whose parent is at level 0 (a dropped sub-block) is *inactive*:
it costs nothing, has no effect, and sits at level 0 so that candidates that differ only there
are one candidate. *Shared costs* are paid once when any unit of a set is on (the norms of a
decoder layer are stored while its attention or its MLP is kept).

The mutation keeps every candidate **feasible and full**: its cost is at most the budget, and no
active unit can be raised one level, nor a switched-off subtree be switched on, without exceeding
it (the unspent rest is smaller than the cheapest step still possible). A switch moves one
*primary* unit one level up or down (a parent: drops or restores its whole subtree); other
*leaf* units then move down until the candidate fits, and up (picked with probability
proportional to their step's cost, so a freed step is taken by few units) until it is full;
when no leaf can move up, a switched-off parent that fits is switched on.

A space with parents offers two kinds of primary move: *structural* (a parent drops or restores its
sub-tree, and the leaves refill the budget it freed or took) and *level* moves (one leaf up or
down). By default the primary unit is drawn uniformly from the movable units, so structural moves
come at `structure_share`; with ``structure_moves="adaptive"`` the engine passes ``structure_rate``
to `mutate` instead, to spend its mutations on whichever kind of move has been paying (see
`EvolutionarySearch`).

Examples:
    >>> space = BudgetSpace(("a", "b", "c"), costs=((1, 2, 4), (1, 2, 4), (1, 2, 4)), budget=8)
    >>> space.cost((1, 1, 2))
    8
    >>> import random
    >>> child = space.mutate((1, 1, 2), random.Random(0))
    >>> space.cost(child) <= 8 and space.is_full(child)
    True
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Sequence

from .mutation import num_switches
from .space import Candidate

__all__ = ["BudgetSpace"]


@dataclass(frozen=True)
class BudgetSpace:
    """Units with a cost per level and one global budget (see the module docstring).

    Args:
        unit_names: one readable name per unit.
        costs: ``costs[i][l]``: cost of unit ``i`` at level ``l`` (non-negative integers; levels
            are ordered by quality, costs non-decreasing along them).
        budget: the most a candidate may cost.
        parents: ``parents[i]``: index of the unit that switches unit ``i`` on (``-1``: none). A
            parent's level 0 is "off"; parents have no parents themselves.
        shared: ``((units, cost), ...)``: a cost paid once when any of ``units`` is on (level > 0).
        fixed_cost: cost every candidate pays (tensors outside the units); part of `cost`.
        meaning: text identifying what the levels are (hashes of their values and sources); part
            of `fingerprint`.
    """

    unit_names: tuple
    costs: tuple
    budget: int
    parents: tuple | None = None
    shared: tuple = ()
    fixed_cost: int = 0
    meaning: str | None = None
    _children: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        n = len(self.unit_names)
        if n == 0:
            raise ValueError("A search space needs at least one unit.")
        if len(self.costs) != n or any(len(c) < 1 for c in self.costs):
            raise ValueError("costs needs, for every unit, one cost per level (at least one level).")
        if any(int(x) != x or x < 0 for c in self.costs for x in c):
            raise ValueError("Costs must be non-negative integers.")
        if any(b < a for c in self.costs for a, b in zip(c, c[1:])):
            raise ValueError("Costs must not decrease along a unit's levels (drop dominated levels first).")
        parents = self.parents if self.parents is not None else (-1,) * n
        if len(parents) != n or any(not -1 <= p < n or p == i for i, p in enumerate(parents)):
            raise ValueError("parents needs one unit index (or -1) per unit, never the unit itself.")
        if any(p >= 0 and parents[p] >= 0 for p in parents):
            raise ValueError("A parent unit cannot have a parent itself.")
        object.__setattr__(self, "parents", tuple(parents))
        children: dict = {}
        for i, p in enumerate(parents):
            if p >= 0:
                children.setdefault(p, []).append(i)
        object.__setattr__(self, "_children", children)
        if int(self.budget) != self.budget:
            raise ValueError("The budget must be an integer.")

    # ------------------------------------------------------------------ the engine's protocol
    @property
    def num_units(self) -> int:
        return len(self.unit_names)

    @property
    def num_levels(self) -> tuple:
        return tuple(len(c) for c in self.costs)

    def validate(self, levels: Sequence[int]) -> Candidate:
        """Return ``levels`` as a candidate tuple, or raise ``ValueError`` naming the bad unit."""
        levels = tuple(int(x) for x in levels)
        if len(levels) != self.num_units:
            raise ValueError(f"Candidate has {len(levels)} levels but the space has {self.num_units} units.")
        for name, level, c in zip(self.unit_names, levels, self.costs):
            if not 0 <= level < len(c):
                raise ValueError(f"Level {level} of unit {name!r} is outside [0, {len(c) - 1}].")
        for i, p in enumerate(self.parents):
            if p >= 0 and levels[p] == 0 and levels[i] != 0:
                raise ValueError(f"Unit {self.unit_names[i]!r} is off (its parent {self.unit_names[p]!r} is at "
                                 "level 0) and must be at level 0.")
        return levels

    def check_initial(self, candidates: Sequence[Candidate]) -> None:
        """Refuse initial candidates over the budget."""
        for c in candidates:
            if self.cost(c) > self.budget:
                raise ValueError(f"An initial candidate costs {self.cost(c)}, over the budget {self.budget}.")

    def mutate(self, levels: Sequence[int], rng: random.Random, max_switches: int = 3,
               structure_rate: float | None = None) -> Candidate:
        """``min(U{1..3}, U{1..3})`` budget-keeping switches (see the module docstring).

        ``structure_rate``: the probability that a switch's primary unit is a parent (a structural
        move) rather than a leaf; ``None`` draws the primary uniformly from all movable units.
        """
        child = tuple(levels)
        for _ in range(num_switches(rng, max_switches)):
            child = self.switch(child, rng, structure_rate=structure_rate)
        return child

    def structure_share(self) -> float | None:
        """The share of parents among the movable units: how often a uniformly drawn switch is
        structural. ``None`` when the space has no parents, or nothing but parents, to move (the
        engine then has no choice of move to adapt).

        Examples:
            >>> space = BudgetSpace(("p", "a", "b", "c"), ((0, 1), (1, 2), (1, 2), (1, 2)), 7, (-1, 0, 0, -1))
            >>> space.structure_share()
            0.25
            >>> BudgetSpace(("a", "b"), ((1, 2), (1, 2)), 3).structure_share() is None
            True
        """
        parents, leaves = self._by_kind(self._movable())
        return len(parents) / (len(parents) + len(leaves)) if parents and leaves else None

    def _movable(self) -> list:
        """The units with more than one level."""
        return [i for i in range(self.num_units) if len(self.costs[i]) > 1]

    def _by_kind(self, units: list) -> tuple:
        """``(parents, leaves)`` of ``units``."""
        return [i for i in units if i in self._children], [i for i in units if i not in self._children]

    def random_candidate(self, reference: Sequence[int], rng: random.Random, switches: int | None = None) -> Candidate:
        """A random feasible, full candidate: many switches away from ``reference``."""
        child = self.fill(self.validate(reference), rng)
        for _ in range(2 * self.num_units if switches is None else switches):
            child = self.switch(child, rng)
        return child

    def fingerprint(self) -> str:
        """A short hash identifying the space (stored in checkpoints)."""
        payload = json.dumps([list(self.unit_names), [list(c) for c in self.costs], int(self.budget),
                              list(self.parents), [[list(u), int(c)] for u, c in self.shared], int(self.fixed_cost),
                              self.meaning])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ costs
    def active(self, levels: Sequence[int], unit: int) -> bool:
        p = self.parents[unit]
        return p < 0 or levels[p] > 0

    def cost(self, levels: Sequence[int]) -> int:
        """Total cost of a candidate: fixed, active units at their levels, shared costs that are paid."""
        total = int(self.fixed_cost)
        for i, level in enumerate(levels):
            if self.active(levels, i):
                total += self.costs[i][level]
        for units, c in self.shared:
            if any(levels[u] > 0 for u in units):
                total += int(c)
        return total

    def _leaves(self, levels) -> list:
        return [i for i in range(self.num_units) if i not in self._children and self.active(levels, i)]

    def _raises(self, levels, room: int, frozen=()) -> list:
        """``(unit, step cost)`` of the active leaves that can go one level up within ``room``."""
        out = []
        for i in self._leaves(levels):
            lv = levels[i]
            if i in frozen or lv + 1 >= len(self.costs[i]):
                continue
            step = self.costs[i][lv + 1] - self.costs[i][lv]
            if step <= room:
                out.append((i, step))
        return out

    def _restores(self, levels, room: int, frozen=()) -> list:
        """``(parent, cost)`` of the off parents that can be switched on (children at level 0) within ``room``."""
        out = []
        base = self.cost(levels)
        for p in self._children:
            if p in frozen or levels[p] != 0:
                continue
            trial = list(levels)
            trial[p] = 1
            step = self.cost(trial) - base
            if step <= room:
                out.append((p, step))
        return out

    def is_full(self, levels: Sequence[int]) -> bool:
        """Within the budget, and no active leaf can go one level up (nor an off parent be switched
        on) without exceeding it."""
        cost = self.cost(levels)
        room = self.budget - cost
        return cost <= self.budget and not self._raises(list(levels), room) and not self._restores(levels, room)

    def fill(self, levels: Sequence[int], rng: random.Random, frozen=()) -> Candidate:
        """Lower leaves until ``levels`` fits, then raise leaves until it is full (``frozen`` units
        do not move); ``ValueError`` when it cannot fit."""
        levels = list(levels)
        cost = self.cost(levels)
        while cost > self.budget:
            lower = [(i, self.costs[i][levels[i]] - self.costs[i][levels[i] - 1]) for i in self._leaves(levels)
                     if i not in frozen and levels[i] > 0]
            lower = [(i, d) for i, d in lower if d > 0]
            if not lower:
                raise ValueError(f"The candidate costs {cost}, over the budget {self.budget}, at its lowest levels.")
            i = _weighted(rng, lower)
            levels[i] -= 1
            cost = self.cost(levels)
        while True:
            options = self._raises(levels, self.budget - cost, frozen)
            if not options:  # the leaves are full: a sub-tree may still fit
                options = self._restores(levels, self.budget - cost, frozen)
                if not options:
                    return tuple(levels)
            i = _weighted(rng, options)
            levels[i] += 1
            cost = self.cost(levels)

    def switch(self, levels: Sequence[int], rng: random.Random, max_tries: int = 20,
               structure_rate: float | None = None) -> Candidate:
        """One switch: a primary unit moves one level, leaves compensate (see the module
        docstring); returns ``levels`` unchanged when no switch is found. With ``structure_rate``,
        the primary is a parent with that probability and a leaf otherwise."""
        levels = tuple(levels)
        movable = self._movable()
        parents, leaves = self._by_kind(movable) if structure_rate is not None else ((), ())
        for _ in range(max_tries):
            if parents and leaves:
                u = rng.choice(parents if rng.random() < structure_rate else leaves)
            else:
                u = rng.choice(movable)
            if not self.active(levels, u):
                continue
            direction = rng.choice((1, -1))
            if not 0 <= levels[u] + direction < len(self.costs[u]):
                continue
            trial = list(levels)
            trial[u] += direction
            if trial[u] == 0:
                for child in self._children.get(u, ()):
                    trial[child] = 0
            try:
                trial = self.fill(self.fill(trial, rng, frozen={u}), rng)  # then full, the primary included
            except ValueError:
                continue
            if trial != levels:
                return trial
        return levels


def _weighted(rng: random.Random, options: list) -> int:
    """A unit of ``[(unit, weight), ...]`` picked with probability proportional to its weight
    (uniformly when every weight is 0)."""
    total = sum(w for _, w in options)
    if total <= 0:
        return rng.choice(options)[0]
    x = rng.random() * total
    for unit, w in options:
        x -= w
        if x < 0:
            return unit
    return options[-1][0]
