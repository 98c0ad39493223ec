"""EvoPressConfig(lora_correction=...): the correction runs inside from_pretrained, the model carries
the adapter through transformers' PEFT integration, save_pretrained / push_to_hub write compressed
model + PEFT adapter folder, and every standard loader restores them."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from test_hf_quantizer import save_tiny, tiny_config
from transformers import AutoModelForCausalLM

from optimum_evo import EvoPressConfig, EvoPressQuantLinear
from optimum_evo.correction import merge_correction
from optimum_evo.correction.peft_io import ADAPTER_SUBFOLDER, merge_rules, set_correction_enabled
from optimum_evo.methods import MERGE_REFUSED
from optimum_evo.integrations.transformers import EvoPressConfigError


@pytest.mark.parametrize("value, message", [
    (True, "must be a rank"), ({"rank": 0}, "positive integer 'rank'"), ({"rnak": 4}, "Unknown lora_correction keys"),
    ({"rank": 4, "method": "qr"}, "lora_correction['method']"), ({"rank": 4, "train_steps": -1}, "train_steps"),
    ({"rank": 4, "learning_rate": 0}, "learning_rate"), ({"rank": 4, "param_budget": 0}, "param_budget"),
    ({"rank": 4, "inputs": "both"}, "lora_correction['inputs']"),
])
def test_invalid_lora_correction_fails_at_construction(value, message):
    with pytest.raises(EvoPressConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        EvoPressConfig(compression="quantization", target=3.0, lora_correction=value)


def test_lora_correction_config_normalises_validates_and_round_trips():
    cfg = EvoPressConfig(compression="sparsity", target=0.5, lora_correction=8)
    assert (cfg.lora_correction, cfg.lora_method, cfg.lora_train_steps) == (8, "eora", 0)
    assert EvoPressConfig(compression="sparsity", target=0.5, lora_correction=0).lora_correction == 0
    with pytest.raises(EvoPressConfigError, match="depth-pruned"):
        EvoPressConfig(compression="depth", target=0.25, lora_correction=8)
    cfg = EvoPressConfig(compression="quantization", target=3.0, lora_correction={"rank": 4, "train_steps": 3})
    args = cfg.search_arguments()
    assert (args.lora_correction, args.lora_train_steps, args.lora_method) == (4, 3, "eora")
    auto = EvoPressConfig(compression="sparsity", target=0.5, lora_correction={"rank": 4, "inputs": "auto"})
    assert auto.search_arguments().lora_inputs == "auto"
    again = EvoPressConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert (again.lora_correction, again.lora_train_steps) == (4, 3)
    assert EvoPressConfig.from_search_arguments(args).lora_correction == 4
    # a checkpoint written in format 1 (nested lora_correction, cache_dir) still reads
    old = {k: v for k, v in cfg.to_dict().items() if not k.startswith("lora_") and k != "database_dir"}
    old.update(format_version=1, lora_correction={"rank": 4, "train_steps": 3}, cache_dir=None)
    for key in ("sym", "desc_act", "damp_percent", "mse", "modules_to_not_convert"):
        old.pop(key)
    again = EvoPressConfig.from_dict(old)
    assert (again.lora_correction, again.lora_train_steps, again.format_version) == (4, 3, 2)


@pytest.fixture(scope="module")
def corrected(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-on-load")
    tiny = save_tiny(root / "tiny")
    cfg = tiny_config("quantization", root, levels=[2, 3], target=2.5, lora_correction={"rank": 4, "param_budget": 6000})
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg, dtype=torch.float32)
    return model, root


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_from_pretrained_attaches_an_active_correction_that_lowers_kl(corrected):
    model, _ = corrected
    assert type(model).__name__ == "LlamaForCausalLM"  # a transformers model, not a PeftModel
    assert model._hf_peft_config_loaded and list(model.peft_config) == ["default"]
    q = next(m for m in model.modules() if hasattr(m, "lora_A"))  # the budget decides which linears get one
    assert isinstance(q.get_base_layer(), EvoPressQuantLinear) and q.lora_A["default"].weight.shape[0] <= 4
    metrics = model.config.quantization_config.metrics
    ev = metrics["evaluation"]
    assert ev["evopress+lora"]["kl"] < ev["evopress"]["kl"]
    assert 0 < metrics["lora_correction"]["adapter_parameters"] <= 6000  # the budget, allocated over the linears
    assert metrics["lora_correction"]["param_budget"] == 6000
    ids = torch.randint(0, 128, (1, 24))
    with_adapter = logits(model, ids)
    wrapped = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    assert 0 < wrapped < len(model.config.quantization_config.profile["modules"])  # the budget left some out
    assert set_correction_enabled(model, False) == wrapped
    try:
        assert (logits(model, ids) - with_adapter).abs().max() > 1e-4  # the adapter changes the output
    finally:
        set_correction_enabled(model, True)


def test_save_writes_compressed_model_and_adapter_and_both_reload(corrected):
    model, root = corrected
    out = root / "saved"
    model.save_pretrained(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    assert "model.layers.0.self_attn.q_proj.qweight" in keys
    adapter_cfg = json.loads((out / ADAPTER_SUBFOLDER / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(out.resolve())
    assert "LoRA error correction" in (out / "README.md").read_text()
    assert model._hf_peft_config_loaded  # saving did not detach the adapter

    ids = torch.randint(0, 128, (1, 24))
    expected = logits(model, ids)
    set_correction_enabled(model, False)
    compressed_only = logits(model, ids)
    set_correction_enabled(model, True)

    base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(logits(base, ids), compressed_only)  # the folder alone: the compressed model
    peft_model = PeftModel.from_pretrained(base, str(out), subfolder=ADAPTER_SUBFOLDER)
    assert torch.allclose(logits(peft_model, ids), expected, atol=2e-3, rtol=0)  # float16 adapter storage
    direct = AutoModelForCausalLM.from_pretrained(out / ADAPTER_SUBFOLDER, dtype=torch.float32)
    assert torch.allclose(logits(direct, ids), expected, atol=2e-3, rtol=0)
    assert merge_rules(base)["model.layers.0.self_attn.q_proj"] == MERGE_REFUSED
    with pytest.raises(ValueError, match="packed codes"):
        merge_correction(peft_model)


def test_exporting_a_corrected_model_is_refused_with_the_way_out(corrected, tmp_path):
    from optimum_evo.exporters import export

    with pytest.raises(ValueError, match="lora-correction/ subfolder"):
        export(corrected[0], tmp_path / "gptq", "gptq")


def test_push_uploads_the_adapter_pointing_at_the_repo(corrected, hub):
    model, _ = corrected
    model.push_to_hub("me/tiny-evopress-lora")
    files = hub.commits[-1]["files"]
    assert "model.safetensors" in files and f"{ADAPTER_SUBFOLDER}/adapter_model.safetensors" in files
    cfg = json.loads(files[f"{ADAPTER_SUBFOLDER}/adapter_config.json"])
    assert cfg["base_model_name_or_path"] == "me/tiny-evopress-lora"


def test_sparsity_with_trained_correction_keeps_the_exact_zeros(tmp_path):
    tiny = save_tiny(tmp_path / "tiny")
    cfg = tiny_config("sparsity", tmp_path, lora_correction={"rank": 4, "train_steps": 2, "learning_rate": 1e-3})
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg, dtype=torch.float32)
    info = model.config.quantization_config.metrics["lora_correction"]
    assert info["trained_steps"] == 2 and info["method"] == "eora"
    assert not model.training and not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    for name, level in model.config.quantization_config.profile["modules"].items():
        w = model.get_submodule(name).get_base_layer().weight
        assert abs(float((w == 0).float().mean()) - level) < 0.01  # training touched only the adapter
    model.save_pretrained(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / ADAPTER_SUBFOLDER / "evopress_correction.json").read_text())
    assert meta["trained_steps"] == 2 and meta["adapter_bytes"] > 0
