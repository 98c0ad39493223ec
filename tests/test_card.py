"""Model cards: licence inherited from the base model, base_model / base_model_relation, model-index
results, the profile picture, loading instructions (plugin, exports, lm-eval), the EvoPress
citation, export cards, and no local path in anything pushed (the Hub is intercepted)."""

import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from optimum_evo.card import (
    base_model_license, export_card, model_card, public_model_name, public_record, public_text_name, write_card,
)

ABSOLUTE = re.compile(r"""(?<![\w.:/-])(/(?:tmp|home|root|work|Users|var|private|mnt|data)/|[A-Za-z]:\\)""")


def record(compression="quantization", model="org/tiny-llama", **extra):
    profiles = {"quantization": {"modules": {"model.layers.0.mlp.down_proj": 2, "model.layers.0.mlp.up_proj": 4},
                                 "group_size": 32, "average_bits": 3.0},
                "depth": {"mode": "separate", "original_num_layers": 4, "removed_layers": [1], "dropped_attention": [],
                          "dropped_mlp": [2]},
                "sparsity": {"modules": {"model.layers.0.mlp.down_proj": 0.6}, "sparsity": 0.6}}
    rec = {"quant_method": "evopress", "format_version": 2, "compression": compression,
           "target": {"quantization": 3.0, "depth": 0.25, "sparsity": 0.6}[compression], "levels": [2, 3, 4],
           "dataset": "brown", "num_samples": 8, "seq_len": 64, "preset": "fast", "fitness": "topk",
           "profile": profiles[compression],
           "metrics": {"model": model, "search": {"fitness_kl": 0.25, "generations": 3},
                       "evaluation": {"text": "wikitext2", "windows": 4, "seq_len": 128,
                                      "dense": {"perplexity": 20.0, "kl": 0.0},
                                      "evopress": {"perplexity": 25.125, "kl": 0.3125}}}}
    rec.update(extra)
    return rec


def metadata(text: str) -> dict:
    return ModelCard(text).data.to_dict()


@pytest.mark.parametrize("compression, relation", [("quantization", "quantized"), ("depth", "pruned"),
                                                   ("sparsity", "pruned")])
def test_base_model_relation_follows_the_method(compression, relation):
    meta = metadata(model_card(record(compression), "me/tiny"))
    assert meta["base_model"] == "org/tiny-llama" and meta["base_model_relation"] == relation
    assert {"evopress", compression, relation} <= set(meta["tags"])


@pytest.mark.parametrize("model, hub_id, license_id", [("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
                                                       ("gemma3", "google/gemma-3-270m", "gemma")])
def test_embedded_models_give_their_hub_id_and_licence(model, hub_id, license_id):
    meta = metadata(model_card(record(model=model), "me/tiny"))
    assert meta["base_model"] == hub_id and meta["license"] == license_id
    assert base_model_license(model) == license_id


def test_licence_of_a_local_base_model_folder(tmp_path):
    base = tmp_path / "checkpoints" / "my-llama"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    (base / "README.md").write_text("---\nlicense: mit\n---\n# my llama\n")
    text = model_card(record(model=str(base)), "me/tiny")
    meta = metadata(text)
    assert meta["license"] == "mit" and "base_model" not in meta  # a folder name is not a Hub id
    assert "my-llama" in text and str(tmp_path) not in text


def test_licence_from_the_hub_cache_without_network(tmp_path, monkeypatch, hub):
    import huggingface_hub.constants

    snapshot = tmp_path / "models--org--llama-1b" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: llama3.2\n---\n")
    (tmp_path / "models--org--llama-1b" / "refs").mkdir()
    (tmp_path / "models--org--llama-1b" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert base_model_license("org/llama-1b") == "llama3.2"
    assert base_model_license("org/not-cached") is None  # unknown: no licence rather than a guess
    # a base model loaded from that cache folder is named by its Hub id
    assert public_model_name(str(snapshot)) == "org/llama-1b"
    assert metadata(model_card(record(model=str(snapshot)), "me/x"))["license"] == "llama3.2"


def test_model_index_holds_the_held_out_results():
    meta = metadata(model_card(record(), "me/tiny-evopress"))
    (entry,) = meta["model-index"]
    assert entry["name"] == "me/tiny-evopress"
    (result,) = entry["results"]
    assert result["dataset"]["type"] == "wikitext" and result["dataset"]["config"] == "wikitext-2-raw-v1"
    assert result["dataset"]["split"] == "test"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"perplexity": 25.125, "kl_divergence": 0.3125}
    with_lora = record()
    with_lora["metrics"]["evaluation"]["evopress+lora"] = {"perplexity": 22.5, "kl": 0.125}
    (entry,) = metadata(model_card(with_lora, "me/x", adapter=True))["model-index"]
    assert entry["results"][0]["metrics"][0]["value"] == 22.5  # the model as loaded with its correction
    assert "model-index" not in metadata(model_card({**record(), "metrics": {"model": "org/x"}}, "me/x"))


def test_card_sections_loading_exports_lm_eval_and_citation():
    text = model_card(record("quantization"), "me/tiny-evopress")
    for part in ('AutoModelForCausalLM.from_pretrained("me/tiny-evopress")', "import optimum_evo",
                 "randomly initialises", "lm_eval --model evopress --model_args pretrained=me/tiny-evopress",
                 "`lm_eval --model hf` evaluates random weights",
                 "optimum-evo export me/tiny-evopress --format gptq", "--format compressed-tensors", "--format dense",
                 "arXiv 2410.14649", "ICML 2025", "@inproceedings{sieberling2025evopress", "## Licence"):
        assert part in text, part
    depth = model_card(record("depth"), "me/tiny-depth")
    assert "--format dense" in depth and "--format gptq" not in depth  # only the formats that take the method


def test_profile_picture_is_saved_beside_the_card_and_shown(tmp_path):
    png = tmp_path / "search" / "profile.png"
    png.parent.mkdir()
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 16)
    folder = tmp_path / "model"
    folder.mkdir()
    write_card(folder, record(), "me/tiny", picture_from=png)
    assert (folder / "profile.png").read_bytes() == png.read_bytes()
    assert "![Per-layer profile found by EvoPress](profile.png)" in (folder / "README.md").read_text()
    write_card(tmp_path / "model", record(), "me/tiny")  # the picture already there stays shown
    assert "](profile.png)" in (folder / "README.md").read_text()
    assert "](profile.png)" not in model_card(record(), "me/tiny")


def test_export_card_says_it_loads_without_the_plugin():
    text = export_card(record("quantization"), "gptq", "me/tiny-gptq")
    meta = metadata(text)
    assert {"gptq", "evopress"} <= set(meta["tags"]) and meta["base_model"] == "org/tiny-llama"
    assert meta["base_model_relation"] == "quantized"
    assert "loads **without** optimum-evo" in text and "gptqmodel" in text
    assert "lm_eval --model hf --model_args pretrained=me/tiny-gptq" in text and "ICML 2025" in text
    gguf = export_card(record("quantization"), "gguf", "me/tiny-gguf")
    assert 'from_pretrained("me/tiny-gguf", gguf_file="model.gguf")' in gguf and "llama-cli -m model.gguf" in gguf
    assert "gguf" in metadata(gguf)["tags"]


def test_public_record_has_no_local_path(tmp_path):
    from optimum_evo.integrations.transformers import EvoPressConfig

    rec = record(model=str(tmp_path / "hub" / "models--org--base" / "snapshots" / "abc"),
                 dataset=str(tmp_path / "calib.txt"))
    rec["metrics"]["evaluation"]["text"] = str(tmp_path / "eval.txt")
    rec["metrics"]["lora_correction"] = {"method": "eora", "path": str(tmp_path / "model" / "lora-correction")}
    public = public_record(rec)
    dumped = json.dumps(public)
    assert str(tmp_path) not in dumped and not ABSOLUTE.search(dumped), dumped
    assert public["metrics"]["model"] == "org/base" and public["dataset"] == "<local file calib.txt>"
    assert public["metrics"]["evaluation"]["text"] == "<local file eval.txt>"
    assert "path" not in public["metrics"]["lora_correction"] and public["profile"] == rec["profile"]
    assert rec["dataset"] == str(tmp_path / "calib.txt")  # the input is not changed
    assert EvoPressConfig.from_dict(public).dataset is None  # a pushed record reloads
    assert public_text_name("brown") == "brown" and public_text_name("allenai/c4") == "allenai/c4"
    assert public_model_name("/somewhere/not/existing/my-model") == "my-model"


def test_pushed_config_and_card_hold_no_absolute_path(tmp_path, hub, one_thread):
    """A model compressed from a local folder, calibrated on a local file, with a LoRA correction:
    push_to_hub uploads a config, card and adapter config that name no local path, and they reload."""
    from test_hf_quantizer import CALIB, save_tiny, tiny_config
    from transformers import AutoModelForCausalLM

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIB))
    base = save_tiny(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=tiny_config(
        "sparsity", tmp_path, dataset=str(calib), lora_correction=4))
    assert model.config.quantization_config.metrics["model"] == str(base)  # the local record keeps the folder
    model.push_to_hub("me/tiny-sparse")
    (commit,) = hub.commits
    files = commit["files"]
    assert {"config.json", "README.md", "lora-correction/adapter_config.json"} <= set(files)
    for name, data in files.items():
        if Path(name).suffix in (".json", ".md", ".txt"):
            text = data.decode()
            assert str(tmp_path) not in text and not ABSOLUTE.search(text), (name, ABSOLUTE.search(text))
    pushed = json.loads(files["config.json"])["quantization_config"]
    assert pushed["metrics"]["model"] == "tiny" and pushed["dataset"] == "<local file calib.txt>"
    assert json.loads(files["lora-correction/adapter_config.json"])["base_model_name_or_path"] == "me/tiny-sparse"
    card = files["README.md"].decode()
    assert "me/tiny-sparse" in card and "lora-correction" in card
    for name, data in files.items():
        (tmp_path / "pushed" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pushed" / name).write_bytes(data)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pushed")
    assert reloaded.config.quantization_config.profile == model.config.quantization_config.profile
