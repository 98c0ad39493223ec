"""The user flow on the real SmolLM2-135M: from_pretrained with EvoPressConfig (mixed-bit
quantization) -> evaluate -> save_pretrained -> reload -> same logits -> push_to_hub (intercepted).

Kept small for 2 CPU cores: GPTQ levels {2, 4} bits (3.0 average = half of the searched linears at
each) for the linears of the first two decoder blocks only (``modules``), 8 x 128 calibration
tokens, 2 generations, 2 evaluation windows of 128 tokens.
"""

import types

import pytest
import torch
from huggingface_hub import HfApi
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_evo import EvoPressConfig, EvoPressQuantLinear, embedded_model_path
from optimum_evo.data import evaluation_windows
from optimum_evo.fitness import evaluate

pytestmark = pytest.mark.integration


def test_smollm2_quantization_from_pretrained_save_reload_push(tmp_path, monkeypatch):
    path = embedded_model_path("smollm2")
    config = EvoPressConfig(compression="quantization", target=3.0, levels=[2, 4], group_size=128,
                            modules=r"\.layers\.[01]\.", dataset="brown", num_samples=8, seq_len=128, generations=2,
                            offspring=4, eval_windows=2, eval_seq_len=128, top_k=128, search_dtype="float32",
                            progress=False, database_dir=str(tmp_path / "db"))
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    qc = model.config.quantization_config
    modules = qc.profile["modules"]
    assert len(modules) == 14 and sorted(set(modules.values())) == [2, 4]
    assert qc.profile["average_bits"] == pytest.approx(3.0)
    assert all(isinstance(model.get_submodule(n), EvoPressQuantLinear) for n in modules)
    assert type(model.model.layers[2].mlp.down_proj) is torch.nn.Linear  # outside `modules`: dense

    # Evaluate: the recorded metrics and our own perplexity on held-out text agree.
    ev = qc.metrics["evaluation"]
    # Half of 14 linears at 2 bits, 2 generations: under 3x dense on a Xeon, 3.0003x on an AMD EPYC
    # (float rounding picks another candidate). One linear of layers 0-1 with its weights in the
    # wrong order (a broken unpack) gives 1965-162249 (dense 39.4).
    assert ev["dense"]["perplexity"] < ev["evopress"]["perplexity"] < 6 * ev["dense"]["perplexity"]
    tok = AutoTokenizer.from_pretrained(path)
    windows = evaluation_windows("wikitext2", tok, 128, 2)
    ppl = evaluate(model, windows, progress=False)["perplexity"]
    assert ppl == pytest.approx(ev["evopress"]["perplexity"], rel=1e-4)

    # Save -> reload: same logits, generate() works.
    out = tmp_path / "saved"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("The history of the city begins in the twelfth century, when", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert (reloaded(ids).logits - model(ids).logits).abs().max().item() == 0.0
    generated = reloaded.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, model.generate(ids, max_new_tokens=8, do_sample=False))

    # On disk the searched linears take their bits plus fp16 scales and packed zeros per 128 weights.
    weights = stored = 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for name in modules:
            layer = model.get_submodule(name)
            weights += layer.in_features * layer.out_features
            stored += sum(f.get_slice(f"{name}.{k}").get_shape()[0] * (2 if k == "scales" else 1) *
                          (f.get_slice(f"{name}.{k}").get_shape()[1] if k == "scales" else 1)
                          for k in ("qweight", "scales", "qzeros"))
    ratio = stored / (2 * weights)  # vs bfloat16
    assert ratio == pytest.approx((3.0 + (16 + 3) / 128) / 16, rel=0.01)

    # push_to_hub uploads what save_pretrained wrote (intercepted at huggingface_hub).
    uploaded = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: types.SimpleNamespace(repo_id=repo_id))

    def create_commit(self, repo_id, operations, **kw):
        uploaded.update({op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations})
        return types.SimpleNamespace(oid="0" * 40)

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    reloaded.push_to_hub("me/smollm2-evopress-3bit")
    assert set(uploaded) == {"config.json", "model.safetensors", "generation_config.json", "README.md"}
    assert uploaded["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert b"me/smollm2-evopress-3bit" in uploaded["README.md"] and b"randomly initialises" in uploaded["README.md"]
