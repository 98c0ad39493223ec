"""The level database: every searched linear layer precompressed at every level, on disk.

Layout of a database folder::

    manifest.json                 model, calibration and settings hashes, levels, files + sha256
    layers/<module name>.safetensors   all levels of one linear layer

Quantized levels are stored **packed**: ``<level>::codes`` (uint8 bit-packed integer codes),
``<level>::scales`` (float16, one per row and group), ``<level>::zeros`` (bit-packed like the
codes) and, with act-order, ``<level>::g_idx``. Sparse levels store ``<level>::mask`` (1 bit per
weight) and ``<level>::values`` (float16, the kept weights in row-major order). Bytes per weight:

=====================  ==========================================  =======================
level                  bytes per weight                            e.g.
=====================  ==========================================  =======================
``b``-bit, group ``g``  ``b/8 + (16 + b) / (8 g)``                   3 bit, g=128: 0.393
sparsity ``s``         ``1/8 + 2 (1 - s)``                          70 %: 0.725
dense fp16 (reference)  2                                           2
=====================  ==========================================  =======================

A database whose manifest does not match the requested model / calibration / settings, or whose
files fail their checksum, is reported stale or corrupt and rebuilt, never silently used. Reads are
memory-mapped (``safetensors.safe_open``).

Example:
    >>> db = LevelDatabase.build(model, windows, "quantization", levels=[2, 3, 4], root="db")  # doctest: +SKIP
    >>> w = db.weight("model.layers.0.mlp.down_proj", 3)                                       # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..search.checkpoint import atomic_write_json
from ..utils import sha256_file
from .calibrate import linear_modules, walk_blocks
from .obs import gptq_levels, sparsegpt_levels
from .quantizer import dequantize_codes, pack_codes, unpack_codes

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("quantization", "sparsity")


class StaleDatabaseError(ValueError):
    """The database on disk does not match the request, or is corrupt."""


def _remove_orphan_builds(root: Path) -> None:
    """Delete ``.NAME.build-PID`` siblings of ``root`` left by builds whose process is gone (a killed
    build never reaches its final move; its partial folder would otherwise stay on disk forever).
    POSIX only: elsewhere a liveness probe by signal is not available, so nothing is removed."""
    if os.name != "posix" or not root.parent.is_dir():
        return
    for stale in root.parent.glob(f".{root.name}.build-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


def level_key(level) -> str:
    """Tensor-name prefix of a level (``3`` -> ``"3"``, ``0.6`` -> ``"0.6"``)."""
    return repr(float(level)).rstrip("0").rstrip(".") if isinstance(level, float) else str(level)


def encode_quantized(q) -> dict:
    """Packed tensors of a :class:`~optimum_evo.compressors.obs.QuantizedWeight`."""
    out = {
        "codes": pack_codes(q.codes, q.bits),
        "scales": q.scales.to(torch.float16),
        "zeros": pack_codes(q.zeros.to(torch.uint8), q.bits),
    }
    if not torch.equal(q.g_idx.long(), torch.arange(q.codes.shape[1]) // q.group_size):
        out["g_idx"] = q.g_idx.to(torch.int32)
    return out


def decode_quantized(t: dict, shape, bits: int, group_size: int) -> torch.Tensor:
    rows, cols = shape
    n_groups = t["scales"].shape[1]
    codes = unpack_codes(t["codes"], bits, shape).float()
    zeros = unpack_codes(t["zeros"], bits, (rows, n_groups)).float()
    g = t["g_idx"].long() if "g_idx" in t else torch.arange(cols) // group_size
    return dequantize_codes(codes, t["scales"].float()[:, g], zeros[:, g])


def encode_sparse(w: torch.Tensor) -> dict:
    mask = w != 0
    return {"mask": pack_codes(mask.to(torch.uint8), 1), "values": w[mask].to(torch.float16)}


def decode_sparse(t: dict, shape) -> torch.Tensor:
    mask = unpack_codes(t["mask"], 1, shape).bool()
    w = torch.zeros(shape, dtype=torch.float32)
    w[mask] = t["values"].float()
    return w


def relative_error(dense: torch.Tensor, compressed: torch.Tensor, H: torch.Tensor) -> float:
    """Normalized layer reconstruction error ``||(W - W') X||^2 / ||W X||^2`` via ``H ~ X X^T``
    (``H`` may be a ``[groups, in, in]`` stack, one per equal slice of rows)."""
    d = dense - compressed
    if H.dim() == 3:
        g = H.shape[0]
        d, dense = d.view(g, -1, d.shape[1]), dense.view(g, -1, dense.shape[1])
    return float((d @ H * d).sum() / (dense @ H * dense).sum().clamp(min=1e-30))


DEFAULT_SETTINGS = {
    "quantization": dict(group_size=128, sym=False, mse=False, act_order=False, damp=0.01, attention_aware=True),
    "sparsity": dict(damp=0.01, attention_aware=True),
}


def full_settings(kind: str, settings: dict | None) -> dict:
    """``settings`` completed with the defaults of ``kind``; unknown keys raise ``ValueError``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    defaults = DEFAULT_SETTINGS[kind]
    unknown = set(settings or {}) - set(defaults)
    if unknown:
        raise ValueError(f"Unknown {kind} settings {sorted(unknown)}; known: {sorted(defaults)}.")
    return {**defaults, **(settings or {})}


class LevelDatabase:
    """A level database folder (see the module docstring)."""

    def __init__(self, root, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest

    # ----------------------------------------------------------------- queries
    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def levels(self) -> list:
        return self.manifest["levels"]

    @property
    def modules(self) -> dict:
        """``{module name: {"shape": [out, in]}}`` of every searched linear."""
        return self.manifest["modules"]

    def tensors(self, module: str, level) -> dict:
        key = level_key(level)
        with safe_open(str(self.root / self.manifest["modules"][module]["file"]), framework="pt") as f:
            return {name.split("::")[1]: f.get_tensor(name) for name in f.keys() if name.split("::")[0] == key}

    def weight(self, module: str, level, dtype=torch.float32) -> torch.Tensor:
        """The dense (decoded) weight of ``module`` at ``level``."""
        shape = tuple(self.modules[module]["shape"])
        t = self.tensors(module, level)
        if not t:
            raise KeyError(f"Level {level!r} of {module!r} is not in the database (levels: {self.levels}).")
        if self.kind == "quantization":
            w = decode_quantized(t, shape, int(level), self.manifest["settings"]["group_size"])
        else:
            w = decode_sparse(t, shape)
        return w.to(dtype)

    def module_levels(self, module: str) -> list:
        return self.modules[module]["levels"]

    def error(self, module: str, level) -> float:
        """Normalized reconstruction error of ``module`` at ``level`` on the calibration data."""
        return self.modules[module]["errors"][level_key(level)]

    def act_norm(self, module: str) -> torch.Tensor:
        """Calibration input norm per input feature (``sqrt(diag H)``), for OWL-style scores."""
        return self.tensors(module, "stats")["act_norm"]

    def bytes_per_weight(self) -> dict:
        """Stored bytes per weight of each level, over all modules."""
        return {level_key(k): v for k, v in self.manifest["bytes_per_weight"].items()}

    # ----------------------------------------------------------------- open / verify
    @classmethod
    def open(cls, root, expected: dict | None = None, verify: bool = True) -> "LevelDatabase":
        """Open a database; raise :class:`StaleDatabaseError` when it is missing, does not match
        ``expected`` (manifest keys such as model, calibration, kind, levels, settings) or, with
        ``verify``, when a file's checksum differs."""
        root = Path(root)
        try:
            manifest = json.loads((root / "manifest.json").read_text())
        except FileNotFoundError as e:
            raise StaleDatabaseError(f"No level database at {root}.") from e
        except json.JSONDecodeError as e:
            raise StaleDatabaseError(f"The manifest of the level database at {root} is corrupt: {e}.") from e
        if manifest.get("format") != FORMAT_VERSION:
            raise StaleDatabaseError(f"The level database at {root} has format {manifest.get('format')}, "
                                     f"expected {FORMAT_VERSION}.")
        for key, value in (expected or {}).items():
            if manifest.get(key) != value:
                raise StaleDatabaseError(f"The level database at {root} is stale: its {key} is "
                                         f"{manifest.get(key)!r}, the request has {value!r}.")
        if verify:
            for name, info in manifest["modules"].items():
                path = root / info["file"]
                if not path.exists() or sha256_file(path) != info["sha256"]:
                    raise StaleDatabaseError(f"The level database at {root} is corrupt: {info['file']} "
                                             "is missing or fails its checksum.")
        return cls(root, manifest)

    # ----------------------------------------------------------------- building
    @classmethod
    def build(cls, model, windows: torch.Tensor, kind: str, levels, root, settings: dict | None = None,
              identity: dict | None = None, modules=None, progress: bool = True) -> "LevelDatabase":
        """Compress every linear of every decoder block at every level and write the database.

        Args:
            model: the dense model (float32 recommended).
            windows: ``[N, T]`` calibration token ids.
            kind: ``"quantization"`` (levels = bit widths) or ``"sparsity"`` (levels = fractions).
            levels: the levels to build, or a function ``(module name, shape) -> levels`` for
                per-module levels (sparsity levels spaced by a fixed number of weights); pass the
                levels' identity in ``identity`` then, so a changed spacing makes it stale.
            root: target folder (written in a temporary sibling, then moved into place).
            settings: compressor settings; quantization: ``group_size`` (128), ``sym`` (False),
                ``mse`` (False), ``act_order`` (False), ``damp`` (0.01); sparsity: ``damp``; both:
                ``attention_aware`` (True: value projections are compressed against the attention
                output, see :mod:`optimum_evo.compressors.calibrate`).
            identity: extra manifest entries (e.g. model and calibration hashes) checked by
                :meth:`open`.
            modules: optional predicate ``name -> bool`` selecting the linears to compress.
        """
        settings = full_settings(kind, settings)
        compressor = {k: v for k, v in settings.items() if k != "attention_aware"}
        per_module = callable(levels)
        level_fn = levels if per_module else (lambda name, shape, _lv=sorted(levels): _lv)
        root = Path(root)
        build_dir = root.with_name(f".{root.name}.build-{os.getpid()}")
        shutil.rmtree(build_dir, ignore_errors=True)
        _remove_orphan_builds(root)
        (build_dir / "layers").mkdir(parents=True)
        start = time.perf_counter()
        entries, totals = {}, {}  # module entries; level key -> [bytes, weights]
        walk = walk_blocks(model, windows, progress=progress, desc=f"Building {kind} database",
                           attention_aware=settings["attention_aware"])
        # The selected linears of every block; the walk stops after the last block that has one.
        selected = {i: [n for n in linear_modules(layer) if modules is None or modules(f"{walk.layout.path}.{i}.{n}")]
                    for i, layer in enumerate(walk.layout.layers)}
        last = max((i for i, names in selected.items() if names), default=-1)
        for block in walk:
            if block.index > last:
                break
            if not selected[block.index]:
                continue  # the walk advances the calibration inputs through this block
            hessians = block.hessians(selected[block.index])
            linears = block.linears()
            for name in selected[block.index]:
                linear = linears[name]
                full = f"{block.prefix}.{name}"
                H = hessians[name]
                dense = linear.weight.detach().float()
                diag = torch.diagonal(H, dim1=-2, dim2=-1)
                diag = diag.sum(0) if diag.dim() == 2 else diag
                tensors = {"stats::act_norm": torch.sqrt(diag.clamp(min=0)).contiguous()}
                errors = {}
                module_levels = sorted(level_fn(full, tuple(linear.weight.shape)))
                if kind == "quantization":  # all levels in one column sweep
                    compressed = gptq_levels(linear.weight, H, [int(lv) for lv in module_levels], **compressor)
                else:
                    compressed = sparsegpt_levels(linear.weight, H, [float(lv) for lv in module_levels],
                                                  damp=compressor["damp"])
                for lv, c in zip(module_levels, compressed):
                    if kind == "quantization":
                        enc = encode_quantized(c)
                        decoded = decode_quantized(enc, tuple(dense.shape), int(lv), c.group_size)
                    else:
                        enc = encode_sparse(c)
                        decoded = decode_sparse(enc, tuple(dense.shape))
                    errors[level_key(lv)] = relative_error(dense, decoded, H)
                    for k, t in enc.items():
                        tensors[f"{level_key(lv)}::{k}"] = t.contiguous()
                    nbytes = sum(t.numel() * t.element_size() for t in enc.values())
                    acc = totals.setdefault("per-module" if per_module else level_key(lv), [0, 0])
                    acc[0] += nbytes
                    acc[1] += linear.weight.numel()
                rel = f"layers/{full}.safetensors"
                save_file(tensors, str(build_dir / rel))
                entries[full] = {"shape": list(linear.weight.shape), "file": rel, "sha256": sha256_file(build_dir / rel),
                                 "levels": module_levels, "errors": errors}
            block.advance()
        manifest = {
            "format": FORMAT_VERSION,
            "kind": kind,
            "levels": "per-module" if per_module else sorted(levels),
            "settings": settings,
            **(identity or {}),
            "modules": entries,
            "bytes_per_weight": {k: b / max(n, 1) for k, (b, n) in totals.items()},
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        atomic_write_json(build_dir / "manifest.json", manifest)
        if root.exists():
            shutil.rmtree(root)
        os.replace(build_dir, root)
        return cls(root, manifest)

    @classmethod
    def open_or_build(cls, root, model, windows, kind, levels, settings=None, identity=None, modules=None,
                      progress=True) -> "LevelDatabase":
        """Reuse the database at ``root`` when it matches the request, else (re)build it."""
        expected = {"kind": kind, "levels": "per-module" if callable(levels) else sorted(levels),
                    "settings": full_settings(kind, settings), **(identity or {})}
        _remove_orphan_builds(Path(root))
        try:
            return cls.open(root, expected)
        except StaleDatabaseError as e:
            if Path(root).exists():
                logger.warning("%s Rebuilding it.", e)
        return cls.build(model, windows, kind, levels, root, settings, identity, modules, progress)
