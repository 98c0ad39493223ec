"""Small helpers shared by several modules."""

from __future__ import annotations

import hashlib
import re
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


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")


def staging_folder(folder) -> Path:
    """A fresh temporary sibling of ``folder`` to write into before :func:`publish_folder`; leftovers
    of killed processes (``.NAME.tmp-PID`` whose process is gone) are removed first."""
    import os
    import shutil

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    import os

    if os.name != "posix":
        return True  # no liveness probe: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish_folder(tmp, folder, last: str = "config.json") -> Path:
    """Move everything written in ``tmp`` into ``folder`` so that a crash at any moment leaves no
    folder a loader would trust with mixed contents: ``folder/last`` (what makes it loadable) is
    removed first and moved in last; weight files and sub-folders of an earlier save that the new
    one does not have are removed. Other files in ``folder`` are left alone, as ``save_pretrained``
    leaves them."""
    import os
    import shutil

    tmp, folder = Path(tmp), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / last).unlink(missing_ok=True)
    new = set(os.listdir(tmp))
    for old in list(folder.iterdir()):
        stale_weights = old.is_file() and old.name not in new and (
            old.name in _WEIGHT_FILES or (old.name.startswith("model-") and old.name.endswith(".safetensors")))
        if stale_weights:
            old.unlink()
        elif old.is_dir() and old.name not in new and (old / "adapter_config.json").is_file():
            shutil.rmtree(old)
    for name in sorted(new - {last}) + ([last] if last in new else []):
        src, dst = tmp / name, folder / name
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
        os.replace(src, dst)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


def parse_size(value, name: str = "target_size", whole: str = "the dense size") -> tuple:
    """``("bytes", n)`` or ``("fraction", f)`` of a size budget: a size with a unit (``"60MB"``,
    ``"1.5 GiB"``), a number of bytes (above 1), or a fraction of ``whole`` (``0.25``, ``"25%"``).
    ``name`` is the setting the errors name.

    Examples:
        >>> parse_size("60MB"), parse_size("1.5 GiB"), parse_size("25%"), parse_size(0.3), parse_size(123456)
        (('bytes', 60000000), ('bytes', 1610612736), ('fraction', 0.25), ('fraction', 0.3), ('bytes', 123456))
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a size such as '60MB', a number of bytes or a fraction of {whole} "
                         f"such as 0.25, got {value!r}.")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        text = str(value).strip().lower().replace(" ", "")
        if text.endswith("%"):
            try:
                fraction = float(text[:-1]) / 100
            except ValueError:
                fraction = -1.0
            if not 0 < fraction <= 1:
                raise ValueError(f"{name} {value!r}: a percentage must be in (0, 100].")
            return "fraction", fraction
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([a-z]*)", text)
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(f"{name} must be a size such as '60MB', '57MiB', '1.2GB', a number of bytes or a "
                             f"fraction of {whole} such as 0.25 or '25%', got {value!r}.")
        number, unit = float(match.group(1)), match.group(2)
    if number <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}.")
    if unit == "" and number <= 1:
        return "fraction", number
    return "bytes", int(round(number * _UNITS[unit]))
