"""GPTQ, SparseGPT and bit packing on real SmolLM2 activations and random matrices."""

import pytest
import torch

from optimum_evo.compressors import (
    HessianAccumulator, dequantize_codes, find_params, gptq, magnitude_prune, pack_codes, quantize_codes, sparsegpt,
    unpack_codes,
)


@pytest.fixture(scope="module")
def real_layer():
    """q_proj of layer 4 of SmolLM2-135M with its inputs on real Brown text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_evo.data import calibration_windows
    from optimum_evo.embedded_models import embedded_model_path

    path = embedded_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layer = model.model.layers[4].mlp.down_proj
    inputs = []
    handle = layer.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    windows = calibration_windows("sotu", tok, num_samples=4, seq_len=256, seed=0)
    with torch.inference_mode():
        for w in windows:
            model.model(input_ids=w[None])
    handle.remove()
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])
    return layer.weight.detach().clone(), x


def hessian(x):
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(100):
        acc.add(chunk)
    return acc.hessian()


def rel_err(w, w_hat, x):
    return float((x @ (w - w_hat).t()).norm() / (x @ w.t()).norm())


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (7, 33), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (codes.numel() * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, codes.shape), codes)


def test_hessian_accumulator_matches_definition():
    x = torch.randn(250, 16)
    assert torch.allclose(hessian(x), 2 * x.t() @ x / 250, atol=1e-4)


def test_gptq_8bit_reproduces_layer_output(real_layer):
    w, x = real_layer
    q = gptq(w, hessian(x), bits=8, group_size=128)
    assert q.codes.max() <= 255 and q.scales.shape == (w.shape[0], w.shape[1] // 128)
    assert rel_err(w, q.dequantize(), x) < 5e-3


def test_gptq_fewer_bits_hurt_and_beat_round_to_nearest(real_layer):
    w, x = real_layer
    H = hessian(x)
    errs = {b: rel_err(w, gptq(w, H, bits=b, group_size=128).dequantize(), x) for b in (2, 3, 4)}
    assert errs[2] > errs[3] > errs[4]
    # OBS error compensation beats plain round-to-nearest with the same grid
    groups = w.view(w.shape[0], -1, 128)
    rtn = []
    for g in range(groups.shape[1]):
        s, z = find_params(groups[:, g], 3)
        rtn.append(dequantize_codes(quantize_codes(groups[:, g], s, z, 3), s, z))
    assert errs[3] < 0.9 * rel_err(w, torch.cat(rtn, dim=1), x)


def test_gptq_options(real_layer):
    w, x = real_layer
    H = hessian(x)
    base = rel_err(w, gptq(w, H, bits=3).dequantize(), x)
    act = gptq(w, H, bits=3, act_order=True)
    assert sorted(torch.bincount(act.g_idx.long()).tolist()) == [128] * (w.shape[1] // 128)
    assert rel_err(w, act.dequantize(), x) < 1.1 * base
    assert rel_err(w, gptq(w, H, bits=3, mse=True).dequantize(), x) < 1.05 * base
    sym = gptq(w, H, bits=4, sym=True)
    assert torch.all(sym.zeros == 8)
    with pytest.raises(ValueError, match="bits"):
        gptq(w, H, bits=9)


def test_sparsegpt_beats_magnitude_with_exact_sparsity(real_layer):
    w, x = real_layer
    H = hessian(x)
    for sparsity in (0.5, 0.7):
        sp = sparsegpt(w, H, sparsity)
        mag = magnitude_prune(w, sparsity)
        assert int((sp == 0).sum()) == round(sparsity * w.numel())
        assert rel_err(w, sp, x) < 0.8 * rel_err(w, mag, x)


def test_gptq_with_a_mask_keeps_pruned_weights_at_zero_and_compensates_them(real_layer):
    w, x = real_layer
    H = hessian(x)
    mask = sparsegpt(w, H, 0.5) != 0
    for act_order, sym in ((False, False), (True, True)):
        q = gptq(w, H, bits=4, group_size=128, mask=mask, act_order=act_order, sym=sym)
        d = q.dequantize()
        assert torch.all(d[~mask] == 0)  # the zero-point code of every pruned weight reads back as 0
        assert int((d == 0).sum()) >= int((~mask).sum())
    masked = rel_err(w, gptq(w, H, bits=4, group_size=128, mask=mask).dequantize(), x)
    # GPTQ of the pruned weights without the mask's compensation: quantize SparseGPT's output
    # with plain rounding on the same grid, keeping its zeros
    sp = sparsegpt(w, H, 0.5)
    groups = sp.view(sp.shape[0], -1, 128)
    rtn = []
    for g in range(groups.shape[1]):
        s, z = find_params(groups[:, g], 4)
        rtn.append(dequantize_codes(quantize_codes(groups[:, g], s, z, 4), s, z) * (groups[:, g] != 0))
    assert masked < rel_err(w, torch.cat(rtn, dim=1), x)
    with pytest.raises(ValueError, match="mask shape"):
        gptq(w, H, bits=4, mask=mask[:, :-1])


def test_sparse_quantized_levels_store_a_mask_and_the_kept_codes_and_reload_bit_identically(real_layer):
    from optimum_evo.compressors.codecs import (decode_quantized, encode_quantized, get_codec, sparse_quant_level,
                                                stored_bits)
    from optimum_evo.compressors.packed_linear import EvoPressQuantLinear
    from optimum_evo.compressors.packing import packed_bytes
    from optimum_evo.compressors.sparse_quant_linear import EvoPressSparseQuantLinear, compact_tensors, kept_count

    w, x = real_layer
    H = hessian(x)
    codec = get_codec("sparse-quantization")
    settings = codec.full_settings({"group_size": 128})
    levels = codec.sort_levels(["50%+4", "60%+4", (0.5, 3)])
    assert levels == ["50%+3", "60%+4", "50%+4"]  # by stored bits: 2.5, 2.6, 3 (+ scales)
    made = codec.compress(w, H, levels, settings)
    errors = []
    for level, q in zip(levels, made):
        sparsity, bits = sparse_quant_level(level)
        t = codec.encode(q)
        d = codec.decode(t, w.shape, level, settings)
        # the same weight as the quantized level's, read from the mask and the kept codes only
        assert torch.equal(d, decode_quantized(encode_quantized(q), w.shape, bits, 128))
        assert (d == 0).float().mean() >= sparsity
        kept = kept_count(t["mask"], w.shape)
        assert kept == int((d != 0).sum())  # a kept weight rounding to its zero-point is stored as pruned
        assert t["codes"].numel() == packed_bytes(kept, bits)
        nbytes = sum(v.numel() * v.element_size() for v in t.values())
        assert nbytes == packed_bytes(w.numel(), 1) + packed_bytes(kept, bits) + \
            (stored_bits(bits, 128, w.shape) - w.numel() * bits) // 8
        errors.append(rel_err(w, d, x))
    assert errors[2] < errors[0] and errors[2] < errors[1]  # 50% + 4 bits is the best of the three
    # the packed layer: in memory every code, in a checkpoint the mask and the kept codes
    q = made[2]
    layer = EvoPressQuantLinear.from_quantized(q, dtype=torch.float32)
    compact = compact_tensors(layer)
    assert torch.equal(compact["qweight_mask"], codec.encode(q)["mask"])
    skeleton = EvoPressSparseQuantLinear(w.shape[1], w.shape[0], 4, 128, kept=kept_count(compact["qweight_mask"],
                                                                                          w.shape))
    assert "qweight" not in skeleton.state_dict()
    skeleton.load_state_dict({**compact, "scales": layer.scales, "qzeros": layer.qzeros})
    with pytest.raises(RuntimeError, match="expand"):
        skeleton(x[:1])
    skeleton.expand()
    assert torch.equal(skeleton.qweight, layer.qweight)
    assert torch.equal(skeleton(x[:2]), layer(x[:2]))
    corrupt = EvoPressSparseQuantLinear(w.shape[1], w.shape[0], 4, 128, kept=skeleton.kept + 1)
    corrupt.load_state_dict({"qweight_mask": compact["qweight_mask"], "scales": layer.scales, "qzeros": layer.qzeros,
                             "qweight_kept": torch.zeros(packed_bytes(skeleton.kept + 1, 4), dtype=torch.uint8)})
    with pytest.raises(ValueError, match="corrupt"):
        corrupt.expand()
    for bad in ("50+4", "50%+9", "0%+4", (1.0, 4)):
        with pytest.raises(ValueError, match="sparse \\+ quantized level"):
            sparse_quant_level(bad)
