"""Attention-aware value Hessians: exact second-order model of the attention output."""

import torch

from optimum_evo.compressors import gptq, sparsegpt
from optimum_evo.compressors.calibrate import value_projection, walk_blocks
from optimum_evo.compressors.database import relative_error
from optimum_evo.decoder import find_decoder_layout

from conftest import tiny_model


def _attention_input_change(model, windows, layer, delta):
    """sum over tokens of ||change of o_proj's input||^2 when v_proj.weight += delta (eager)."""
    attn = find_decoder_layout(model).layers[layer].self_attn
    seen = []
    handle = attn.o_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(windows)
        attn.v_proj.weight += delta
        model(windows)
        attn.v_proj.weight -= delta
    handle.remove()
    return float((seen[1] - seen[0]).pow(2).sum())


def test_value_hessian_is_exact_for_the_attention_output(arch):
    model = tiny_model(arch)
    model.set_attn_implementation("sdpa")
    windows = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    layer = 2
    for block in walk_blocks(model, windows, progress=False, attention_aware=True):
        if block.index == layer:
            H = block.hessians()["self_attn.v_proj"]
            break
    assert model.config._attn_implementation == "sdpa"  # restored after the walk
    _, v, kv_heads = value_projection(block.module.self_attn)
    assert H.shape == (kv_heads, v.in_features, v.in_features)
    delta = 0.01 * torch.randn_like(v.weight, generator=torch.Generator().manual_seed(1))
    model.set_attn_implementation("eager")
    direct = _attention_input_change(model, windows, layer, delta)
    n = windows.numel()
    d = delta.view(kv_heads, -1, v.in_features)
    predicted = float((d @ H * d).sum()) * n / 2
    assert abs(predicted - direct) < 1e-3 * direct
    # the plain (token-uniform) Hessian does not predict it
    plain = next(b for b in walk_blocks(model, windows, progress=False) if b.index == layer).hessians()["self_attn.v_proj"]
    assert plain.dim() == 2
    assert abs(float((delta @ plain * delta).sum()) * n / 2 - direct) > 0.05 * direct


def test_row_grouped_compressors():
    torch.manual_seed(0)
    w = torch.randn(12, 256)
    xs = [torch.randn(300, 256) * torch.linspace(0.1, 3, 256) for _ in range(3)]
    H = torch.stack([2 * x.t() @ x / len(x) for x in xs])
    q = gptq(w, H, bits=3, group_size=128)
    assert q.codes.shape == w.shape and q.scales.shape == (12, 2)
    # each slice of rows is quantized with its own Hessian
    for g in range(3):
        alone = gptq(w[4 * g: 4 * g + 4], H[g], bits=3, group_size=128)
        assert torch.equal(q.codes[4 * g: 4 * g + 4], alone.codes)
    assert relative_error(w, q.dequantize(), H) < relative_error(w, gptq(w, H.sum(0), bits=3).dequantize(), H)
    act = gptq(w, H, bits=3, act_order=True)
    assert sorted(torch.bincount(act.g_idx.long()).tolist()) == [128, 128]
    sp = sparsegpt(w, H, 0.61)
    assert int((sp == 0).sum()) == round(0.61 * w.numel())


def test_batched_levels_equal_separate_calls():
    from optimum_evo.compressors import gptq_levels, sparsegpt_levels

    torch.manual_seed(1)
    w = torch.randn(8, 200)
    x = torch.randn(400, 200) * torch.linspace(0.2, 2, 200)
    for H in (2 * x.t() @ x / 400, torch.stack([2 * x[:200].t() @ x[:200] / 200, 2 * x[200:].t() @ x[200:] / 200])):
        for kw in ({}, {"act_order": True, "mse": True}, {"sym": True, "group_size": 64}):
            many = gptq_levels(w, H, [2, 3, 8], **kw)
            for b, q in zip([2, 3, 8], many):
                one = gptq(w, H, b, **kw)
                # same computation; stacking rows may only change float rounding of the GEMMs
                assert q.bits == b and torch.equal(q.g_idx, one.g_idx) and q.codes.shape == one.codes.shape
                assert (q.codes != one.codes).float().mean() < 0.005
                assert torch.allclose(q.scales, one.scales, rtol=1e-4)
        sps = sparsegpt_levels(w, H, [0.3, 0.55, 0.7])
        for s, sp in zip([0.3, 0.55, 0.7], sps):
            assert torch.allclose(sp, sparsegpt(w, H, s), atol=1e-6)
            assert int((sp == 0).sum()) == round(s * w.numel())
