"""Small helpers shared by several modules."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(Path(path), "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def jsonable(value):
    """``value`` with every part JSON-serializable (non-finite floats -> ``None``, paths -> ``str``,
    other objects -> their ``repr``)."""
    import math
    from pathlib import Path as _Path

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, _Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)
