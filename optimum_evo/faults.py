"""Deterministic fault injection: stop a job at a chosen point, to test that nothing is lost.

Every long job calls :func:`fault_point` at the places where a crash could leave a half-done state
(after a search checkpoint, halfway through writing one, after each level-database layer, before a
database manifest is moved into place, halfway through the teacher cache, between the closed-form
LoRA correction and its save, halfway through an export, halfway through saving a checkpoint).
Nothing happens unless the environment variable ``OPTIMUM_EVO_FAULT`` names the point:

``OPTIMUM_EVO_FAULT="search.checkpoint:3"``
    the process ends (``os._exit(137)``, like a SIGKILL: no ``finally`` blocks, no flushing) the
    3rd time the point ``search.checkpoint`` is reached;
``OPTIMUM_EVO_FAULT="database.layer:2:raise"``
    :class:`FaultInjected` is raised instead.

The restart must end with the same result as an uninterrupted run and trust no half-written file;
the tests in ``tests/test_faults.py`` check this for every point (table in ``docs/reliability.md``).

Example:
    >>> fault_point("search.checkpoint")     # no-op unless OPTIMUM_EVO_FAULT names it
"""

from __future__ import annotations

import os

__all__ = ["ENV_VAR", "FaultInjected", "POINTS", "fault_point"]

ENV_VAR = "OPTIMUM_EVO_FAULT"

#: Every fault point, with where it is.
POINTS = {
    "search.checkpoint": "after the search checkpoint of a generation is written",
    "search.checkpoint.write": "a search checkpoint written to its temporary file, not yet moved into place",
    "database.layer": "after one layer of the level database is written",
    "database.manifest": "the database manifest written, the build folder not yet moved into place",
    "teacher.write": "the teacher cache tensors written, its manifest not yet",
    "correction.fitted": "the LoRA correction computed, not yet saved",
    "export.write": "an export written to its temporary folder, not yet moved into place",
    "model.write": "the EvoPress checkpoint written to its temporary folder, not yet moved into place",
}

_hits: dict = {}


class FaultInjected(RuntimeError):
    """Raised by :func:`fault_point` in ``raise`` mode."""


def fault_point(name: str) -> None:
    """Stop here when ``OPTIMUM_EVO_FAULT`` asks for this point (see the module docstring)."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != name:
        return
    if name not in POINTS:
        raise ValueError(f"Unknown fault point {name!r}; points: {sorted(POINTS)}.")
    count = int(parts[1]) if len(parts) > 1 and parts[1] else 1
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != count:
        return
    if len(parts) > 2 and parts[2] == "raise":
        raise FaultInjected(f"fault injected at {name} (hit {count})")
    os._exit(137)
