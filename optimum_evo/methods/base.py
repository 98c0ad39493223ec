"""The interface of a compression method, and the protocol of its search space.

A *compression method* is one kind of compression EvoPress can search over (depth pruning,
unstructured sparsity, mixed-bit quantization, ...). Everything that depends on the kind lives in
its method; the pipeline, the search engine, the checkpoint format, the model card, the exporters
and the integrations only talk to a `CompressionMethod` found by name with
`get_method`.

To add a method, subclass `CompressionMethod`, set the class attributes and implement:

| method | does |
|---|---|
| ``validate(args)`` | check the method's settings in `SearchArguments` (the target's meaning, the levels) and raise ``ValueError`` naming the fix; called when the settings are built, before any model loads |
| ``build_space(run, model)`` | the `SearchSpace` of ``model`` (units, levels, exact budget) |
| ``baselines(run)`` | named initial / comparison candidates (heuristics) in that space |
| ``materialize(model, space, candidate)`` | make a candidate permanent on ``model`` and return its *profile* (a JSON dict recorded in the checkpoint's ``quantization_config``) |
| ``summary(profile)`` | the profile in a few readable lines (model card, summaries) |

and, where the method needs them: ``prepare(run)`` (work shared by all spaces of a run, e.g. a
level database), ``build_skeleton(model, profile)`` (swap modules of an empty model so a saved
checkpoint's tensors load into them) with ``after_load`` and ``checkpoint_tensors``, ``verify(model, profile)`` (refuse a model that lacks what
the profile needs), ``space_from_report(model, report)``, ``budget_text(row)``,
``plot_profile(report, path)``, ``merge_rules(profile)`` and ``card_rows(record)``. Then register
an instance: ``register_method(MyMethod())``.

Examples:
    >>> from optimum_evo.methods import get_method
    >>> get_method("depth").target_help
    'fraction of sub-blocks dropped'
"""

from __future__ import annotations

from dataclasses import dataclass
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Protocol, Sequence, runtime_checkable

from ..search import LevelSpace, SearchConfig

if TYPE_CHECKING:  # annotations only
    from ..pipeline.context import RunContext

__all__ = ["MERGE_MASKED", "MERGE_REFUSED", "CompressedModelError", "CompressionMethod", "SearchSpace"]

#: `merge_correction` re-masks the merged weight (it keeps its zeros).
MERGE_MASKED = "masked"
#: `merge_correction` refuses (the merged weight leaves the compressed format).
MERGE_REFUSED = "refused"


class CompressedModelError(ValueError):
    """A model does not hold the compressed modules its profile records."""


@runtime_checkable
class SearchSpace(Protocol):
    """What the engine, the fitness and the pipeline need from a method's search space.

    Attributes:
        level_space: the units, their levels and switch groups (`LevelSpace`).
        layer_of_unit: decoder layer of every unit (the fitness reuses the activations of the
            layers before the first changed unit).
    """

    level_space: LevelSpace
    layer_of_unit: Sequence[int]

    def apply(self, model, candidate) -> None:
        """Make ``model`` compute ``candidate`` (reversibly; only changed units are touched)."""

    def restore(self, model) -> None:
        """Put the dense model back."""

    def describe(self, candidate) -> dict:
        """The candidate's budget figures (dropped sub-blocks, average bits, sparsity, ...)."""


@dataclass(frozen=True)
class Need:
    """One item of a run's resource estimate (`optimum_evo.pipeline.memory`): ``bytes`` of
    ``where`` ("memory" or "disk"), and the settings that lower it."""

    what: str
    bytes: int
    where: str = "memory"
    fix: str = ""
    device: str | None = None  # memory on another device than the model's (e.g. ``database_device``)


def host_of(model) -> str | None:
    """`Need.device` of what a run keeps in host memory (the teacher cache, decoded levels): ``None``
    (the model's own device) for a model on the CPU, ``"cpu"`` for one on an accelerator, whose
    memory is then not charged for them."""
    return None if next(p for p in model.parameters()).device.type == "cpu" else "cpu"


class CompressionMethod(ABC):
    """One compression kind (see the module docstring for what to implement).

    Class attributes:
        name: the name users pass as ``compression=``.
        description: one line for model cards and ``--help``.
        target_help: what ``target`` means for this method.
        packs_weights: the compressed linears are packed quantized layers
            (`EvoPressQuantLinear`); exporters of quantized formats
            need this.
        correctable: LoRA error correction applies (every compressed linear keeps its shape and has
            a per-linear residual).
        refinable: `refine` improves a found candidate's weights (the ``retune`` setting applies).
        merge_rule: how `merge_correction` merges an adapter into
            the method's compressed linears (`MERGE_MASKED` or `MERGE_REFUSED`).
        presets: ``{"fast" | "paper" | "superfast": SearchConfig keyword arguments}``.
        export_formats: the export formats that can hold this method's models (``None``: every
            format whose other conditions it meets).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    target_help: ClassVar[str]
    packs_weights: ClassVar[bool] = False
    correctable: ClassVar[bool] = False
    refinable: ClassVar[bool] = False
    merge_rule: ClassVar[str | None] = None
    presets: ClassVar[dict]
    export_formats: ClassVar[tuple | None] = None

    # ------------------------------------------------------------------ settings
    @abstractmethod
    def validate(self, args) -> None:
        """Check (and normalise) this method's fields of ``args``; raise ``ValueError`` with the fix."""

    def search_config(self, args, space: SearchSpace | None = None) -> SearchConfig:
        """The preset of ``args.preset`` with ``generations`` / ``offspring`` / ``confirm_tokens`` /
        ``seed`` overrides."""
        return SearchConfig.from_preset(args.preset, self.presets, generations=args.generations,
                                        offspring=args.offspring, confirm_tokens=args.confirm_tokens, seed=args.seed,
                                        structure_moves=getattr(args, "structure_moves", None))

    # ------------------------------------------------------------------ the search
    def prepare(self, run: "RunContext") -> None:
        """Work shared by every space of a run (e.g. building the level database); default none."""

    @abstractmethod
    def build_space(self, run: "RunContext", model) -> SearchSpace:
        """The search space of ``model`` (the run's search model or its evaluation model)."""

    @abstractmethod
    def baselines(self, run: "RunContext") -> tuple:
        """``(candidates, notes)``: named heuristic candidates in ``run.space`` (the first one is the
        reference budget for random candidates) and notes on how they were chosen."""

    def seed_candidate(self, run: "RunContext", report: dict, reference) -> tuple:
        """The candidate of ``run.space`` that an earlier run's ``report`` (``result.json``) found,
        with the budget of ``reference`` (a baseline): the ``init_from`` seed. Default: the report's
        own candidate, when it searched this method over a space of the same shape and budget;
        ``ValueError`` naming the mismatch otherwise."""
        ls = run.space.level_space
        if report.get("compression") != self.name:
            raise ValueError(f"init_from: the report searched {report.get('compression')!r}, this run searches "
                             f"{self.name!r}; seed it with a {self.name} result (a joint search also takes the "
                             "result of one of its kinds).")
        try:
            cand = ls.validate(report.get("candidate") or ())
            ls.check_initial([tuple(reference), cand])
        except ValueError as e:
            raise ValueError(f"init_from: the report's candidate does not fit this run ({e}); search with the "
                             "report's model, levels and target.") from None
        return cand

    def refine(self, run: "RunContext") -> dict:
        """After the search: improve the found candidate's compressed weights in ``run.eval_space``
        without changing its levels (quantization: ``retune``); returns report entries. Default none."""
        return {}

    def space_from_report(self, model, report: dict) -> SearchSpace:
        """The space a finished run's ``report`` (``result.json``) searched, bound to ``model``."""
        raise NotImplementedError(f"{self.name} cannot rebuild its space from a report.")

    # ------------------------------------------------------------------ the compressed model
    @abstractmethod
    def materialize(self, model, space: SearchSpace, candidate) -> dict:
        """Compress ``model`` in place with ``candidate`` (permanently) and return its profile."""

    def build_skeleton(self, model, profile: dict) -> None:
        """Swap modules of an empty (meta) ``model`` for the compressed ones of ``profile``."""

    def after_load(self, model, profile: dict) -> None:
        """Finish a model whose checkpoint tensors just loaded into `build_skeleton`'s modules."""

    def checkpoint_tensors(self, model, profile: dict, state_dict: dict) -> dict:
        """The tensors a checkpoint stores, from the model's ``state_dict`` (default: as they are;
        e.g. sparse weights stored compactly)."""
        return state_dict

    def verify(self, model, profile: dict) -> None:
        """Raise `CompressedModelError` when ``model`` lacks the modules ``profile`` needs."""

    def merge_rules(self, profile: dict) -> dict:
        """``{module name: MERGE_MASKED | MERGE_REFUSED}`` of the compressed linears (by default
        `merge_rule` for every module of ``profile["modules"]``)."""
        if self.merge_rule is None:
            return {}
        return {name: self.merge_rule for name in profile.get("modules", {})}

    # ------------------------------------------------------------------ reports
    @abstractmethod
    def summary(self, profile: dict) -> dict:
        """A few readable lines about the profile (model card, summaries)."""

    def card_rows(self, record: dict) -> list:
        """Extra ``(setting, value)`` rows of the model card's compression table."""
        return []

    def budget_text(self, row: dict) -> str:
        """The budget column of the summary table for one evaluated model."""
        return ""

    def summary_lines(self, description: dict) -> list:
        """``(label, value)`` lines under the summary table for the found candidate's description."""
        return []

    def plot_profile(self, report: dict, path) -> None:
        """Write ``path`` (PNG): the found profile, layer by layer."""

    def plot_level(self, level) -> tuple:
        """``(value, text)`` of one unit's level in a joint profile plot: the colour scale's value
        (``None``: dropped, negative: kept sub-block) and the cell's label."""
        return float(level), str(level)

    def resource_needs(self, args, model, itemsize: int) -> list:
        """What this method will hold beyond the pipeline's own caches, as
        `Need` items (``itemsize``: bytes per element of the search
        dtype); printed and checked before a run starts."""
        return []

    def report_extras(self, run: "RunContext", candidate) -> dict:
        """Extra entries of the run report for the found candidate (e.g. per-linear levels)."""
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
