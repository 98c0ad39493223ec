"""Exports of EvoPress models that deploy **without this plugin**.

=================  ==========================================  ==========================================
function           writes                                      loads with
=================  ==========================================  ==========================================
:func:`export_dense`  plain transformers checkpoint (depth:      ``AutoModelForCausalLM.from_pretrained``
                   blocks removed; sparsity: exact zeros;
                   quantization: dequantized weights)
:func:`export_gptq`   GPTQ format, per-module bits in ``dynamic``  gptqmodel (``GPTQModel.load``), transformers
                                                               with gptqmodel, vLLM
:func:`export_compressed_tensors`  compressed-tensors              transformers (compressed-tensors quantizer),
                   ``pack-quantized``, one config group per     vLLM, llm-compressor
                   bit width
=================  ==========================================  ==========================================

:func:`export` dispatches on a format name (``"dense"``, ``"gptq"``, ``"compressed-tensors"``).

Example:
    >>> import optimum_evo
    >>> from transformers import AutoModelForCausalLM
    >>> from optimum_evo.integrations.exporters import export
    >>> model = AutoModelForCausalLM.from_pretrained("evopress-3bit")   # an EvoPress checkpoint  # doctest: +SKIP
    >>> export(model, "out/ct", "compressed-tensors")                   # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("out/ct")                  # no `import optimum_evo`  # doctest: +SKIP
"""

from .common import ExportError, pack_int32, unpack_int32
from .compressed_tensors import export_compressed_tensors
from .dense import export_dense
from .gptq import dequantize_gptq_checkpoint, export_gptq

__all__ = ["EXPORT_FORMATS", "ExportError", "dequantize_gptq_checkpoint", "export", "export_compressed_tensors",
           "export_dense", "export_gptq", "pack_int32", "unpack_int32"]

EXPORT_FORMATS = ("dense", "gptq", "compressed-tensors")


def export(model, save_dir, format: str, tokenizer=None, **kwargs) -> dict:
    """Export ``model`` to ``save_dir`` in ``format`` (one of :data:`EXPORT_FORMATS`); ``kwargs`` go to
    the format's function. Returns its summary dict."""
    functions = {"dense": export_dense, "gptq": export_gptq, "compressed-tensors": export_compressed_tensors}
    key = format.replace("_", "-").lower()
    if key not in functions:
        raise ValueError(f"Unknown export format {format!r}; choose one of {EXPORT_FORMATS}.")
    from ...correction.peft_io import has_lora_layers

    if has_lora_layers(model):
        raise ValueError(
            "This model carries a LoRA correction adapter; the export formats hold the compressed weights only. "
            "Export the compressed model without it (optimum_evo.correction.set_correction_enabled does not remove "
            "it: reload the saved folder without its lora-correction/ subfolder, export that, and ship the "
            "adapter folder beside it: it is a standard PEFT adapter).")
    return functions[key](model, save_dir, tokenizer=tokenizer, **kwargs)
