"""GGUF tensor types as search levels: every type's bytes read back by the gguf package exactly as
we decode them, GPTQ on the types' grids, the replacement types of rows K-quants cannot hold, and a
whole ``compression="gguf"`` run: its checkpoint, its reload, and its GGUF file read by transformers
and llama.cpp with the same bytes."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("gguf")

from conftest import save_tiny_llama  # noqa: E402

from optimum_evo import SearchArguments  # noqa: E402
from optimum_evo.compressors.ggml_types import (TYPES, dequantize, gptq_types, pack, stored_type,  # noqa: E402
                                                type_bytes)
from optimum_evo.compressors.gguf_linear import EvoPressGGUFLinear  # noqa: E402


def problem(cols=512, rows=16, seed=0):
    """A weight with outliers and a correlated Hessian (so GPTQ has errors to spread)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, 7], w[3, cols - 200] = 0.7, -0.5
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(4 * cols, cols, generator=g) @ mix
    return w, x.t() @ x / x.shape[0]


def h_error(w, q, H):
    d = q - w
    return float(((d @ H) * d).sum() / ((w @ H) * w).sum())


@pytest.mark.parametrize("qtype", sorted(TYPES))
def test_every_type_packs_exactly_what_the_gguf_package_reads(qtype):
    w, H = problem()
    q = gptq_types(w, H, [qtype])[0]
    t = TYPES[qtype]
    assert int(q.codes.max()) < len(t.values)
    data = pack(q)
    assert data.dtype == torch.uint8 and tuple(data.shape) == (16, 512 // t.block * t.type_size)
    assert torch.equal(dequantize(data, qtype, w.shape), q.dequantize())  # bit for bit, gguf-py's decoder
    assert h_error(w, q.dequantize(), H) < 0.2


def test_errors_fall_with_the_bits_and_gptq_beats_rounding_on_the_same_grid():
    w, H = problem()
    names = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    errors = [h_error(w, q.dequantize(), H) for q in gptq_types(w, H, names)]
    assert errors == sorted(errors, reverse=True), dict(zip(names, errors))
    legacy = [h_error(w, q.dequantize(), H) for q in gptq_types(w, H, ["Q4_0", "Q5_0", "Q8_0"])]
    assert legacy == sorted(legacy, reverse=True)
    # IQ4_NL's non-uniform grid beats Q4_0's uniform one at the same 4.5 bits per weight
    iq4, q40 = (h_error(w, q.dequantize(), H) for q in gptq_types(w, H, ["IQ4_NL", "Q4_0"]))
    assert iq4 < q40
    for name in ("Q3_K", "Q4_K", "IQ4_NL"):  # the Hessian's compensation against plain rounding
        gptq = gptq_types(w, H, [name])[0].dequantize()
        rounded = gptq_types(w, torch.eye(w.shape[1]), [name])[0].dequantize()
        assert h_error(w, gptq, H) < 0.9 * h_error(w, rounded, H), name


def test_fitting_each_blocks_grid_lowers_the_error_of_the_min_max_grids():
    w, H = problem()
    for name in ("Q2_K", "Q3_K", "IQ4_NL", "Q4_K", "Q6_K"):
        fitted = gptq_types(w, H, [name])[0].dequantize()
        min_max = gptq_types(w, H, [name], fit_iters=0)[0].dequantize()
        assert h_error(w, fitted, H) < h_error(w, min_max, H), name


def llamacpp_quantize(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """``w`` quantized by llama.cpp's own quantizer (``ggml_quantize_chunk`` of the libggml that
    llama-cpp-python ships, no importance matrix) and decoded by gguf-py."""
    import ctypes
    from pathlib import Path

    import gguf
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp")
    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    if not libs:
        pytest.skip("llama-cpp-python ships no libggml-base")
    lib = ctypes.CDLL(str(libs[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    qt = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    src = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    dst = np.zeros((w.shape[0], w.shape[1] // block * size), dtype=np.uint8)
    assert lib.ggml_quantize_chunk(int(qt), src.ctypes.data, dst.ctypes.data, 0, w.shape[0], w.shape[1], None) == dst.size
    return torch.from_numpy(gguf.quants.dequantize(dst, qt).copy()).float()


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "IQ4_NL", "Q4_K", "Q6_K"])
def test_the_grid_search_finds_again_a_tensor_llamacpp_quantized(qtype):
    """A checkpoint dequantized from a GGUF file lies on its types' grids: re-quantizing it in the
    same type must be lossless, as llama.cpp's own quantizer is (the min-max start alone is not)."""
    w, H = problem(rows=32)
    source = llamacpp_quantize(w, qtype)
    found = gptq_types(source, H, [qtype])[0].dequantize()
    min_max = gptq_types(source, H, [qtype], fit_iters=0)[0].dequantize()
    exact_rows = ((found - source).abs().amax(1) <= 1e-6 * source.abs().amax(1)).float().mean()
    assert exact_rows >= 0.95, (qtype, float(exact_rows))
    assert h_error(source, found, H) < 0.1 * h_error(source, min_max, H)  # the min-max start alone


def test_one_sweep_equals_separate_sweeps_and_row_groups_use_their_own_hessian():
    w, H = problem(cols=256, rows=8)
    together = gptq_types(w, H, ["Q3_K", "IQ4_NL"])
    alone = [gptq_types(w, H, [n])[0] for n in ("Q3_K", "IQ4_NL")]
    for a, b in zip(together, alone):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.a, b.a)
    stack = torch.stack([H, torch.eye(256)])  # rows 0-3 with H, rows 4-7 with the identity
    split = gptq_types(w, stack, ["Q4_K"])[0]
    assert torch.equal(split.codes[:4], gptq_types(w[:4], H, ["Q4_K"])[0].codes)
    assert torch.equal(split.codes[4:], gptq_types(w[4:], torch.eye(256), ["Q4_K"])[0].codes)


def test_rows_k_quants_cannot_hold_take_the_replacement_types():
    assert [stored_type(n, 576) for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")] == \
        ["IQ4_NL", "IQ4_NL", "Q5_0", "Q5_1", "Q8_0", "Q8_0"]
    assert stored_type("Q3_K", 1536) == "Q3_K"
    assert type_bytes("Q4_K", (10, 512)) == 10 * 2 * 144 and type_bytes("Q4_K", (10, 576)) == 10 * 18 * 22
    with pytest.raises(ValueError, match="multiple of 32"):
        stored_type("Q4_0", 100)
    with pytest.raises(ValueError, match="Unknown GGUF type"):
        stored_type("Q9_K", 256)
    with pytest.raises(ValueError, match="multiple of 256"):
        EvoPressGGUFLinear(576, 8, "Q4_K")
    with pytest.raises(ValueError, match="multiple of 256"):
        gptq_types(torch.randn(4, 576), torch.eye(576), ["Q4_K"])


def test_the_layer_computes_with_the_decoded_weight_and_survives_dtype_moves():
    w, H = problem(cols=256, rows=8)
    bias = torch.randn(8)
    layer = EvoPressGGUFLinear.from_gguf_weight(gptq_types(w, H, ["Q5_K"])[0], bias=bias)
    x = torch.randn(3, 256)
    expected = x @ layer.dequantize_weight().t() + bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert layer.storage_bytes() == 8 * 176 + 8 * 4
    layer.to(torch.bfloat16)
    assert layer.qweight.dtype == torch.uint8 and layer(x.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(layer.to_linear(torch.float32).weight, layer.dequantize_weight(torch.float32))


@pytest.mark.parametrize("settings, message", [
    (dict(compression="gguf"), "size budget: give target_size"),
    (dict(compression="gguf", target_size="1MB", gguf_types=["Q4_K", "Q9_K"]), "distinct GGUF types"),
    (dict(compression="gguf", target_speedup=1.5), "target_size only"),
])
def test_bad_gguf_settings_fail_early(settings, message):
    with pytest.raises(ValueError, match=message):
        SearchArguments(**settings)


# --------------------------------------------------------------------------- a whole run
@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """A tiny llama whose 256 / 512 input features hold K-quants, with SmolLM2's tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-gguf"), 256, 512, 3, scale=3.0)


def test_gguf_search_saves_reloads_and_exports_the_bytes_it_scored(wide_dir, tmp_path):
    import numpy as np
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import optimum_evo
    from optimum_evo.exporters import ExportError, export
    from optimum_evo.exporters.from_result import compressed_model_from_result

    dense_bytes = (wide_dir / "model.safetensors").stat().st_size
    linears = 3 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512)
    budget = dense_bytes - 4 * linears + linears * 4 // 8  # the linears at 4 bits per weight on average
    out = tmp_path / "out"
    proc = subprocess.run([str(a) for a in (sys.executable, "-m", "optimum_evo", "search", "--model", wide_dir, "--compression", "gguf",
                           "--target-size", budget, "--generations", 4, "--offspring", 4, "--num-samples", 6,
                           "--seq-len", 32, "--eval-windows", 2, "--eval-seq-len", 32, "--dataset",
                           wide_dir.parent / "calib.txt", "--search-dtype", "float32", "--quiet", "--top-k", 64,
                           "--output", out, "--database-dir", tmp_path / "db", "--export", "gguf")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "result.json").read_text())
    assert report["compression"] == "gguf"
    types = report["saved_model"]["types"]
    assert len(types) == 21 and set(types.values()) <= set(TYPES)
    assert any(t.endswith("_K") for t in types.values()), "256-wide rows take K-quants"
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert stored == report["profile"]["size_bytes"] == report["saved_model"]["size_bytes"] <= budget
    assert budget - stored < 256 * 256 * 2 // 8, "the budget is used: no linear could go one type up"
    expected_bits = 8 * sum(type_bytes(t, _shape(n)) for n, t in types.items()) / linears
    assert report["saved_model"]["bits_per_weight"] == pytest.approx(expected_bits, abs=1e-4)

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert optimum_evo.check_evopress_model(reloaded).compression == "gguf"
    layer = reloaded.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(layer, EvoPressGGUFLinear) and layer.qtype == types["model.layers.1.mlp.down_proj"]
    rebuilt, _ = compressed_model_from_result(report)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = reloaded(ids).logits
        assert torch.equal(ours, rebuilt(ids).logits)

    # the GGUF file holds the layers' own bytes in their own types
    import gguf

    reader = gguf.GGUFReader(str(out / "export-gguf" / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    for i in range(3):
        for hf, name in (("mlp.down_proj", "ffn_down"), ("self_attn.v_proj", "attn_v")):
            module = reloaded.get_submodule(f"model.layers.{i}.{hf}")
            t = tensors[f"blk.{i}.{name}.weight"]
            assert t.tensor_type.name == module.qtype
            assert np.array_equal(np.asarray(t.data).reshape(module.qweight.shape), module.qweight.numpy())
    plain = AutoModelForCausalLM.from_pretrained(out / "export-gguf", gguf_file="model.gguf", dtype=torch.float32)
    with torch.inference_mode():
        assert (plain(ids).logits - ours).abs().max() < 2e-2 * ours.abs().max()  # token embedding in F16
    with pytest.raises(ExportError, match="GGUF tensor types"):
        export(reloaded, tmp_path / "gptq", "gptq")

    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out / "export-gguf" / "model.gguf"), n_ctx=64, logits_all=True, n_threads=1,
                          verbose=False)
    llm.eval(ids[0].tolist())
    theirs = torch.log_softmax(torch.from_numpy(np.asarray(llm.scores[:16], dtype=np.float32)), -1)
    mine = torch.log_softmax(ours[0], -1)
    assert float((mine.exp() * (mine - theirs)).sum(-1).mean()) < 2e-3


def _shape(name: str) -> tuple:
    """Shape of a linear of the wide tiny llama (hidden 256, 2 key/value heads of 64, MLP 512)."""
    if name.endswith(("k_proj", "v_proj")):
        return (128, 256)
    if name.endswith(("gate_proj", "up_proj")):
        return (512, 256)
    if name.endswith("down_proj"):
        return (256, 512)
    return (256, 256)


def test_formats_that_cannot_hold_gguf_types_refuse_the_method_by_name():
    from optimum_evo.exporters import get_exporter
    from optimum_evo.methods import get_method

    for fmt in ("gptq", "compressed-tensors"):
        message = get_exporter(fmt).refusal(get_method("gguf"))
        assert message.startswith(f"--export {fmt} cannot hold gguf results") and "--export gguf" in message
        assert get_exporter(fmt).refusal(get_method("depth+gguf")) == message.replace("gguf results",
                                                                                      "depth+gguf results")
        assert "--compression gguf" not in get_exporter(fmt).refusal(get_method("depth"))
    assert get_exporter("gguf").refusal(get_method("depth+gguf")) is None


def test_the_dequantized_cache_keeps_the_decoded_weight_of_gguf_layers():
    from optimum_evo.compressors import set_dequantized_cache

    w, H = problem(cols=256, rows=8)
    model = torch.nn.Sequential(EvoPressGGUFLinear.from_gguf_weight(gptq_types(w, H, ["Q3_K"])[0]))
    assert set_dequantized_cache(model) == 1
    x = torch.randn(2, 256)
    first = model(x)
    assert model[0]._cache is not None and torch.equal(model(x), first)
    set_dequantized_cache(model, False)
    assert model[0]._cache is None and torch.equal(model(x), first)
