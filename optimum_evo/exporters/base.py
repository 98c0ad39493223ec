"""The export-format interface and registry: `Exporter`, `register_exporter`,
`get_exporter`, `available_exporters` and `export`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

__all__ = ["Exporter", "available_exporters", "export", "get_exporter", "register_exporter", "unregister_exporter"]


class Exporter(ABC):
    """An export format.

    Class attributes:
        name: the format's name (``export(model, dir, name)``, ``--export name``).
        description: one line for ``--help`` and the docs.
        loads_with: what reads the result.
        needs_packed_weights: the format holds packed quantized linears, so it only takes models of a
            method with ``packs_weights`` (`CompressionMethod`).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    loads_with: ClassVar[str] = ""
    needs_packed_weights: ClassVar[bool] = False

    def refusal(self, method) -> str | None:
        """Why a model compressed by ``method`` cannot be written in this format (``None``: it can):
        it is not among the method's ``export_formats``, or the format needs packed weights the
        method does not make."""
        from ..methods.registry import available_methods, get_method

        def takes(m) -> bool:
            return m.export_formats is None or self.name in m.export_formats

        if not takes(method):
            return (f"--export {self.name} cannot hold {method.name} results; export them with "
                    f"{' or '.join(f'--export {f}' for f in method.export_formats)}.")
        if self.needs_packed_weights and not method.packs_weights:
            packing = " or ".join(f"--compression {m}" for m in available_methods()
                                  if get_method(m).packs_weights and takes(get_method(m)))
            return (f"--export {self.name} needs {packing} (a method that packs its linears); export "
                    f"{method.name} results with --export dense.")
        return None

    def usage(self, name: str) -> list:
        """Markdown lines of the model card's "How to load" for an export at ``name`` (a Hub repo
        or a folder): transformers' ``from_pretrained`` and lm-eval by default."""
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{name}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
                "Evaluate it with lm-eval as any transformers model:", "", "```bash",
                f"lm_eval --model hf --model_args pretrained={name} --tasks hellaswag", "```", ""]

    @abstractmethod
    def export(self, model, save_dir, tokenizer=None, **kwargs) -> dict:
        """Write ``model`` to ``save_dir``; return a summary dict (``format``, ``path``, ...)."""


_EXPORTERS: dict = {}


def register_exporter(exporter: Exporter, replace: bool = False) -> Exporter:
    """Register ``exporter`` (an instance, or a class that is instantiated) under its ``name``."""
    if isinstance(exporter, type):
        exporter = exporter()
    if not isinstance(exporter, Exporter):
        raise TypeError(f"register_exporter needs an Exporter, got {type(exporter).__name__}.")
    if exporter.name in _EXPORTERS and not replace and type(_EXPORTERS[exporter.name]) is not type(exporter):
        raise ValueError(f"An export format named {exporter.name!r} is already registered; pass replace=True.")
    _EXPORTERS[exporter.name] = exporter
    return exporter


def unregister_exporter(name: str) -> None:
    """Remove a registered export format."""
    _EXPORTERS.pop(name, None)


def get_exporter(name: str) -> Exporter:
    """The exporter of ``name`` (``_`` and ``-`` are the same, case-insensitive)."""
    key = str(name).replace("_", "-").lower()
    for exporter in _EXPORTERS.values():
        if exporter.name.replace("_", "-").lower() == key:
            return exporter
    raise ValueError(f"Unknown export format {name!r}; choose one of {available_exporters()}.")


def available_exporters() -> list:
    """Names of the registered export formats."""
    return list(_EXPORTERS)


def export(model, save_dir, format: str, tokenizer=None, **kwargs) -> dict:
    """Export ``model`` to ``save_dir`` in ``format`` (one of `available_exporters`); ``kwargs``
    go to the format. Returns its summary dict."""
    exporter = get_exporter(format)
    from ..correction.peft_io import has_lora_layers

    if has_lora_layers(model):
        raise ValueError(
            "This model carries a LoRA correction adapter; the export formats hold the compressed weights only. "
            "Export the compressed model without it (optimum_evo.correction.set_correction_enabled does not remove "
            "it: reload the saved folder without its lora-correction/ subfolder, export that, and ship the "
            "adapter folder beside it: it is a standard PEFT adapter).")
    from pathlib import Path

    from ..faults import fault_point
    from ..utils import publish_folder, staging_folder

    final = Path(save_dir)
    tmp = staging_folder(final)  # a crash leaves no half-written export that a loader would trust
    summary = exporter.export(model, tmp, tokenizer=tokenizer, **kwargs)
    fault_point("export.write")
    publish_folder(tmp, final)
    return {**summary, "path": str(final)}
