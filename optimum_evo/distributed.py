"""Many processes on one search, through ``torch.distributed``.

Launch the same command with ``torchrun`` (or ``accelerate launch``)::

    torchrun --nproc-per-node 2 -m optimum_evo search --model smollm2 --compression depth ...

Every process loads the model, draws the same calibration windows and runs the same engine with the
same seed. Each generation's candidates are scored across the processes (process ``r`` scores
candidates ``r, r + world, ...`` on the same samples), the scores are gathered, and every process
takes the same decision, so the search result is identical to one process with the same seed.
Only process 0 writes the checkpoint, the teacher cache, the evaluation, the compressed model and
the report; a restart with any number of processes resumes from the checkpoint. The backend is
``gloo`` on CPU and ``nccl`` on GPU.

Examples:
    >>> from optimum_evo import distributed
    >>> distributed.world_size(), distributed.rank()      # without torchrun: one process
    (1, 0)
"""

from __future__ import annotations

import os

__all__ = ["all_gather_objects", "barrier", "init_from_env", "is_main", "rank", "world_size"]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def init_from_env(device_type: str = "cpu") -> bool:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment
    (``WORLD_SIZE`` > 1); returns whether this is a multi-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return True


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def is_main() -> bool:
    """Whether this process writes the run's files (process 0, or the only one)."""
    return rank() == 0


def barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier()


def all_gather_objects(value) -> list:
    """``[value of process 0, value of process 1, ...]`` (``[value]`` without a process group)."""
    dist = _dist()
    if not dist:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
