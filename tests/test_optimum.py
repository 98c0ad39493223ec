"""Optimum integration: EvoPressQuantizer (OptimumQuantizer) and the `optimum-cli evopress` command
registered through the optimum/commands/register namespace."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from optimum.quantization_base import OptimumQuantizer
from test_hf_quantizer import CALIB, logits, save_tiny
from transformers import AutoModelForCausalLM

from optimum_evo import EvoPressQuantLinear
from optimum_evo.exporters import dequantize_gptq_checkpoint
from optimum_evo.integrations.optimum import EvoPressQuantizer

OPTIMUM_CLI = Path(sys.executable).parent / "optimum-cli"
TINY = dict(dataset=CALIB, generations=2, offspring=4, num_samples=4, seq_len=32, eval_windows=0, top_k=32,
            search_dtype="float32", progress=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama-optimum"))


def test_quantizer_is_an_optimum_quantizer_and_checks_its_arguments(tiny_dir, tmp_path):
    quantizer = EvoPressQuantizer.from_pretrained(tiny_dir)
    assert isinstance(quantizer, OptimumQuantizer) and quantizer.model is None
    with pytest.raises(ValueError, match="file_name must be None"):
        EvoPressQuantizer.from_pretrained(tiny_dir, file_name="model.onnx")
    with pytest.raises(TypeError, match="model_or_path must be"):
        EvoPressQuantizer.from_pretrained(42)
    with pytest.raises(ValueError, match="export_format must be one of"):
        quantizer.quantize(tmp_path, export_format="onnx")
    with pytest.raises(ValueError, match="file_prefix must be None"):
        quantizer.quantize(tmp_path, file_prefix="model")
    with pytest.raises(ValueError, match="Unknown compression 'pruning'"):
        quantizer.quantize(tmp_path, compression="pruning")


def test_quantize_from_path_exports_gptq(tiny_dir, tmp_path):
    quantizer = EvoPressQuantizer.from_pretrained(tiny_dir)
    model = quantizer.quantize(tmp_path / "gptq", compression="quantization", target=3.0, levels=[2, 3, 4],
                               group_size=32, database_dir=str(tmp_path / "db"), export_format="gptq", **TINY)
    assert isinstance(model.model.layers[0].self_attn.q_proj, EvoPressQuantLinear)
    profile = model.config.quantization_config.profile
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq"
    for name, bits in profile["modules"].items():
        override = (qc.get("dynamic") or {}).get("+:^" + name.replace(".", r"\.") + "$", {})  # none if uniform
        assert override.get("bits", qc["bits"]) == bits
    assert (tmp_path / "gptq" / "tokenizer.json").exists()
    ref = logits(model)  # the export keeps embeddings / norms in float16 (GPTQ's convention)
    assert float((logits(dequantize_gptq_checkpoint(tmp_path / "gptq")) - ref).abs().max()) < 0.01 * float(ref.abs().max())


def test_quantize_a_loaded_model_in_place_saves_evopress_format(tiny_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    quantizer = EvoPressQuantizer.from_pretrained(model)
    out = quantizer.quantize(tmp_path / "evopress", compression="depth", target=0.25, **TINY)
    assert out is model and model.config.quantization_config.profile["original_num_layers"] == 4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "evopress")
    assert reloaded.config.quantization_config.quant_method == "evopress"
    assert torch.equal(logits(reloaded), logits(model))
    assert (tmp_path / "evopress" / "README.md").exists()


def _cli(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(OPTIMUM_CLI), *args], capture_output=True, text=True, timeout=timeout, cwd="/",
                          env=env)


@pytest.mark.skipif(not OPTIMUM_CLI.exists(), reason="optimum-cli not installed in this environment")
def test_optimum_cli_registers_evopress_with_the_search_options():
    root = _cli("--help")
    assert root.returncode == 0 and "evopress" in root.stdout
    run = _cli("evopress", "--help")
    assert run.returncode == 0, run.stderr
    from optimum_evo.cli import build_parser

    search = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("search"))
    options = {o for action in search._actions for o in action.option_strings}
    assert options and all(o in run.stdout for o in options)
    # no __init__.py in the namespace folder (PEP 420: it is shared with optimum and other subpackages)
    import optimum.commands.register as register

    assert not any((Path(p) / "__init__.py").exists() for p in register.__path__)


@pytest.mark.skipif(not OPTIMUM_CLI.exists(), reason="optimum-cli not installed in this environment")
def test_optimum_cli_evopress_runs_a_tiny_search_and_exports(tiny_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIB))
    run = _cli("evopress", "--model", str(tiny_dir), "--compression", "depth", "--target", "0.25",
               "--output", str(tmp_path / "out"), "--dataset", str(calib), "--generations", "2",
               "--offspring", "4", "--num-samples", "4", "--seq-len", "32", "--eval-windows", "2",
               "--eval-seq-len", "32", "--top-k", "32", "--search-dtype", "float32", "--quiet", "--export", "dense")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Exported dense" in run.stdout
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "export-dense", dtype=torch.float32)
    evopress = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model", dtype=torch.float32)
    assert result["compression"] == "depth" and evopress.config.quantization_config.quant_method == "evopress"
    assert "quantization_config" not in json.loads((tmp_path / "out" / "export-dense" / "config.json").read_text())
    # the plugin-free export computes what the EvoPress model computes (dropped sub-blocks as zeros)
    assert torch.allclose(logits(plain), logits(evopress), atol=1e-5)
    assert plain.config.num_hidden_layers == 4 - len(result["saved_model"]["removed_layers"])
    bad = _cli("evopress", "--model", str(tiny_dir), "--compression", "depth", "--output", str(tmp_path / "x"),
               "--export", "gptq")
    assert bad.returncode == 2 and "needs --compression quantization" in bad.stderr
