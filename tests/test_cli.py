"""Command line: clear early errors, outputs, and kill-and-resume giving the uninterrupted result."""

import json
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

from optimum_evo.cli import main
from optimum_evo.embedded_models import embedded_model_path

CALIB = ("The committee met on Tuesday to discuss the new budget for the school district. " * 40 + "\n") * 20


@pytest.fixture(scope="module")
def tokenizer_dir():
    return embedded_model_path("smollm2")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.mul_(6.0)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "calib.txt"
    f.write_text(CALIB)
    return f


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "optimum_evo", *map(str, args)], capture_output=True, text=True)


def assert_saved_model_reloads_as_found(out):
    """``OUTPUT/model`` is an EvoPress checkpoint: it reloads (with the plugin) into exactly the model
    the search found, rebuilt independently from result.json (base model + candidate + database)."""
    import optimum_evo
    from transformers import AutoModelForCausalLM

    from optimum_evo.exporters.from_result import compressed_model_from_result

    report = json.loads((out / "result.json").read_text())
    assert report["saved_model"]["format"] == "evopress"
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    qc = optimum_evo.check_evopress_model(reloaded)
    assert qc is not None and qc.compression == report["compression"] and qc.metrics["profile"] == report["profile"]
    rebuilt, _ = compressed_model_from_result(report)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, rebuilt(ids).logits)
    assert (out / "model" / "README.md").exists()


def small_args(model, out, calib, generations=30):
    return ["search", "--model", model, "--target", "0.34", "--output", out, "--generations", generations,
            "--offspring", 4, "--num-samples", 8, "--seq-len", 32, "--eval-windows", 2, "--eval-seq-len", 32,
            "--dataset", calib, "--search-dtype", "float32", "--quiet", "--top-k", 64]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "/nonexistent/model-dir"], "not an existing local directory"),
        (["--target", "1.5"], "target must be a fraction"),
        (["--target", "0"], "target must be a fraction"),
        (["--compression", "pruning"], "Unknown compression"),
        (["--compression", "quantization", "--target", "12"], "average bit width"),
        (["--compression", "sparsity", "--target", "1.2"], "fraction"),
        (["--dataset", "wikitext2"], "evaluation text"),
        (["--preset", "turbo"], "Unknown preset"),
    ],
)
def test_bad_input_fails_early_and_clearly(tmp_path, capsys, extra, message):
    start = time.perf_counter()
    rc = main(["search", "--output", str(tmp_path / "out"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert time.perf_counter() - start < 10


def test_empty_calibration_file(tmp_path, capsys, tiny_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["search", "--model", str(tiny_dir), "--dataset", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_model_without_decoder_layers(tmp_path, capsys, tokenizer_dir, calib_file):
    path = tmp_path / "mamba"
    MambaForCausalLM(MambaConfig(vocab_size=49152, hidden_size=16, num_hidden_layers=2, state_size=4)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    rc = main(["search", "--model", str(path), "--dataset", str(calib_file), "--output", str(tmp_path / "o"),
               "--eval-windows", "1", "--seq-len", "32"])
    assert rc == 2
    assert "no recognisable decoder layers" in capsys.readouterr().err


def test_search_outputs(tmp_path, tiny_dir, calib_file):
    out = tmp_path / "out"
    proc = run_cli(*small_args(tiny_dir, out, calib_file, generations=3), "--compare-baselines",
                   "--random-candidates", 3)
    assert proc.returncode == 0, proc.stderr
    assert "evopress" in proc.stdout and "shortgpt" in proc.stdout and "sliding_cosine" in proc.stdout
    report = json.loads((out / "result.json").read_text())
    assert report["search"]["generations"] == 3 and len(report["search"]["history"]) == 3
    assert set(report["results"]) == {"dense", "evopress", "shortgpt", "sliding_cosine", "shortgpt_blocks",
                                      "sliding_cosine_blocks", "random_best_of_3"}
    assert report["profile"]["dropped_sub_blocks"] == 4
    # elitist: a generation keeps its parent unless a child scores lower on the same tokens
    for h in report["search"]["history"]:
        assert h["best_fitness"] <= h["previous_parent_fitness"]
        assert (h["best_fitness"] < h["previous_parent_fitness"]) == h["parent_changed"]
    for png in ("profile.png", "fitness.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()
    assert_saved_model_reloads_as_found(out)


@pytest.mark.parametrize("kind, extra, check", [
    ("quantization", ["--target", "2.5", "--levels", "2,3,4", "--group-size", "32"],
     lambda r: r["average_bits"] == pytest.approx(2.5)),
    ("sparsity", ["--target", "0.6", "--max-offset", "2"], lambda r: r["sparsity"] == pytest.approx(0.6, abs=1e-4)),
])
def test_layerwise_search_builds_then_reuses_database(tmp_path, tiny_dir, calib_file, kind, extra, check):
    db = tmp_path / "db"
    common = ["search", "--model", tiny_dir, "--compression", kind, *extra, "--generations", 2, "--offspring", 3,
              "--num-samples", 6, "--seq-len", 32, "--eval-windows", 2, "--eval-seq-len", 32, "--dataset",
              calib_file, "--search-dtype", "float32", "--quiet", "--top-k", 64, "--database-dir", db]
    first = run_cli(*common, "--output", tmp_path / "a", "--compare-baselines", "--random-candidates", 2)
    assert first.returncode == 0, first.stderr
    report = json.loads((tmp_path / "a" / "result.json").read_text())
    expected = {"dense", "evopress", "uniform", "dp", "random_best_of_2"} | ({"owl"} if kind == "sparsity" else set())
    assert set(report["results"]) == expected
    for name in expected - {"dense"}:
        assert check(report["results"][name]), name
    assert all(v < 2 for v in report["database"]["bytes_per_weight"].values())
    if kind == "quantization":  # fused groups by default: one width for q/k/v and for gate/up of every layer
        levels = report["levels"]
        for layer in {n.split(".layers.")[1].split(".")[0] for n in levels}:
            prefix = f"model.layers.{layer}."
            assert len({levels[prefix + f"self_attn.{p}_proj"] for p in "qkv"}) == 1
            assert len({levels[prefix + f"mlp.{p}_proj"] for p in ("gate", "up")}) == 1
        assert report["arguments"]["fused_groups"] is True
    assert_saved_model_reloads_as_found(tmp_path / "a")
    manifest = (db / "manifest.json").stat().st_mtime_ns
    second = run_cli(*common, "--output", tmp_path / "b")
    assert second.returncode == 0, second.stderr
    assert (db / "manifest.json").stat().st_mtime_ns == manifest, "the database must be reused, not rebuilt"
    assert json.loads((tmp_path / "b" / "result.json").read_text())["timings"]["database_seconds"] < 5
