"""The state of one EvoPress run, handed from stage to stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..methods import CompressionMethod
from ..settings import SearchArguments


@dataclass
class RunContext:
    """Everything a run has made so far; each stage of `optimum_evo.pipeline.stages` reads
    what the earlier ones left and adds its own.

    Attributes:
        args: the run's settings.
        method: the compression method of ``args.compression``.
        path: the model's folder or Hub id (names the model in caches and the report).
        model: the model in the evaluation dtype; compressed in place by `materialize`.
        tokenizer: its tokenizer.
        search_model: the model the search scores (``model`` itself, or a copy in ``search_dtype``).
        calibration, evaluation: ``[N, T]`` token windows (``evaluation`` is ``None`` without evaluation).
        database: the level database (methods that use one; a joint search: ``{kind: database}``).
        space, eval_space: the method's search space bound to ``search_model`` / ``model``.
        search_config: the engine settings.
        teacher, eval_teacher: dense teacher caches of the calibration / evaluation windows.
        objective: the KL fitness of the search.
        baselines, baseline_notes: named heuristic candidates and how they were chosen.
        initial: the engine's initial candidates.
        result: the engine's `SearchResult`.
        rows: evaluation rows (``dense``, ``evopress``, baselines, ``evopress+lora``).
        report: the run report (``result.json``).
        dense_model: a dense copy kept for the LoRA correction (only when it is asked for).
        profile: what `materialize` recorded; ``record``: the checkpoint's
            ``quantization_config`` (`optimum_evo.checkpoint.checkpoint_record`).
        peft_model: the corrected model (with ``lora_correction``).
        identity: what decides the result besides the settings the engine fingerprints itself
            (model weights, calibration tokens, fitness, dtype), checked when a search resumes.
        timings: seconds per stage.
        memory_needs: the estimate of what the run allocates and writes (`optimum_evo.pipeline.memory`),
            made before it starts and kept in the report as ``resources_estimate``.
        costs, latency_root: a joint search's cost model (bytes and latency of every unit's levels) and
            the folder of its latency table.
    """

    args: SearchArguments
    method: CompressionMethod
    path: str
    model: Any = None
    tokenizer: Any = None
    search_model: Any = None
    search_dtype: Optional[torch.dtype] = None
    calibration: Optional[torch.Tensor] = None
    evaluation: Optional[torch.Tensor] = None
    database: Any = None
    space: Any = None
    eval_space: Any = None
    search_config: Any = None
    teacher: Any = None
    eval_teacher: Any = None
    objective: Any = None
    baselines: dict = field(default_factory=dict)
    baseline_notes: dict = field(default_factory=dict)
    initial: list = field(default_factory=list)
    result: Any = None
    rows: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    dense_model: Any = None
    profile: Optional[dict] = None
    record: Optional[dict] = None
    peft_model: Any = None
    identity: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    costs: Any = None
    memory_needs: Any = None  # the estimate of `optimum_evo.pipeline.memory`, made before the run
    latency_root: Optional[Path] = None
    refined: dict = field(default_factory=dict)  # the method's `refine` report entries

    @property
    def output_dir(self) -> Optional[Path]:
        return Path(self.args.output_dir) if self.args.output_dir else None

    @property
    def best(self) -> tuple:
        """The candidate the search found."""
        return self.result.best
