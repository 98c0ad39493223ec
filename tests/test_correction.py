"""LoRA error correction: closed form, PEFT round trip, merging, distillation (tiny random models)."""

import copy
import json

import pytest
import torch
from conftest import tiny_model
from torch import nn

from optimum_evo.compressors.calibrate import linear_modules
from optimum_evo.compressors.obs import magnitude_prune
from optimum_evo.compressors.grid import dequantize_codes, find_params, quantize_codes
from optimum_evo.correction import (
    MergeRefusedError, attach_adapters, closed_form_adapters, correct, extract_adapters, low_rank_correction,
    merge_correction, read_metadata, resolve_ranks, save_correction, select_inputs,
)
from optimum_evo.correction.eora import compressed_weight
from optimum_evo.decoder import find_decoder_layout


pytestmark = pytest.mark.usefixtures("one_thread")


def _windows(n=6, t=32, vocab=128, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _compress(model, kind):
    """Sparsify (magnitude, 70%) or RTN-quantize (2 bits, per row) every decoder linear in place."""
    layout = find_decoder_layout(model)
    with torch.no_grad():
        for layer in layout.layers:
            for m in linear_modules(layer).values():
                if kind == "sparsity":
                    m.weight.copy_(magnitude_prune(m.weight, 0.7))
                else:
                    scale, zero = find_params(m.weight.float(), 2)
                    m.weight.copy_(dequantize_codes(quantize_codes(m.weight.float(), scale, zero, 2), scale, zero))
    return model


def _pair(kind, arch="llama"):
    dense = tiny_model(arch)
    return dense, _compress(copy.deepcopy(dense), kind)


def _layer_inputs(model, windows, name):
    xs = []
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: xs.append(a[0].detach()))
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None])
    h.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])


def _kl(dense, model, windows):
    with torch.no_grad():
        p = torch.log_softmax(dense(input_ids=windows).logits, -1)
        q = torch.log_softmax(model(input_ids=windows).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_low_rank_correction_is_exact_at_full_rank_and_optimal_in_weighted_norm():
    torch.manual_seed(0)
    D = torch.randn(12, 10)
    X = torch.randn(200, 10) * torch.linspace(0.1, 3, 10)  # anisotropic inputs
    H = X.t() @ X
    full = low_rank_correction(D, H, rank=10)
    assert torch.allclose(full.delta(), D, atol=1e-4)
    eora, svd = low_rank_correction(D, H, rank=3, method="eora"), low_rank_correction(D, H, rank=3, method="svd")
    assert eora.A.shape == (3, 10) and eora.B.shape == (12, 3)

    def out_err(ad):
        return float((X @ (D - ad.delta()).t()).norm())

    # EoRA minimises the output error; plain SVD minimises the weight error
    assert out_err(eora) < out_err(svd)
    assert float((D - svd.delta()).norm()) <= float((D - eora.delta()).norm()) + 1e-6
    with pytest.raises(ValueError, match="needs the input statistics"):
        low_rank_correction(D, None, 3, "eora")
    with pytest.raises(ValueError, match="method"):
        low_rank_correction(D, H, 3, "pca")


def test_param_budget_allocates_ranks_where_error_is():
    dense, comp = _pair("quantization")
    with torch.no_grad():  # layer 0 stays nearly dense: its residual is tiny
        for n, m in linear_modules(comp.model.layers[0]).items():
            m.weight.copy_(linear_modules(dense.model.layers[0])[n].weight + 1e-4)
    calib = _windows(n=3)
    full = closed_form_adapters(comp, dense, calib, rank=8, progress=False)
    budget = 3000
    ads = closed_form_adapters(comp, dense, calib, rank=8, param_budget=budget, progress=False)
    used = sum(a.A.numel() + a.B.numel() for a in ads.values())
    assert budget - 2 * 96 < used <= budget
    assert all(a.rank <= 8 for a in ads.values()) and len({a.rank for a in ads.values()}) > 1
    assert not any(".layers.0." in n for n in ads)  # nothing spent on the almost-exact layer
    for n, a in ads.items():  # truncation of the same components
        assert torch.allclose(a.A, full[n].A[: a.rank])
    # the allocation removes more (relative) error than a uniform rank of the same size
    uniform_rank = budget // sum(a.A.shape[1] + a.B.shape[0] for a in full.values())
    gain = sum(float(a.gains.sum()) for a in ads.values())
    assert gain > sum(float(a.gains[:uniform_rank].sum()) for a in full.values())
    # compressed inputs: the same ranks (taken from the dense-input allocation), refitted on the walk
    seq = closed_form_adapters(comp, dense, calib, rank=8, param_budget=budget, inputs="compressed", progress=False)
    assert {n: a.rank for n, a in seq.items()} == {n: a.rank for n, a in ads.items()}
    reused = closed_form_adapters(comp, dense, calib, rank=8, param_budget=budget, inputs="compressed",
                                  dense_allocation=ads, progress=False)  # the allocation handed in, not recomputed
    assert all(torch.equal(reused[n].delta(), seq[n].delta()) for n in seq) and reused.keys() == seq.keys()


def test_resolve_ranks_uses_peft_pattern_semantics():
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"]
    r = resolve_ranks(names, 4, {r"layers\.1\.mlp\.down_proj": 16, "k_proj": 0})
    assert r == {names[0]: 4, names[1]: 16, names[2]: 0}
    with pytest.raises(ValueError):
        resolve_ranks(names, -1)


@pytest.mark.parametrize("kind", ["sparsity", "quantization"])
@pytest.mark.parametrize("inputs", ["dense", "compressed"])
def test_closed_form_reduces_layer_and_model_error(kind, inputs):
    dense, comp = _pair(kind)
    calib = _windows()
    ads = closed_form_adapters(comp, dense, calib, rank=8, inputs=inputs, progress=False)
    layout = find_decoder_layout(comp)
    assert len(ads) == 7 * len(layout)
    if inputs == "dense":  # each layer's own output error on dense inputs drops
        name = f"{layout.path}.2.mlp.down_proj"
        x = _layer_inputs(dense, calib, name)
        W, Wc = dense.get_submodule(name).weight.detach(), compressed_weight(comp.get_submodule(name))
        before = float((x @ (W - Wc).t()).norm())
        after = float((x @ (W - Wc - ads[name].delta()).t()).norm())
        assert after < 0.9 * before
    kl_before = _kl(dense, comp, calib)
    peft_model = attach_adapters(comp, ads)
    assert _kl(dense, peft_model, calib) < 0.8 * kl_before


def test_attached_peft_model_computes_compressed_plus_low_rank():
    dense, comp = _pair("quantization")
    calib = _windows(n=3)
    ads = closed_form_adapters(comp, dense, calib, rank=4, rank_pattern={"down_proj": 8, "k_proj": 0},
                               method="svd", progress=False)
    assert all(a.rank == 8 for n, a in ads.items() if n.endswith("down_proj"))
    assert not any(n.endswith("k_proj") for n in ads)
    reference = copy.deepcopy(comp)
    with torch.no_grad():
        for n, a in ads.items():
            reference.get_submodule(n).weight += a.delta()
    peft_model = attach_adapters(comp, ads)
    with torch.no_grad():
        got = peft_model(input_ids=calib).logits
        want = reference(input_ids=calib).logits
    assert torch.allclose(got, want, atol=1e-4)
    back = extract_adapters(peft_model)
    assert set(back) == set(ads)
    assert torch.allclose(back[next(iter(ads))].delta(), ads[next(iter(ads))].delta(), atol=1e-6)


def test_save_and_reload_round_trip(tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    dense, comp = _pair("sparsity")
    calib = _windows(n=3)
    comp.save_pretrained(tmp_path / "model")
    peft_model = attach_adapters(comp, closed_form_adapters(comp, dense, calib, rank=4,
                                                            rank_pattern={"down_proj": 8}, progress=False))
    folder = save_correction(peft_model, tmp_path / "model", dtype=None, metadata={"method": "eora"})
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((tmp_path / "model").resolve())
    assert read_metadata(folder)["method"] == "eora"
    with torch.no_grad():
        want = peft_model(input_ids=calib).logits
        a = AutoPeftModelForCausalLM.from_pretrained(str(folder))(input_ids=calib).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
        plain = base(input_ids=calib).logits  # the model folder alone loads the compressed model
        b = PeftModel.from_pretrained(base, str(folder))(input_ids=calib).logits
        c = AutoModelForCausalLM.from_pretrained(str(folder))(input_ids=calib).logits  # transformers integration
    for got in (a, b, c):
        assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)
    with pytest.raises(FileNotFoundError, match="config.json"):
        save_correction(peft_model, tmp_path / "nowhere")


def test_float16_storage_halves_the_adapter(tmp_path):
    dense, comp = _pair("sparsity")
    comp.save_pretrained(tmp_path / "model")
    peft_model = attach_adapters(comp, closed_form_adapters(comp, dense, _windows(n=2), rank=4, progress=False))
    f16 = save_correction(peft_model, tmp_path / "model", subfolder="a16")
    f32 = save_correction(peft_model, tmp_path / "model", subfolder="a32", dtype=None)
    from safetensors.torch import load_file

    t16, t32 = load_file(str(f16 / "adapter_model.safetensors")), load_file(str(f32 / "adapter_model.safetensors"))
    assert t16.keys() == t32.keys() and {t.dtype for t in t16.values()} == {torch.float16}
    assert sum(t.nbytes for t in t16.values()) * 2 == sum(t.nbytes for t in t32.values())
    assert read_metadata(f16)["adapter_bytes"] < read_metadata(f32)["adapter_bytes"]
    assert peft_model.get_base_model().model.layers[0].mlp.down_proj.lora_A["default"].weight.dtype == torch.float32


def test_merge_keeps_exact_sparsity_and_refuses_quantized():
    dense, comp = _pair("sparsity")
    calib = _windows(n=3)
    masks = {n: m.weight == 0 for n, m in comp.named_modules() if isinstance(m, nn.Linear) and "layers" in n}
    peft_model = attach_adapters(comp, closed_form_adapters(comp, dense, calib, rank=4, progress=False))
    kinds = {n: "sparsity" for n in masks}
    merged = merge_correction(peft_model, kinds=kinds)
    assert not any("lora" in n for n, _ in merged.named_modules())
    for n, mask in masks.items():
        w = merged.get_submodule(n).weight
        assert torch.equal(w == 0, mask), n
    # the merged model is still closer to the dense one than the uncorrected compressed model
    assert _kl(dense, merged, calib) < _kl(dense, _compress(copy.deepcopy(dense), "sparsity"), calib)

    dense, comp = _pair("quantization")
    peft_model = attach_adapters(comp, closed_form_adapters(comp, dense, calib, rank=4, progress=False))
    with pytest.raises(MergeRefusedError, match="quantization grid"):
        merge_correction(peft_model)
    expected = {}
    with torch.no_grad():
        for n, a in extract_adapters(peft_model).items():
            expected[n] = peft_model.get_base_model().get_submodule(n).get_base_layer().weight + a.delta()
    merged = merge_correction(peft_model, allow_dense=True)
    n = next(iter(expected))
    assert torch.allclose(merged.get_submodule(n).weight, expected[n], atol=1e-5)


def test_merge_rules_come_from_the_evopress_record():
    dense, comp = _pair("sparsity")
    modules = {n: 0.7 for n, m in comp.named_modules() if isinstance(m, nn.Linear) and "layers" in n}
    comp.config.quantization_config = {"quant_method": "evopress", "compression": "sparsity",
                                       "profile": {"modules": modules}}
    peft_model = attach_adapters(comp, closed_form_adapters(comp, dense, _windows(n=2), rank=2, progress=False))
    merge_correction(peft_model)  # sparse everywhere: allowed without flags


def test_structure_mismatch_is_refused():
    dense = tiny_model("llama")
    shallow = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match="depth-pruned"):
        closed_form_adapters(shallow, dense, _windows(n=2), rank=2, progress=False)


def test_correct_trains_and_lowers_kl():
    """End to end: closed form then KL distillation (top-K cache and on-the-fly teacher)."""
    dense, comp = _pair("sparsity")
    calib = _windows(n=8)
    closed = correct(copy.deepcopy(comp), dense, calib, rank=4, progress=False)
    kl_closed = _kl(dense, closed, calib)
    for teacher in ("topk", "model"):
        trained = correct(copy.deepcopy(comp), dense, calib, rank=4, progress=False, teacher=teacher, top_k=32,
                          train={"max_steps": 12, "learning_rate": 1e-3, "logging_steps": 100})
        assert trained.evopress_correction["trained_steps"] == 12
        assert _kl(dense, trained, calib) < kl_closed
        # only the adapters trained: the compressed weights are untouched
        for n, m in comp.named_modules():
            if isinstance(m, nn.Linear) and "layers" in n:
                assert torch.equal(trained.get_base_model().get_submodule(n).get_base_layer().weight, m.weight)
    with pytest.raises(ValueError, match="teacher"):
        correct(copy.deepcopy(comp), dense, calib, rank=2, train=1, teacher="nope", progress=False)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_compressed_inputs_fit_linears_in_the_order_the_block_computes_them(arch):
    from optimum_evo.compressors.calibrate import walk_blocks
    from optimum_evo.correction.eora import _input_stages

    dense = tiny_model(arch)
    block = next(iter(walk_blocks(dense, _windows(n=2), progress=False)))
    stages = _input_stages(block, list(block.linears()))
    assert stages == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_compressed_inputs_at_full_rank_reproduce_the_dense_model():
    """True-sequential statistics: at full rank every stage is fitted on the inputs it will see
    once the earlier stages are corrected, so the corrected model computes the dense model's outputs
    (with a stage's statistics taken before the earlier stages' corrections, ``o_proj`` and
    ``down_proj`` would undo errors that are no longer there)."""
    dense, comp = _pair("quantization")
    calib = _windows(n=8)
    ads = closed_form_adapters(comp, dense, calib, rank=1000, inputs="compressed", damp=1e-9, progress=False)
    assert _kl(dense, comp, calib) > 0.05
    assert _kl(dense, attach_adapters(comp, ads), calib) < 1e-4


def test_auto_inputs_picks_the_correction_with_the_lower_held_out_kl(caplog):
    dense, comp = _pair("quantization")
    calib = _windows(n=32)
    with caplog.at_level("WARNING", logger="optimum_evo.correction.eora"):
        inputs, ads, scores = select_inputs(comp, dense, calib, rank=4, progress=False)
    gain = 1 - scores[inputs] / scores["none"]
    assert ("less than 1%" in caplog.text) == (gain < 0.01)
    caplog.clear()
    with caplog.at_level("WARNING", logger="optimum_evo.correction.eora"):  # demanding more than it gains warns
        select_inputs(comp, dense, calib, rank=4, progress=False, min_gain=min(0.99, gain + 0.01))
    assert "KL distillation" in caplog.text
    assert inputs in ("dense", "compressed") and scores["held_out_windows"] == 4
    assert scores[inputs] == min(scores["dense"], scores["compressed"]) < scores["none"]
    # the chosen correction is refitted on all windows: the same as asking for it directly
    direct = closed_form_adapters(comp, dense, calib, rank=4, inputs=inputs, progress=False)
    assert all(torch.allclose(ads[n].delta(), direct[n].delta(), atol=1e-5) for n in direct)
    peft_model = correct(comp, dense, calib, rank=4, inputs="auto", progress=False)
    assert peft_model.evopress_correction["inputs"] == inputs
    assert peft_model.evopress_correction["selection"]["none"] == pytest.approx(scores["none"])
    with pytest.raises(ValueError, match="inputs must be one of"):
        correct(comp, dense, calib, rank=4, inputs="both", progress=False)
