"""Integrations of optimum-evo with the Hugging Face libraries and lm-eval.

| module | integrates with |
|---|---|
| ``transformers`` | ``from_pretrained(..., quantization_config=EvoPressConfig(...))``: the ``"evopress"`` quantization method |
| ``hub`` | ``save_pretrained`` / ``push_to_hub`` of EvoPress models, uploads without local paths |
| ``optimum`` | ``EvoPressQuantizer`` and ``optimum-cli evopress`` |
| ``callbacks`` | ``transformers.Trainer`` callbacks |
| ``metrics`` | the KL-divergence ``evaluate`` module and ``KLDivergenceMetric`` for ``compute_metrics`` |
| ``lm_eval`` | the lm-eval model ``evopress`` (``lm_eval --model evopress``) |

Nothing is imported here: each module is imported on use (``optimum_evo.integrations.transformers``
registers the ``"evopress"`` quantization method with transformers when imported).
"""
