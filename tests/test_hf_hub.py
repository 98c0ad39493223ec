"""push_to_hub uploads exactly what save_pretrained writes (model card included); the upload is
intercepted at the huggingface_hub boundary (HfApi.create_repo / create_commit), no network."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from optimum_evo import EvoPressConfig, EvoPressQuantLinear
from optimum_evo.integrations.hub import attach_hub_methods, model_card, read_card_metadata
from optimum_evo.integrations.transformers.quantizer import EvoPressHfQuantizer


def quantized_tiny(bits_of=lambda i: 2 + i % 3):
    """A tiny Llama whose decoder linears are packed at mixed bits (round-to-nearest), marked as an
    EvoPress model exactly as the quantizer does after a search."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    modules = {}
    for i, (name, linear) in enumerate([(n, m) for n, m in model.named_modules()
                                        if isinstance(m, torch.nn.Linear) and ".layers." in n]):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, EvoPressQuantLinear.from_linear(linear, bits_of(i), 32))
        modules[name] = bits_of(i)
    cfg = EvoPressConfig(compression="quantization", target=3.0, levels=[2, 3, 4], group_size=32,
                         profile={"modules": modules, "group_size": 32, "act_order": False, "average_bits": 3.0},
                         metrics={"model": "org/tiny-llama", "search": {"fitness_kl": 0.0123, "generations": 7},
                                  "evaluation": {"text": "wikitext2", "windows": 2, "seq_len": 32,
                                                 "dense": {"perplexity": 10.0, "kl": 0.0},
                                                 "evopress": {"perplexity": 11.5, "kl": 0.05}}})
    model.config.quantization_config = cfg
    model.hf_quantizer = EvoPressHfQuantizer(cfg, pre_quantized=True)
    attach_hub_methods(model)
    return model


def folder_bytes(path):
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


def test_push_to_hub_uploads_exactly_the_saved_files(hub, tmp_path):
    model = quantized_tiny()
    model.save_pretrained(tmp_path / "local")
    local = folder_bytes(tmp_path / "local")
    assert set(local) == {"config.json", "model.safetensors", "generation_config.json", "README.md"}

    model.push_to_hub("me/tiny-evopress", private=True, commit_message="compressed")
    assert hub.repos == [("me/tiny-evopress", {"private": True, "token": None, "exist_ok": True})]
    (commit,) = hub.commits
    assert commit["repo_id"] == "me/tiny-evopress" and commit["commit_message"] == "compressed"
    pushed = commit["files"]
    assert set(pushed) == set(local)
    for name in local:
        if name != "README.md":  # the card names the repo instead of the local folder
            assert pushed[name] == local[name], name
    card = pushed["README.md"].decode()
    assert card == local["README.md"].decode().replace(str(tmp_path / "local"), "me/tiny-evopress")

    # The uploaded files are a loadable compressed checkpoint.
    for name, data in pushed.items():
        (tmp_path / "pushed").mkdir(exist_ok=True)
        (tmp_path / "pushed" / name).write_bytes(data)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pushed")
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, EvoPressQuantLinear)
    assert reloaded.push_to_hub.__func__.__module__ == "optimum_evo.integrations.hub"


def test_model_card_content(tmp_path):
    model = quantized_tiny()
    card = model_card(model, "me/tiny-evopress", tags=["demo"])
    for text in ("EvoPress", "mixed-bitwidth GPTQ quantization", "| target | 3.0 (average bits per weight) |",
                 "import optimum_evo", 'AutoModelForCausalLM.from_pretrained("me/tiny-evopress")',
                 "randomly initialises", "modules per level", "`model.layers.0.self_attn.q_proj` | 2",
                 "| evopress | 11.50 | 0.0500 |", "0.0123", "check_evopress_model"):
        assert text in card, text
    model.save_pretrained(tmp_path)
    meta = read_card_metadata(tmp_path)
    assert meta["library_name"] == "transformers" and meta["base_model"] == "org/tiny-llama"
    assert {"evopress", "quantization"} <= set(meta["tags"])


def test_save_pretrained_with_push_to_hub_flag_uploads_the_folder(hub, tmp_path):
    model = quantized_tiny()
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="me/flagged")
    (commit,) = hub.commits
    assert commit["repo_id"] == "me/flagged"
    assert commit["files"] == folder_bytes(tmp_path / "out")


def test_pushing_a_model_loaded_without_the_plugin_is_refused(hub, tmp_path):
    """A model whose config says 'evopress' but whose modules are dense (what loading without the
    plugin gives) must not be saved or pushed through our methods."""
    from optimum_evo.integrations.hub import push_to_hub, save_pretrained
    from optimum_evo.integrations.transformers import EvoPressLoadError

    model = quantized_tiny()
    plain = LlamaForCausalLM(model.config).eval()
    plain.config.quantization_config = model.config.quantization_config.to_dict()  # as transformers leaves it
    with pytest.raises(EvoPressLoadError, match="without the optimum-evo plugin"):
        push_to_hub(plain, "me/garbage")
    with pytest.raises(EvoPressLoadError):
        save_pretrained(plain, tmp_path)
    assert hub.commits == [] and hub.repos == []


def test_the_profile_picture_travels_with_a_reloaded_checkpoint(hub, tmp_path):
    """A checkpoint folder holding the search's profile.png: its card shows it, and saving or
    pushing the reloaded model carries it along; a folder of another profile lends it nothing."""
    model = quantized_tiny()
    model.save_pretrained(tmp_path / "saved")
    assert "](profile.png)" not in (tmp_path / "saved" / "README.md").read_text()
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(32))
    (tmp_path / "saved" / "profile.png").write_bytes(png)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    reloaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "profile.png").read_bytes() == png
    assert "![Per-layer profile found by EvoPress](profile.png)" in (tmp_path / "again" / "README.md").read_text()
    reloaded.push_to_hub("me/tiny-evopress")
    (commit,) = hub.commits
    assert commit["files"]["profile.png"] == png and b"](profile.png)" in commit["files"]["README.md"]
    other = quantized_tiny(bits_of=lambda i: 4)  # another profile: the folder's picture is not its picture
    other.name_or_path = str(tmp_path / "saved")
    other.save_pretrained(tmp_path / "other")
    assert not (tmp_path / "other" / "profile.png").exists()


def test_card_metadata_names_the_base_model_and_its_relation(tmp_path):
    model = quantized_tiny()
    model.save_pretrained(tmp_path)
    meta = read_card_metadata(tmp_path)
    assert meta["base_model"] == "org/tiny-llama" and meta["base_model_relation"] == "quantized"
    results = meta["model-index"][0]["results"][0]
    assert {m["type"]: m["value"] for m in results["metrics"]} == {"perplexity": 11.5, "kl_divergence": 0.05}
