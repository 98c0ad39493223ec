"""Sequential onloading: one decoder block's weights on the execution device at a time.

A calibration walk (`optimum_evo.compressors.calibrate.walk_blocks`) touches one block at a time,
so it never needs the whole model on the device that computes. Two ways to keep the other blocks
elsewhere:

* **in host memory**: the model is loaded on the CPU and the walk runs on a GPU
  (``walk_blocks(model, windows, device="cuda")``): each block is moved to the device at its
  turn and back afterwards, so the GPU holds one block, its calibration activations and its
  Hessians, whatever the model's size;
* **on disk**: `offloaded_model` builds the model with its decoder blocks' weights left in the
  safetensors checkpoint (meta tensors in memory) and everything else loaded; the walk
  (``walk_blocks(model, windows, weights=path)``) reads a block's tensors from the checkpoint
  (memory-mapped) at its turn and drops them afterwards. Host memory then holds the embeddings,
  one block and the activations: a model larger than memory can build its level database.

Disk offloading is for walks that only read the weights (the level database build): a block's
weights are dropped, not written back, when the walk moves on.

A model that accelerate dispatched with part of it offloaded to host memory (``device_map`` with
``"cpu"`` entries next to a GPU, as ``device_map="auto"`` makes for a model larger than the GPU)
keeps those weights outside its modules (meta tensors; the hook's weights map holds them), where a
search cannot write its levels. `onload_from_host` gives such blocks their weights back as
ordinary host-memory parameters and moves each block to the execution device for the time of its
forward (`HostOffloadHook`): the GPU still holds one offloaded block at a time, the levels the
search writes land in the parameters, and the compressed blocks stay in host memory afterwards.

Examples:
    >>> model = offloaded_model("path/to/checkpoint")                         # doctest: +SKIP
    >>> db = LevelDatabase.build(model, windows, "quantization", [2, 3, 4], "db",
    ...                          weights="path/to/checkpoint")                # doctest: +SKIP
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.hooks import ModelHook, SequentialHook, add_hook_to_module, remove_hook_from_submodules
from accelerate.utils import OffloadedWeightsLoader, send_to_device
from torch import nn

from ..decoder import find_decoder_layout

__all__ = ["CheckpointWeights", "BlockOnloader", "HostOffloadHook", "offloaded_model", "onload_from_host",
           "release_host_memory", "resident_bytes"]


class CheckpointWeights:
    """The tensors of a safetensors checkpoint folder (one file or an index of shards), read one by
    one and memory-mapped, never all at once."""

    def __init__(self, path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.exists():
            from safetensors import safe_open

            with safe_open(str(single), "pt") as f:
                weight_map = {k: single.name for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path} holds no safetensors checkpoint (model.safetensors or "
                                    "model.safetensors.index.json); save the model with save_pretrained first.")
        self.weight_map = weight_map
        self._files: dict = {}

    def keys(self):
        return self.weight_map.keys()

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.weight_map:
            raise KeyError(f"The checkpoint at {self.path} has no tensor {key!r}; disk offloading needs a checkpoint "
                           "whose tensor names are the model's parameter names (save it with save_pretrained).")
        name = self.weight_map[key]
        if name not in self._files:
            self._files[name] = safe_open(str(self.path / name), "pt")
        return self._files[name].get_tensor(key)

    def close(self) -> None:
        """Unmap the files (the pages of the tensors read so far leave the process's memory; tensors
        still referenced keep their own)."""
        self._files.clear()


def _is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def resident_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``module`` that are materialised (not meta; tensors
    sharing storage once)."""
    tensors = {t.data_ptr(): t for t in [*module.parameters(), *module.buffers()] if not t.is_meta}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class BlockOnloader:
    """Puts decoder block ``i`` on the execution ``device`` for the time of `onloaded` (a context
    manager) and sends it back afterwards: to the device it came from, or, with ``weights`` (a
    `CheckpointWeights` or a checkpoint folder), back to meta (its tensors are read from the
    checkpoint at each onload). Without either (the block already on ``device``) it does nothing."""

    def __init__(self, model: nn.Module, device=None, weights=None):
        self.layout = find_decoder_layout(model)
        self.weights = CheckpointWeights(weights) if isinstance(weights, (str, Path)) else weights
        layers = self.layout.layers
        on_meta = [i for i, layer in enumerate(layers) if _is_meta(layer)]
        if on_meta and self.weights is None:
            raise ValueError(f"Decoder blocks {on_meta[:4]}{'...' if len(on_meta) > 4 else ''} of this model have no "
                             "weights in memory (meta tensors); pass the checkpoint they are on as weights=<folder>.")
        resident = [p for p in model.parameters() if not p.is_meta]
        self.device = torch.device(device) if device is not None else (
            resident[0].device if resident else torch.device("cpu"))

    @contextmanager
    def onloaded(self, i: int):
        layer = self.layout.layers[i]
        if self.weights is not None and _is_meta(layer):
            self._load(i, layer)
            try:
                yield layer
            finally:
                for name, _ in list(layer.named_parameters()):
                    _set_tensor(layer, name, None)
                self.weights.close()  # the block's pages of the memory-mapped checkpoint leave with it
                release_host_memory()
            return
        homes = {p.device for p in layer.parameters()}
        if homes <= {self.device}:
            yield layer
            return
        home = next(iter(homes))
        layer.to(self.device)
        try:
            yield layer
        finally:
            layer.to(home)

    def _load(self, i: int, layer: nn.Module) -> None:
        prefix = f"{self.layout.path}.{i}."
        for name, p in list(layer.named_parameters()):
            t = self.weights.get(prefix + name)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{prefix + name} has shape {tuple(t.shape)} in the checkpoint, the model expects "
                                 f"{tuple(p.shape)}: the checkpoint is not this model's.")
            _set_tensor(layer, name, t.to(device=self.device, dtype=p.dtype))


def release_host_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere).
    Without it the freed buffers of each block (Hessians, GPTQ work space) stay in the process:
    measured on SmolLM2-135M, the walk's resident memory grew by 5 MB per block, and not at all
    with it. The database build also calls it after each linear's levels are written."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Replace parameter ``name`` of ``module`` with ``value`` (``None``: an empty meta tensor)."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    old = owner._parameters[attr]
    if value is None:
        value = torch.empty_like(old, device="meta")
    owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)


def offloaded_model(path, dtype: torch.dtype = torch.float32):
    """The causal LM saved at ``path`` (a safetensors checkpoint folder, as `save_pretrained`
    writes it) with its decoder blocks left on disk: their parameters are meta tensors, every other
    weight (embeddings, final norm, head) is loaded on the CPU in ``dtype``. Walk it with
    ``walk_blocks(model, windows, weights=path)`` or ``LevelDatabase.build(..., weights=path)``.

    Examples:
        >>> model = offloaded_model("checkpoints/llama-8b")                  # doctest: +SKIP
        >>> resident_bytes(model) < 0.1 * sum(p.numel() * 4 for p in model.parameters())  # doctest: +SKIP
        True
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    weights = CheckpointWeights(path)
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefix = find_decoder_layout(model).path + "."
    names = dict(model.named_parameters(remove_duplicate=False))
    for name, p in names.items():
        if name.startswith(prefix) or not p.is_meta:
            continue
        if name in weights.weight_map:  # a copy: the checkpoint is unmapped below
            _set_tensor(model, name, weights.get(name).to(dtype, copy=True))
    weights.close()
    if getattr(model.config, "tie_word_embeddings", False) or getattr(
            model.config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
    if missing:
        raise ValueError(f"The checkpoint at {path} lacks {missing[:4]}: disk offloading needs a checkpoint whose "
                         "tensor names are the model's parameter names (save it with save_pretrained).")
    return model.eval()


class HostOffloadHook(ModelHook):
    """Runs a module kept in host memory on ``execution_device``: before the forward its parameters
    and buffers are copied to the device and its inputs moved there; afterwards the parameters
    point at their host tensors again (the device copies are freed; nothing is copied back, a
    forward does not change weights)."""

    def __init__(self, execution_device):
        self.execution_device = torch.device(execution_device)
        self.homes: list = []

    def pre_forward(self, module, *args, **kwargs):
        for t in [*module.parameters(), *module.buffers()]:
            if t.device != self.execution_device:
                self.homes.append((t, t.data))
                t.data = t.data.to(self.execution_device, non_blocking=True)
        return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)

    def post_forward(self, module, output):
        for t, home in self.homes:
            t.data = home
        self.homes = []
        return output

    def __repr__(self) -> str:
        return f"HostOffloadHook(execution_device={self.execution_device})"


def _offload_hooks(module: nn.Module) -> list:
    """The accelerate hooks of ``module`` that keep its weights offloaded (``offload=True``)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if getattr(h, "offload", False)]


def onload_from_host(model: nn.Module) -> list:
    """Turn the blocks of ``model`` that accelerate offloaded to host memory into blocks whose
    weights are ordinary host-memory parameters, run on their execution device by a
    `HostOffloadHook`; return the names of the modules so changed (a decoder block, or an offloaded
    module outside the blocks such as the output layer). The weights are not copied: the
    parameters take the host tensors accelerate held. Weights offloaded to disk raise
    ``ValueError`` (writing levels into them would need them in host memory; a smaller
    ``max_memory`` for the disk does not change that).

    Examples:
        >>> model = AutoModelForCausalLM.from_pretrained(path, device_map="auto")  # doctest: +SKIP
        >>> onload_from_host(model)                                             # doctest: +SKIP
        ['model.layers.30', 'model.layers.31']
    """
    modules = dict(model.named_modules())
    offloaded = {name: hooks for name, m in modules.items() if (hooks := _offload_hooks(m))}
    if not offloaded:
        return []
    layout = find_decoder_layout(model)
    blocks = {f"{layout.path}.{i}" for i in range(len(layout.layers))}

    def unit_of(name: str) -> str:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if prefix in blocks or prefix in offloaded:
                return prefix
        return name

    units: dict = {}
    for name, hooks in offloaded.items():
        hook, module = hooks[0], modules[name]
        store = getattr(hook.weights_map, "dataset", hook.weights_map)
        prefix = getattr(hook.weights_map, "prefix", "")
        # dispatch_model's OffloadedWeightsLoader keeps host tensors in .state_dict (the rest is on
        # disk); cpu_offload's weights map is a plain dict of host tensors
        resident = store.state_dict if isinstance(store, OffloadedWeightsLoader) else (store or {})
        for table in ("_parameters", "_buffers"):
            for key, t in list(getattr(module, table).items()):
                if t is None or not t.is_meta:
                    continue
                if prefix + key not in resident:
                    raise ValueError(f"{name}.{key} is offloaded to disk: a search writes its levels into the weights, "
                                     "which must be in memory. Load the model with a device_map without 'disk' entries "
                                     "(host memory, 'cpu', is fine), or compress on a machine with more memory.")
                value = resident[prefix + key]
                getattr(module, table)[key] = (nn.Parameter(value, requires_grad=t.requires_grad) if table == "_parameters"
                                              else value)
        units.setdefault(unit_of(name), hook.execution_device)
    for name, device in units.items():
        unit = modules[name]
        remove_hook_from_submodules(unit)
        add_hook_to_module(unit, HostOffloadHook(device))
    return sorted(units)
