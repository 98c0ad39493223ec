"""Optimum integration: `EvoPressQuantizer` (an ``optimum.quantization_base.OptimumQuantizer``) and
the ``optimum-cli evopress`` command.

``optimum-cli evopress`` takes exactly the options of ``optimum-evo search`` (the parser is built by
`optimum_evo.cli.add_search_arguments`, including ``--export``); it is registered through the
PEP 420 namespace ``optimum/commands/register/`` (module ``optimum/commands/register/evopress.py``
of this distribution), which optimum-cli scans at startup.

Examples:
    >>> from optimum_evo.integrations.optimum import EvoPressQuantizer
    >>> quantizer = EvoPressQuantizer.from_pretrained("HuggingFaceTB/SmolLM2-135M")          # doctest: +SKIP
    >>> model = quantizer.quantize("out/q", compression="quantization", target=3.0,
    ...                            levels=[2, 3, 4, 5, 6, 8], export_format="gptq")          # doctest: +SKIP

    $ optimum-cli evopress --model smollm2 --compression depth --target 0.25 --output out/depth
"""

from __future__ import annotations

import copy
from pathlib import Path

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum.quantization_base import OptimumQuantizer


def save_formats() -> tuple:
    """``"evopress"`` (the EvoPress checkpoint) and every registered export format."""
    from ..exporters import available_exporters

    return ("evopress", *available_exporters())


class EvoPressQuantizer(OptimumQuantizer):
    """Runs an EvoPress search on a causal LM and saves the compressed model, in the EvoPress format
    (reloads with ``import optimum_evo``) or exported for deployment without the plugin
    (``dense``, ``gptq``, ``compressed-tensors``, ...; see `optimum_evo.exporters`).

    Build it with `from_pretrained` (a path / Hub id, or a loaded float model).
    """

    def __init__(self, model=None, model_path: str | None = None, tokenizer=None):
        if model is None and model_path is None:
            raise ValueError("EvoPressQuantizer needs a model or a model path; use EvoPressQuantizer.from_pretrained.")
        self.model, self.model_path, self.tokenizer = model, model_path, tokenizer

    @classmethod
    def from_pretrained(cls, model_or_path, file_name: str | None = None, tokenizer=None) -> "EvoPressQuantizer":
        """``model_or_path``: a local folder, Hub id, embedded name (``"smollm2"``) or an already
        loaded ``PreTrainedModel`` (compressed in place by `quantize`; its ``name_or_path``
        must point to its checkpoint, whose tokenizer and calibration identity are used).
        ``file_name`` is part of optimum's interface for single-file formats (ONNX) and must be ``None``."""
        if file_name is not None:
            raise ValueError("EvoPressQuantizer works on transformers checkpoints (folders or Hub ids); file_name "
                             f"must be None, got {file_name!r}.")
        if isinstance(model_or_path, (str, Path)):
            from ..embedded_models import resolve_model

            return cls(model_path=str(resolve_model(str(model_or_path))), tokenizer=tokenizer)
        if not hasattr(model_or_path, "config") or not hasattr(model_or_path, "named_modules"):
            raise TypeError(f"model_or_path must be a path, a Hub id or a transformers model, got "
                            f"{type(model_or_path).__name__}.")
        return cls(model=model_or_path, model_path=getattr(model_or_path, "name_or_path", None) or None,
                   tokenizer=tokenizer)

    def quantize(self, save_dir, file_prefix: str | None = None, *, quantization_config=None,
                 export_format: str = "evopress", **config_kwargs):
        """Search, compress and save to ``save_dir``; returns the compressed model.

        Args:
            save_dir: output folder (created).
            file_prefix: part of optimum's interface for single-file formats; must be ``None``.
            quantization_config: an `EvoPressConfig`; or pass its fields as keyword
                arguments (``compression="quantization", target=3.0, levels=[2, 3, 4], ...``).
            export_format: ``"evopress"`` (``save_pretrained``: packed mixed-bit layers, config with the
                profile and metrics, model card) or a registered export format (`optimum_evo.exporters`).
        """
        from ..exporters import export
        from .transformers import EvoPressConfig

        if file_prefix is not None:
            raise ValueError(f"EvoPressQuantizer saves transformers folders; file_prefix must be None, got {file_prefix!r}.")
        if export_format not in save_formats():
            raise ValueError(f"export_format must be one of {save_formats()}, got {export_format!r}.")
        if quantization_config is not None and config_kwargs:
            raise ValueError("Pass either quantization_config or its fields as keyword arguments, not both.")
        config = quantization_config if quantization_config is not None else EvoPressConfig(**config_kwargs)
        if not isinstance(config, EvoPressConfig):
            raise TypeError(f"quantization_config must be an EvoPressConfig, got {type(config).__name__}.")
        model = self._compress(config)
        save_dir = Path(save_dir)
        tokenizer = self.tokenizer if self.tokenizer is not None else self.model_path
        if export_format == "evopress":
            from ..checkpoint import save_checkpoint
            from ..record import read_record

            save_checkpoint(model, save_dir, read_record(model), tokenizer=tokenizer)
        else:
            from ..card import write_export_card
            from ..record import read_record

            export(model, save_dir, export_format, tokenizer=tokenizer)
            write_export_card(save_dir, read_record(model), export_format)
        self.model = model
        return model

    def _compress(self, config):
        import torch
        from transformers import AutoModelForCausalLM

        if self.model is None:
            return AutoModelForCausalLM.from_pretrained(self.model_path, quantization_config=config,
                                                        dtype=torch.float32)
        from .transformers.quantizer import compress_on_load, mark_compressed

        if getattr(self.model, "hf_quantizer", None) is not None:
            raise ValueError("This model is already quantized; load its dense checkpoint to run EvoPress.")
        if not self.model_path:
            raise ValueError("The model has no name_or_path: EvoPress needs its checkpoint folder or Hub id.")
        config = copy.copy(config)
        config.profile = config.metrics = None
        compress_on_load(self.model, config)
        mark_compressed(self.model, config)
        return self.model


class EvoPressCommand(BaseOptimumCLICommand):
    """``optimum-cli evopress [optimum-evo search options]``."""

    COMMAND = CommandInfo(name="evopress", help="EvoPress evolutionary compression search (same options as "
                                                "`optimum-evo search`)")

    @staticmethod
    def parse_args(parser):
        from ..cli import add_search_arguments

        add_search_arguments(parser)

    def run(self):
        import logging
        import sys

        from ..cli import run_search_command

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            code = run_search_command(self.args)
        except (ValueError, FileNotFoundError, NotImplementedError, KeyError, ImportError) as e:
            print(f"optimum-cli evopress: error: {e}", file=sys.stderr)
            code = 2
        if code:
            sys.exit(code)
