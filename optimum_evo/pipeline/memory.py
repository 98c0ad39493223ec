"""What a run will hold in memory and write to disk, estimated before anything is computed.

The `check_memory` stage runs right after the model is loaded. It prints the estimate (when the
run shows progress) and stops the run early, with the settings that lower the need, when the
model's device does not have the memory the run is about to allocate: the search model's copy in
the search dtype, the teacher cache, the prefix cache of the KL objective (worst case: every
calibration window's input to every decoder layer) and what the compression method holds (e.g.
the level weights a layer-wise search keeps, worst case every level of every linear). The level
database's size on disk is estimated too; a database may be reused, so a disk shortfall is only
warned about.

Examples:
    >>> needs = estimate(args, model, method)                       # doctest: +SKIP
    >>> print(format_needs(needs))                                  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from ..compressors.offload import resident_bytes
from ..methods.base import Need, host_of

__all__ = ["HEADROOM", "InsufficientMemoryError", "Need", "available_memory", "check", "estimate", "host_of",
           "prefix_cache_budget", "format_needs", "free_disk", "model_bytes"]

logger = logging.getLogger(__name__)

#: share of the available memory a run may plan to use (the rest is for activations and the runtime)
HEADROOM = 0.9


def model_bytes(model) -> int:
    """Bytes of the parameters and buffers of ``model`` (shared tensors once, meta tensors not at all)."""
    return resident_bytes(model)


def estimate(args, model, method, search_dtype: torch.dtype | None = None) -> list:
    """The `Need` items of a run of ``args`` on the loaded ``model`` with ``method``;
    ``search_dtype``: the dtype the search runs in (default: ``args.search_dtype``, float32 for
    ``"auto"``)."""
    from ..decoder import find_decoder_layout

    layout = find_decoder_layout(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(config.hidden_size)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if search_dtype is None:
        search_dtype = torch.float32 if args.search_dtype == "auto" else getattr(torch, args.search_dtype)
    item = torch.empty((), dtype=search_dtype).element_size()
    eval_item = next(p for p in model.parameters()).element_size()
    n, t = args.num_samples, args.seq_len
    host = host_of(model)
    needs = []
    if item != eval_item:
        needs.append(Need("search model (a copy in the search dtype)", model_bytes(model) * item // eval_item,
                          fix="search_dtype equal to the model's dtype"))
    if args.fitness == "topk":
        k = min(args.top_k, vocab)
        needs.append(Need(f"teacher cache (top-{k})", n * t * (k * 8 + 4), fix="num_samples, seq_len or top_k",
                          device=host))
    else:
        needs.append(Need("teacher cache (full vocabulary)", n * t * vocab * 2, fix="fitness='topk', num_samples",
                          device=host))
    needs += list(method.resource_needs(args, model, item))
    if args.reuse_prefix:
        worst = n * t * hidden * item * len(layout.layers)
        others = sum(x.bytes for x in needs if x.where == "memory")
        budget, _ = prefix_cache_budget(args.prefix_cache_size, next(p for p in model.parameters()).device, others)
        if budget is None or worst <= budget:
            needs.append(Need("prefix cache (worst case: every window's input to every layer)", worst,
                              fix="num_samples, seq_len, prefix_cache_size or reuse_prefix=False"))
        else:
            needs.append(Need(f"prefix cache (its budget; every window's input to every layer would take "
                              f"{_gb(worst)})", budget, fix="prefix_cache_size or reuse_prefix=False"))
    return needs


def prefix_cache_budget(value, device: torch.device, others: int = 0) -> tuple:
    """``(device bytes, spilled bytes)`` the KL objective's prefix cache may hold for the setting
    ``prefix_cache_size`` (`optimum_evo.fitness.KLObjective`): a size, or a fraction (default
    0.5) of the memory free on ``device`` after ``others`` bytes; on an accelerator, what does not
    fit spills to host memory, up to half of what is free there. ``None``: no limit (the free
    memory cannot be known)."""
    from ..utils import parse_size

    unit, amount = parse_size(0.5 if value is None else value, "prefix_cache_size", "the free memory")
    if unit == "bytes":
        budget = amount
    else:
        free = available_memory(device)
        budget = None if free is None else int(amount * max(0, free - others))
    spill = 0
    if device.type != "cpu" and budget is not None:
        host = available_memory(torch.device("cpu"))
        spill = int(0.5 * host) if host else 0
    return budget, spill


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` for CUDA, the kernel's
    ``MemAvailable`` for the CPU; ``None`` where it cannot be known."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(path) -> int | None:
    """Free bytes on the file system of ``path`` (its nearest existing parent)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _gb(b: int) -> str:
    return f"{b / 2**30:.2f} GB"


def format_needs(needs: list, available: int | None = None) -> str:
    """The estimate as a small table."""
    width = max(len(x.what) for x in needs) if needs else 10
    lines = [f"{'estimated need':<{width}}  {'size':>10}  where"]
    lines += [f"{x.what:<{width}}  {_gb(x.bytes):>10}  {x.where}" + (f" ({x.device})" if x.device else "")
              for x in needs]
    total = sum(x.bytes for x in needs if x.where == "memory" and not x.device)
    lines.append(f"{'memory to allocate':<{width}}  {_gb(total):>10}" +
                 (f"  (available {_gb(available)})" if available is not None else ""))
    return "\n".join(lines)


class InsufficientMemoryError(MemoryError, ValueError):
    """The run would allocate more memory than its device has free; the message names the settings."""


def check(args, model, method, search_dtype: torch.dtype | None = None, database_root=None,
          show: bool = False) -> list:
    """Estimate, print when ``show``, and raise `InsufficientMemoryError` when the memory needed
    exceeds ``HEADROOM`` of what the model's device has free. Returns the `Need` items."""
    needs = estimate(args, model, method, search_dtype)
    device = next(p for p in model.parameters()).device
    available = available_memory(device)
    if show:
        print(format_needs(needs, available), file=sys.stderr, flush=True)
    on = {None: device}  # needs on another device (``Need.device``) are checked against that device
    on.update({x.device: torch.device(x.device) for x in needs if x.device})
    for key, where in on.items():
        memory = [x for x in needs if x.where == "memory" and x.device == key]
        free = available if key is None else available_memory(where)
        total = sum(x.bytes for x in memory)
        if free is not None and total > HEADROOM * free:
            big = sorted(memory, key=lambda x: -x.bytes)
            parts = "; ".join(f"{x.what} {_gb(x.bytes)} (lower: {x.fix})" for x in big if x.fix)
            raise InsufficientMemoryError(
                f"This run would allocate about {_gb(total)} on {where} but only {_gb(free)} is free: {parts}. "
                "Lower those settings, or run on a device with more memory.")
    disk = sum(x.bytes for x in needs if x.where == "disk")
    if disk and database_root is not None:
        free = free_disk(database_root)
        if free is not None and disk > free:
            logger.warning("Building the level database may need about %s in %s but %s is free (a database already "
                           "there is reused); set database_dir to a larger disk.", _gb(disk), database_root, _gb(free))
    return needs
