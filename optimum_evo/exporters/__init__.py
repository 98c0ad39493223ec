"""The registry of export formats: compressed models that deploy **without this plugin**.

| format | writes | loads with |
|---|---|---|
| ``dense`` | plain transformers checkpoint (depth: blocks removed; sparsity: exact zeros; quantization: dequantized weights) | ``AutoModelForCausalLM.from_pretrained`` |
| ``gptq`` | GPTQ format, per-module bits in ``dynamic`` | gptqmodel (``GPTQModel.load``), transformers with gptqmodel, vLLM (4/8-bit symmetric only) |
| ``compressed-tensors`` | ``pack-quantized``, one config group per bit width | transformers (compressed-tensors quantizer), vLLM, llm-compressor |
| ``gguf`` | one GGUF file, a type per tensor (``Q4_0`` / ``Q5_0`` / ``Q8_0`` exact for symmetric group-32 grids) | llama.cpp, transformers (``gguf_file=``) |

Each format is an `Exporter` registered with `register_exporter`; the command line's
``--export`` choices, the optimum quantizer's ``export_format`` and the rule that a format needs
packed quantized linears are read from the registry, so a new format is one module.

Examples:
    >>> import optimum_evo
    >>> from transformers import AutoModelForCausalLM
    >>> from optimum_evo.exporters import available_exporters, export
    >>> available_exporters()
    ['dense', 'gptq', 'compressed-tensors', 'gguf']
    >>> model = AutoModelForCausalLM.from_pretrained("evopress-3bit")   # an EvoPress checkpoint  # doctest: +SKIP
    >>> export(model, "out/ct", "compressed-tensors")                   # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("out/ct")                  # no `import optimum_evo`  # doctest: +SKIP
"""

from __future__ import annotations

from .base import Exporter, available_exporters, export, get_exporter, register_exporter, unregister_exporter

__all__ = ["ExportError", "Exporter", "available_exporters", "dequantize_gptq_checkpoint", "export",
           "export_compressed_tensors", "export_dense", "export_gguf", "export_gptq", "get_exporter", "register_exporter",
           "unregister_exporter"]


from .common import ExportError  # noqa: E402
# each format registers itself on import, in this order
from .dense import export_dense  # noqa: E402
from .gptq import dequantize_gptq_checkpoint, export_gptq  # noqa: E402
from .compressed_tensors import export_compressed_tensors  # noqa: E402,I001
from .gguf import export_gguf  # noqa: E402
