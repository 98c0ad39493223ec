"""`--lora-correction`: a sparsity search followed by correction, saved as a loadable PEFT adapter."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from optimum_evo.cli import main
from optimum_evo.embedded_models import embedded_model_path
from optimum_evo.pipeline import SearchArguments

CALIB = ("The committee met on Tuesday to discuss the new budget for the school district. " * 40 + "\n") * 20


pytestmark = pytest.mark.usefixtures("one_thread")


def test_search_with_lora_correction(tmp_path):
    from peft import AutoPeftModelForCausalLM

    model_dir = tmp_path / "tiny"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.mul_(6.0)
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(embedded_model_path("smollm2")).save_pretrained(model_dir)
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB)
    out = tmp_path / "out"
    args = ["search", "--model", model_dir, "--compression", "sparsity", "--target", "0.6", "--max-offset", 1,
            "--generations", 1, "--offspring", 2, "--num-samples", 4, "--seq-len", 32, "--eval-windows", 2,
            "--eval-seq-len", 32, "--dataset", calib, "--search-dtype", "float32", "--quiet", "--top-k", 32,
            "--database-dir", tmp_path / "db", "--output", out, "--lora-correction", 4, "--lora-train-steps", 2]
    rc = main([str(a) for a in args])
    assert rc == 0
    report = json.loads((out / "result.json").read_text())
    rows = report["results"]
    assert {"dense", "evopress", "evopress+lora"} <= set(rows)
    assert rows["evopress+lora"]["sparsity"] == rows["evopress"]["sparsity"]
    section = report["lora_correction"]
    assert section["rank"] == 4 and section["trained_steps"] == 2 and section["method"] == "eora"
    adapter = out / "model" / "lora-correction"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((out / "model").resolve()) and cfg["r"] == 4
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = loaded.get_base_model()
        with loaded.disable_adapter():
            plain = loaded(input_ids=ids).logits
        corrected = loaded(input_ids=ids).logits
    assert not torch.allclose(plain, corrected)
    # the compressed weights reloaded untouched (60% of the searched linears' weights are zeros)
    zeros = sum(int((m.base_layer.weight == 0).sum()) for n, m in base.named_modules() if hasattr(m, "base_layer"))
    total = sum(m.base_layer.weight.numel() for n, m in base.named_modules() if hasattr(m, "base_layer"))
    assert zeros / total == pytest.approx(0.6, abs=1e-3)


def test_lora_correction_argument_validation():
    with pytest.raises(ValueError, match="depth-pruned"):
        SearchArguments(compression="depth", target=0.25, lora_correction=8)
    with pytest.raises(ValueError, match="lora_method"):
        SearchArguments(compression="sparsity", target=0.5, lora_correction=8, lora_method="pca")
    with pytest.raises(ValueError, match=">= 0"):
        SearchArguments(compression="sparsity", target=0.5, lora_correction=-1)
