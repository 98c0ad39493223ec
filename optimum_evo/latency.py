"""Decode latency measured on this machine: the cost model of speed budgets.

A speed budget ("decode 1.5x faster than the dense model") needs the latency of every candidate,
and timing thousands of whole models is out of the question. A `LatencyTable` times each piece
once, with the runtime the model is deployed with (transformers with optimum-evo's packed layers
and kernels, in the model's dtype, at this process's thread count), and a candidate's latency is
the sum of its pieces:

| entry | what is timed |
|---|---|
| ``linears[key]`` | one decode-step call (one token) of a linear of that shape at that level (a packed `EvoPressQuantLinear`, or the dense layer) |
| ``fixed_ns`` | a decode step of the model with no decoder block (embeddings, final norm, head) |
| ``layer_ns`` | per decoder layer whose sub-blocks are all stand-ins: its norms, residual adds and call overhead |
| ``attention_ns`` / ``mlp_ns`` | per kept sub-block, beyond its linears (attention over the cache, activations) |

A decode step is one token after a context of ``context`` tokens, the median of many. The linears
of one shape (dense and every level) are timed in interleaved rounds, as are the decode steps
(`time_calls`): a load that comes and goes while the table is built then shifts those entries
alike instead of pricing one level against another timed under different conditions. When the
pieces' sum for the dense model still differs from its measured decode step by more than 10%, the
build warns (the machine was busy or its clock changed: rebuild the table on a quiet machine). The table is
stored as ``latency.json`` with a manifest (machine, torch, kernels, dtype, threads, model config,
context, and a hash of each compression kind's levels); a table whose manifest differs from this
process's is stale and rebuilt (`open_or_build` says why), like the level database.

One table serves every search of a model on a machine, whichever kinds it combines: a
quantization-only search and a joint depth + quantization search price the same linear at the
same level with the same entry, and the same decode step, so their speed budgets are the same
number of nanoseconds and a result of one is feasible in the other. A search whose kind is not in
the table yet (or whose levels changed) times only that kind's levels and adds them; each shape's
dense layer is timed again in the same rounds, and the new entries are scaled by the stored dense
entry over the new one, so entries added later stay on the scale of the table's decode steps.

Examples:
    >>> table = LatencyTable.open_or_build("latency", manifest, measure)   # doctest: +SKIP
    >>> table.linears["576x1536/3"]                                         # doctest: +SKIP
    41250
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .search.checkpoint import atomic_write_json, read_json

logger = logging.getLogger(__name__)

__all__ = ["LATENCY_FORMAT", "LatencyTable", "machine_identity", "time_call", "time_calls"]

#: version of ``latency.json``; other versions are stale (2: entries timed in interleaved rounds; 3: one
#: table per model and dtype, the levels hashed per kind)
LATENCY_FORMAT = 3
TABLE_NAME = "latency.json"


def machine_identity() -> dict:
    """What decides timings besides the model: CPU model and flags, torch, kernels, threads."""
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from .compressors import kernels

    source = kernels.SOURCE.read_bytes() if kernels.SOURCE.exists() else b""
    return {"cpu": cpu, "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:12], "torch": torch.__version__,
            "kernels": hashlib.sha256(source).hexdigest()[:12] if kernels.available() else "off",
            "threads": torch.get_num_threads()}


def time_call(fn: Callable[[], object], min_seconds: float = 0.05, repeats: int = 7) -> int:
    """Median wall time of ``fn()`` in nanoseconds (warmed up; each of ``repeats`` samples averages
    enough calls to last ``min_seconds``)."""
    return time_calls({0: fn}, min_seconds, repeats)[0]


def time_calls(fns: dict, min_seconds: float = 0.05, rounds: int = 7) -> dict:
    """Median wall time in nanoseconds of each of ``fns`` (name -> callable), timed in interleaved
    rounds: every round takes one sample of each (enough calls to last ``min_seconds``), in an order
    rotated from round to round. A load that comes and goes on the machine (another job, a turbo
    clock that drops) then lands on every entry alike instead of on whichever was being timed, so
    the entries stay comparable with one another, which is what a cost model of their sums needs."""
    names = list(fns)
    calls = {}
    for name in names:  # warm up, and how many calls make one sample
        fns[name]()
        start = time.perf_counter()
        fns[name]()
        calls[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n = fns[name], calls[name]
            start = time.perf_counter_ns()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter_ns() - start) / n)
    return {name: int(statistics.median(v)) for name, v in samples.items()}


@dataclass
class LatencyTable:
    """Measured decode latencies (see the module docstring); times in nanoseconds."""

    manifest: dict
    linears: dict = field(default_factory=dict)
    fixed_ns: int = 0
    layer_ns: int = 0
    attention_ns: int = 0
    mlp_ns: int = 0
    dense_ns: int = 0  # a measured decode step of the dense model (to check the sum of the pieces)
    seconds: float = 0.0

    def dense_prediction_ns(self, layers: int, dense_linear_ns: int) -> int:
        """The pieces' sum for the dense model of ``layers`` decoder layers whose dense linears take
        ``dense_linear_ns`` together (what a speed budget divides; ``dense_ns`` is its measured step)."""
        return self.fixed_ns + layers * (self.layer_ns + self.attention_ns + self.mlp_ns) + dense_linear_ns

    def to_json(self) -> dict:
        return {"format": LATENCY_FORMAT, "manifest": self.manifest, "linears": self.linears,
                "fixed_ns": self.fixed_ns, "layer_ns": self.layer_ns, "attention_ns": self.attention_ns,
                "mlp_ns": self.mlp_ns, "dense_ns": self.dense_ns, "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict) -> "LatencyTable":
        return cls(manifest=data["manifest"], linears={k: int(v) for k, v in data["linears"].items()},
                   fixed_ns=int(data["fixed_ns"]), layer_ns=int(data["layer_ns"]),
                   attention_ns=int(data["attention_ns"]), mlp_ns=int(data["mlp_ns"]),
                   dense_ns=int(data["dense_ns"]), seconds=float(data.get("seconds", 0.0)))

    def save(self, root) -> Path:
        path = Path(root) / TABLE_NAME
        atomic_write_json(path, self.to_json())
        return path

    def missing_kinds(self, manifest: dict) -> list:
        """The kinds of ``manifest["levels"]`` (kind -> hash of its levels) whose entries this table
        lacks or measured for other levels."""
        have = self.manifest.get("levels") or {}
        return [k for k, h in (manifest.get("levels") or {}).items() if have.get(k) != h]

    def add_kinds(self, manifest: dict, kinds: list, linears: dict) -> None:
        """Add the entries of ``kinds`` (``linears``, timed with each shape's dense layer ``<shape>/dense``
        in the same rounds), replacing the entries of those kinds the table had. Each entry is scaled
        by the table's dense entry of its shape over the one timed with it, so it stays on the scale
        of the table's other entries and decode steps."""
        self.linears = {k: v for k, v in self.linears.items() if k.split("/")[1] not in kinds}
        for key, ns in linears.items():
            shape, kind = key.split("/")[:2]
            if kind in kinds:
                dense = f"{shape}/dense"
                scale = self.linears[dense] / linears[dense] if dense in self.linears and linears.get(dense) else 1.0
                self.linears[key] = int(round(ns * scale))
        levels = dict(self.manifest.get("levels") or {})
        levels.update({k: (manifest.get("levels") or {})[k] for k in kinds})
        self.manifest = {**self.manifest, "levels": levels}

    @classmethod
    def open(cls, root, manifest: dict) -> "tuple[LatencyTable | None, str | None]":
        """The table in ``root`` when it was measured under ``manifest`` (its ``levels`` aside:
        `missing_kinds` says which kinds it still lacks), else ``(None, why it is not used)``."""
        path = Path(root) / TABLE_NAME
        if not path.exists():
            return None, None
        try:
            data = read_json(path)
            if data is None or data.get("format") != LATENCY_FORMAT:
                return None, "it was written by another version"
            saved = data.get("manifest") or {}
            differ = sorted(k for k in (set(saved) | set(manifest)) - {"levels"} if saved.get(k) != manifest.get(k))
            if differ:
                return None, "it was measured with another " + ", ".join(
                    f"{k} ({saved.get(k)!r} there, {manifest.get(k)!r} now)" for k in differ)
            if not isinstance(saved.get("levels", {}), dict):
                return None, "it was written by another version"
            table = cls.from_json(data)
            missing = [k for k in manifest.get("linears", []) if k not in table.linears]
            if missing:
                return None, f"it lacks {len(missing)} entries (e.g. {missing[0]})"
            return table, None
        except (OSError, ValueError, KeyError, TypeError) as e:
            return None, f"it cannot be read ({type(e).__name__}: {e})"

    @classmethod
    def open_or_build(cls, root, manifest: dict, measure: Callable, progress: bool = True) -> "LatencyTable":
        """Open the table of ``manifest`` in ``root``, or measure it and store it there:
        ``measure(None)`` returns every entry, ``measure(kinds)`` the linears of those kinds only
        (with each shape's dense layer), which a table measured under the same manifest but lacking
        them gains (`add_kinds`). A stale or unreadable table is rebuilt, with a warning saying why.
        Several processes may share ``root``: one measures while the others wait."""
        from filelock import FileLock

        root = Path(root)
        table, why = cls.open(root, manifest)
        if table is not None and not table.missing_kinds(manifest):
            return table
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / ".lock")):
            table, why = cls.open(root, manifest)
            start = time.perf_counter()
            if table is not None:
                kinds = table.missing_kinds(manifest)
                if kinds:
                    logger.info("Adding the levels of %s to the latency table in %s.", ", ".join(kinds), root)
                    table.add_kinds(manifest, kinds, measure(kinds)["linears"])
                    table.seconds = round(table.seconds + time.perf_counter() - start, 1)
                    table.save(root)
                return table
            if why:
                logger.warning("Rebuilding the latency table in %s: %s.", root, why)
            entries = measure(None)
            table = cls(manifest=manifest, **entries, seconds=round(time.perf_counter() - start, 1))
            table.save(root)
        return table


def default_latency_root(identity: dict) -> Path:
    """The shared cache folder of a latency table (keyed by the model and dtype, not by the kinds a
    search combines: see the module docstring; the machine, torch and kernels are in the manifest,
    so a stale table is rebuilt in place)."""
    from .embedded_models import default_cache_root

    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(os.environ.get("OPTIMUM_EVO_LATENCY_DIR", default_cache_root().parent / "latency")) / key
