"""The level database: every searched linear layer precompressed at every level, on disk.

Layout of a database folder:

    manifest.json                 model, calibration and settings hashes, levels, files + sha256
    layers/<module name>.safetensors   all levels of one linear layer: <level>::<tensor>

How a level is compressed, stored and decoded is its kind's codec
(`optimum_evo.compressors.codecs`: packed GPTQ codes, or a bitmask and the kept values); the
manifest records the codec's ``kind`` and settings. A database whose manifest does not match the requested model / calibration / settings, or whose
files fail their checksum, is reported stale or corrupt and rebuilt, never silently used. Reads are
memory-mapped (``safetensors.safe_open``).

Examples:
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
from .. import distributed
from ..faults import fault_point
from .codecs import LevelCodec, get_codec, level_key
from .offload import release_host_memory

logger = logging.getLogger(__name__)

#: 2: codec settings as recorded by `codecs` (``mse`` is the clipping
#: search's p-norm, 0 = off).
FORMAT_VERSION = 2


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


def relative_error(dense: torch.Tensor, compressed: torch.Tensor, H: torch.Tensor) -> float:
    """Normalized layer reconstruction error ``||(W - W') X||^2 / ||W X||^2`` via ``H ~ X X^T``
    (``H`` may be a ``[groups, in, in]`` stack, one per equal slice of rows)."""
    d = dense - compressed
    if H.dim() == 3:
        g = H.shape[0]
        d, dense = d.view(g, -1, d.shape[1]), dense.view(g, -1, dense.shape[1])
    return float((d @ H * d).sum() / (dense @ H * dense).sum().clamp(min=1e-30))


class LevelDatabase:
    """A level database folder (see the module docstring)."""

    def __init__(self, root, manifest: dict, codec: LevelCodec | None = None):
        self.root = Path(root)
        self.manifest = manifest
        self.reused = None  # open_or_build: whether an existing database was reused
        self.codec = get_codec(codec if codec is not None else manifest["kind"])

    @staticmethod
    def codec_for(kind) -> LevelCodec:
        """The codec of ``kind`` (a codec's name, or a codec)."""
        return get_codec(kind)

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
        return self.codec.decode(t, shape, level, self.manifest["settings"]).to(dtype)

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
        """Open a database; raise `StaleDatabaseError` when it is missing, does not match
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
              identity: dict | None = None, modules=None, progress: bool = True, device=None,
              weights=None) -> "LevelDatabase":
        """Compress every linear of every decoder block at every level and write the database.

        Args:
            model: the dense model (float32 recommended).
            windows: ``[N, T]`` calibration token ids.
            kind: the level codec, or its name (``"quantization"``: levels are bit widths,
                ``"sparsity"``: levels are fractions of pruned weights).
            levels: the levels to build, or a function ``(module name, shape) -> levels`` for
                per-module levels (sparsity levels spaced by a fixed number of weights); pass the
                levels' identity in ``identity`` then, so a changed spacing makes it stale.
            root: target folder (written in a temporary sibling, then moved into place).
            settings: the codec's settings (its ``default_settings`` fill the rest); quantization:
                ``group_size`` (128), ``sym`` (False), ``mse`` (0: min-max), ``act_order`` (False),
                ``damp`` (0.01), ``builder`` (``"gptq"``; ``"gptq-sequential"``, ``"quantease"``,
                ``"signround"``) and its ``iters`` / ``batch_size`` / ``lr``; levels are bit widths
                or ``"BITSgGROUP"`` (`optimum_evo.compressors.codecs.quant_level`); sparsity:
                ``damp``; both: ``attention_aware`` (True: value
                projections are compressed against the attention output, see
                `optimum_evo.compressors.calibrate`).
            identity: extra manifest entries (e.g. model and calibration hashes) checked by
                `open`.

        The manifest's ``level_builders`` records what made each level (quantization: the
        ``builder`` setting, `optimum_evo.compressors.builders`).
            modules: optional predicate ``name -> bool`` selecting the linears to compress.
            device: where each block is compressed (default: the model's device); the model's
                other blocks stay where they are and are onloaded one at a time
                (`optimum_evo.compressors.offload`), e.g. a model in host memory built on a GPU.
            weights: the checkpoint folder of a model made by
                `optimum_evo.compressors.offload.offloaded_model` (blocks read from disk one at a
                time: host memory holds one block, not the model).
        """
        codec = get_codec(kind)
        settings = codec.full_settings(settings)
        per_module = callable(levels)
        level_fn = levels if per_module else (lambda name, shape, _lv=codec.sort_levels(levels): _lv)
        root = Path(root)
        # In a multi-process run (`optimum_evo.distributed`) every process calls build: the linears
        # are dealt out round-robin (process r compresses linears r, r + world, ...; every process
        # walks all blocks for the calibration activations), each writes its files into process 0's
        # build folder, and process 0 writes the manifest of all of them. Builders that carry
        # calibration streams through the compressed blocks need every linear: process 0 builds alone.
        world, rank = distributed.world_size(), distributed.rank()
        shard = world > 1 and not codec.needs_streams(settings)
        owner = distributed.all_gather_objects(os.getpid())[0]
        build_dir = root.with_name(f".{root.name}.build-{owner}")
        if rank == 0:
            shutil.rmtree(build_dir, ignore_errors=True)
            _remove_orphan_builds(root)
            (build_dir / "layers").mkdir(parents=True)
        distributed.barrier()
        mine = (lambda k: k % world == rank) if shard else (lambda k: rank == 0)
        start = time.perf_counter()
        entries, totals = {}, {}  # module entries; level key -> [bytes, weights]
        walk = walk_blocks(model, windows, progress=progress, desc=f"Building {codec.kind} database",
                           attention_aware=settings["attention_aware"], streams=codec.needs_streams(settings),
                           device=device, weights=weights)
        # The selected linears of every block; the walk stops after the last block that has one.
        selected = {i: [n for n in linear_modules(layer) if modules is None or modules(f"{walk.layout.path}.{i}.{n}")]
                    for i, layer in enumerate(walk.layout.layers)}
        order = [(i, n) for i in sorted(selected) for n in selected[i]]
        mine_of = {key for k, key in enumerate(order) if mine(k)}
        selected = {i: [n for n in names if (i, n) in mine_of] for i, names in selected.items()}
        last = max((i for i, names in selected.items() if names), default=-1)
        for block in walk:
            if block.index > last:
                break
            if not selected[block.index]:
                continue  # the walk advances the calibration inputs through this block
            names = selected[block.index]
            hessians = block.hessians(names)
            linears = block.linears()
            levels_of = {n: codec.sort_levels(level_fn(f"{block.prefix}.{n}", tuple(linears[n].weight.shape)))
                         for n in names}
            if per_module:
                compressed_of = {n: codec.compress_block(block, [n], levels_of[n], hessians, settings)[n]
                                 for n in names}
            else:  # every linear has the same levels: one call for the block (all levels in one sweep)
                compressed_of = codec.compress_block(block, names, levels_of[names[0]], hessians, settings)
            for name in names:
                linear = linears[name]
                full = f"{block.prefix}.{name}"
                H = hessians[name].cpu()  # the bookkeeping runs on the CPU, the compression on the device
                dense = linear.weight.detach().float().cpu()
                diag = torch.diagonal(H, dim1=-2, dim2=-1)
                diag = diag.sum(0) if diag.dim() == 2 else diag
                tensors = {"stats::act_norm": torch.sqrt(diag.clamp(min=0)).contiguous()}
                errors = {}
                module_levels = levels_of[name]
                compressed = compressed_of[name]
                for lv, c in zip(module_levels, compressed):
                    enc = {k: t.cpu() for k, t in codec.encode(c).items()}
                    decoded = codec.decode(enc, tuple(dense.shape), lv, settings)
                    errors[level_key(lv)] = relative_error(dense, decoded, H)
                    for k, t in enc.items():
                        tensors[f"{level_key(lv)}::{k}"] = t.contiguous()
                    nbytes = sum(t.numel() * t.element_size() for t in enc.values())
                    acc = totals.setdefault("per-module" if per_module else level_key(lv), [0, 0])
                    acc[0] += nbytes
                    acc[1] += linear.weight.numel()
                rel = f"layers/{full}.safetensors"
                save_file(tensors, str(build_dir / rel))
                del tensors, compressed
                compressed_of[name] = None
                # the levels' work space and write buffers, freed: back to the system at once, else
                # glibc's heap keeps them and the build's peak grew with every block
                release_host_memory()
                fault_point("database.layer")
                entries[full] = {"shape": list(linear.weight.shape), "file": rel, "sha256": sha256_file(build_dir / rel),
                                 "levels": module_levels, "errors": errors}
            block.advance()
        if world > 1:  # every process's entries and byte counts, in one manifest
            parts = distributed.all_gather_objects((entries, totals))
            entries, totals = {}, {}
            for part_entries, part_totals in parts:
                entries.update(part_entries)
                for k, (b, n) in part_totals.items():
                    acc = totals.setdefault(k, [0, 0])
                    acc[0] += b
                    acc[1] += n
            position = {f"{walk.layout.path}.{i}.{n}": k for k, (i, n) in enumerate(order)}
            entries = {key: entries[key] for key in sorted(entries, key=position.__getitem__)}  # one process's order
        manifest = {
            "format": FORMAT_VERSION,
            "kind": codec.kind,
            "levels": "per-module" if per_module else codec.sort_levels(levels),
            "settings": settings,
            "level_builders": "per-module" if per_module else {
                level_key(lv): codec.builder_name(settings) for lv in codec.sort_levels(levels)},
            **(identity or {}),
            "modules": entries,
            "bytes_per_weight": {k: b / max(n, 1) for k, (b, n) in totals.items()},
            "build_seconds": round(time.perf_counter() - start, 1),
            "build_processes": world if shard else 1,
        }
        if rank == 0:
            atomic_write_json(build_dir / "manifest.json", manifest)
            fault_point("database.manifest")
            if root.exists():
                shutil.rmtree(root)
            os.replace(build_dir, root)
        distributed.barrier()
        return cls(root, manifest, codec)

    @classmethod
    def open_or_build(cls, root, model, windows, kind, levels, settings=None, identity=None, modules=None,
                      progress=True, device=None, weights=None) -> "LevelDatabase":
        """Reuse the database at ``root`` when it matches the request, else (re)build it. Processes
        asking for the same folder at once take turns (a file lock beside it): one builds, the
        others wait and reuse its result."""
        from filelock import FileLock

        codec = get_codec(kind)
        expected = {"kind": codec.kind, "levels": "per-module" if callable(levels) else codec.sort_levels(levels),
                    "settings": codec.full_settings(settings), **(identity or {})}
        root = Path(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        if distributed.world_size() > 1:  # the processes of one run build together (see `build`)
            return cls._open_or_build_together(root, expected, model, windows, codec, levels, settings, identity,
                                               modules, progress, device, weights)
        with FileLock(str(root.with_name(f".{root.name}.lock"))):
            db = cls._current(root, expected)
            if db is not None:
                db.reused = True
                return db
            db = cls.build(model, windows, codec, levels, root, settings, identity, modules, progress, device, weights)
            db.reused = False
            return db

    @classmethod
    def _current(cls, root: Path, expected: dict) -> "LevelDatabase | None":
        """The database at ``root`` when it matches ``expected``, else ``None`` (a stale one is
        warned about); run under the folder's lock, after removing orphaned build folders."""
        _remove_orphan_builds(root)
        try:
            return cls.open(root, expected)
        except StaleDatabaseError as e:
            if root.exists():
                logger.warning("%s Rebuilding it.", e)
            return None

    @classmethod
    def _open_or_build_together(cls, root, expected, model, windows, codec, levels, settings, identity, modules,
                                progress, device, weights) -> "LevelDatabase":
        """`open_or_build` for the processes of one multi-process run: process 0 decides (under the
        folder's lock, held until the database is in place), all build together, all open it."""
        from filelock import FileLock

        lock = FileLock(str(root.with_name(f".{root.name}.lock"))) if distributed.is_main() else None
        if lock is not None:
            lock.acquire()
        try:
            reuse = cls._current(root, expected) is not None if lock is not None else None
            reuse = distributed.all_gather_objects(reuse)[0]
            if not reuse:
                cls.build(model, windows, codec, levels, root, settings, identity, modules, progress, device, weights)
            distributed.barrier()
        finally:
            if lock is not None:
                lock.release()
        db = cls.open(root, expected)
        db.reused = reuse
        return db
