"""Atomic JSON checkpoints: a killed search resumes from the last finished generation."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..faults import fault_point


def atomic_write_json(path, payload, fault: str | None = None) -> None:
    """Write ``payload`` as JSON so that ``path`` always holds either the old or the new content
    (``fault``: the `optimum_evo.faults.fault_point` between writing and moving into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if fault:
            fault_point(fault)
        os.replace(tmp, path)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by writers that were killed
            stale.unlink(missing_ok=True)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path):
    """Read a JSON file; ``None`` when it does not exist. A corrupt file raises ``ValueError``."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"Checkpoint {path} is corrupt ({e}); delete it to start the search afresh.") from e


def rng_state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def rng_state_from_json(data) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
