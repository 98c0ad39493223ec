"""Integrations of optimum-evo with the Hugging Face libraries (transformers, peft, optimum, the Hub).

Nothing is imported here: each sub-package is imported on use (``optimum_evo.integrations.transformers``
registers the ``"evopress"`` quantization method with transformers when imported).
"""
