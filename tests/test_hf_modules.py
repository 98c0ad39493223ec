"""The packed mixed-bit linear layer: storage format, exact dequantization, dtype moves, PEFT LoRA."""

import pytest
import torch
from torch import nn

from optimum_evo.compressors import HessianAccumulator, gptq, pack_codes, unpack_codes
from optimum_evo.compressors.codecs import decode_quantized, encode_quantized
from optimum_evo.compressors.packed_linear import (
    EvoPressQuantLinear, packed_bytes, set_dequantized_cache, unpack_bits,
)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(7, 13), (32, 96)])
def test_unpack_bits_matches_database_unpacking(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.numel() == packed_bytes(codes.numel(), bits)
    assert torch.equal(unpack_bits(packed, bits, shape), codes)
    assert torch.equal(unpack_codes(packed, bits, shape), codes)


def _gptq_layer(bits, act_order=False, out_features=48, in_features=160, group_size=64):
    torch.manual_seed(0)
    w = torch.randn(out_features, in_features)
    acc = HessianAccumulator(in_features)
    acc.add(torch.randn(256, in_features) * torch.linspace(0.2, 3, in_features))
    return w, gptq(w, acc.hessian(), bits=bits, group_size=group_size, act_order=act_order)


@pytest.mark.parametrize("bits,act_order", [(2, False), (3, False), (3, True), (5, False), (8, False)])
def test_packed_layer_is_bit_identical_to_the_database_level(bits, act_order):
    _, q = _gptq_layer(bits, act_order)
    enc = encode_quantized(q)
    reference = decode_quantized(enc, (48, 160), bits, 64)
    bias = torch.randn(48)
    layer = EvoPressQuantLinear.from_packed(enc, 160, 48, bits, 64, bias=bias, act_order=act_order)
    assert layer.weight is None and isinstance(layer, nn.Linear)
    assert torch.equal(layer.dequantize_weight(torch.float32), reference)
    assert layer.layout == "planes"
    for x in (torch.randn(1, 1, 160), torch.randn(2, 5, 160)):  # decode (matrix-vector kernel) and prefill
        # the kernels sum in another order (groups, bit planes): equal within float32 rounding
        assert torch.allclose(layer(x), nn.functional.linear(x, reference, bias), rtol=1e-5, atol=1e-5)
    # Stored: packed codes and zeros, fp16 scales; no dense weight anywhere.
    state = layer.state_dict()
    assert set(state) == {"qweight", "scales", "qzeros", "bias"} | ({"g_idx"} if act_order else set())
    assert state["qweight"].numel() == (48 * 160 * bits + 7) // 8 and state["qweight"].dtype == torch.uint8
    assert state["scales"].dtype == torch.float16 and state["scales"].shape == (48, 3)
    # quantized_data() gives back what GPTQ produced (the exporters' entry point).
    data = layer.quantized_data()
    assert torch.equal(data.codes, q.codes) and torch.equal(data.zeros, q.zeros)
    assert torch.equal(data.g_idx.long(), q.g_idx.long()) and (data.bits, data.group_size) == (bits, 64)
    assert torch.equal(data.scales, q.scales.half().float())
    assert torch.equal(data.dequantize(), reference)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_serve_every_width_within_rounding(bits, dtype):
    """Every width 1..8 goes through the bit-plane kernels (matrix-vector for a few rows, dequantize
    + matrix product for many) and matches the stream layout's PyTorch path."""
    from optimum_evo.compressors import kernels

    _, q = _gptq_layer(bits, out_features=40, in_features=192)
    enc = encode_quantized(q)
    fast = EvoPressQuantLinear.from_packed(enc, 192, 40, bits, 64, dtype=dtype).to(dtype)
    slow = EvoPressQuantLinear.from_packed(enc, 192, 40, bits, 64, dtype=dtype, layout="stream").to(dtype)
    assert (fast.layout, slow.layout) == ("planes", "stream") and fast.qweight.numel() == slow.qweight.numel()
    assert torch.equal(fast.dequantize_weight(torch.float32), slow.dequantize_weight(torch.float32))
    assert kernels.available(), "the kernels should build on this machine"
    weight = slow.dequantize_weight(torch.float32)
    for rows in (1, 3, 32):
        x = torch.randn(rows, 192).to(dtype)
        exact = x.float() @ weight.t()
        if dtype == torch.float32:  # float32 rounding of sums as large as the largest output
            reference = slow(x)
            assert torch.allclose(fast(x), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max())), (bits, rows)
        else:  # bfloat16 outputs: the kernels are no further from the exact product than PyTorch's own bf16 path
            assert (fast(x).float() - exact).abs().max() <= 1.5 * (slow(x).float() - exact).abs().max() + 1e-3
    assert torch.equal(fast.stream_tensors()["codes"], enc["codes"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_stay_within_their_int16_rounding(dtype):
    """Half-precision inputs may be rounded to int16 per block of 32 columns (the AVX2 kernels): each
    input then moves by at most max|block| / 65534, so an output moves by at most the sum of
    |weight| times that (and the result's rounding to the input's dtype), for every row count the
    matrix-vector kernel takes; NaN inputs give NaN."""
    from optimum_evo.compressors import kernels

    _, q = _gptq_layer(3, out_features=40, in_features=192)
    layer = EvoPressQuantLinear.from_packed(encode_quantized(q), 192, 40, 3, 64)
    weight = layer.dequantize_weight(torch.float32)
    for rows in (1, 2, 3, 5, 7, 8):
        x = (torch.randn(rows, 192) * torch.linspace(0.01, 10, 192)).to(dtype)
        y = kernels.gemv(x, layer.qweight, layer.scales, layer.qzeros, 3, 64)
        assert y.dtype == dtype and y.shape == (rows, 40)
        exact = x.double() @ weight.double().t()
        step = x.float().abs().reshape(rows, 6, 32).amax(-1).repeat_interleave(32, -1) / 65534  # [rows, 192]
        # plus the rounding of the result to the input's dtype
        bound = step.double() @ weight.abs().double().t() + torch.finfo(dtype).eps * exact.abs() + 1e-5 * exact.abs().max()
        assert ((y.double() - exact).abs() <= bound).all(), rows
    x = torch.randn(3, 192).to(dtype)
    x[1, 70] = float("nan")
    y = kernels.gemv(x, layer.qweight, layer.scales, layer.qzeros, 3, 64)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


def test_layers_the_kernels_do_not_take_keep_the_stream_layout():
    _, q = _gptq_layer(3, in_features=160, group_size=48)
    layer = EvoPressQuantLinear.from_quantized(q)
    assert layer.layout == "stream"  # group size not a multiple of 32
    x = torch.randn(3, 160)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantize_weight(), None))


def test_from_quantized_and_from_linear():
    w, q = _gptq_layer(4)
    layer = EvoPressQuantLinear.from_quantized(q)
    assert torch.equal(layer.dequantize_weight(torch.float32), decode_quantized(encode_quantized(q), (48, 160), 4, 64))
    dense = nn.Linear(160, 48)
    rtn = EvoPressQuantLinear.from_linear(dense, bits=8, group_size=32)
    assert rtn.bias is not None and torch.equal(rtn.bias, dense.bias)
    err = (rtn.dequantize_weight() - dense.weight).abs().max()
    assert 0 < err < 2e-3  # 8-bit round-to-nearest of weights within +-0.08
    one_group = EvoPressQuantLinear.from_linear(dense, bits=4, group_size=0)
    assert one_group.group_size == 160 and one_group.scales.shape == (48, 1)


def test_dtype_moves_keep_fp16_scales_and_follow_the_compute_dtype():
    dense = nn.Linear(160, 48)
    layer = EvoPressQuantLinear.from_linear(dense, bits=3, group_size=64)
    scales = layer.scales.clone()
    w32 = layer.dequantize_weight(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    assert layer.qweight.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    assert layer.compute_dtype == torch.bfloat16
    assert torch.equal(layer.dequantize_weight(), w32.to(torch.bfloat16))
    y = layer(torch.randn(3, 160, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    layer.float()
    assert layer.compute_dtype == torch.float32 and layer.scales.dtype == torch.float16


def test_cache_is_used_and_invalidated():
    layer = EvoPressQuantLinear.from_linear(nn.Linear(64, 16, bias=False), bits=4, group_size=32, cache_dequantized=True)
    first = layer.dequantize_weight()
    assert layer.dequantize_weight() is first
    with torch.no_grad():
        layer.scales.mul_(2)  # in-place change: the cached weight must not be served
    assert torch.allclose(layer.dequantize_weight(), 2 * first)
    uncached = EvoPressQuantLinear.from_linear(nn.Linear(64, 16), bits=4)
    assert uncached.dequantize_weight() is not uncached.dequantize_weight()
    model = nn.Sequential(uncached, nn.ReLU(), layer)
    assert set_dequantized_cache(model) == 2 and uncached.dequantize_weight() is uncached.dequantize_weight()
    assert set_dequantized_cache(model, False) == 2 and layer._cache is None


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="bits must be an integer in 1..8"):
        EvoPressQuantLinear(16, 16, bits=9)
    _, q = _gptq_layer(3)
    with pytest.raises(ValueError, match="Packed 'codes' has shape"):
        EvoPressQuantLinear.from_packed(encode_quantized(q), 160, 48, 4, 64)


def test_to_linear_and_storage_bytes():
    layer = EvoPressQuantLinear.from_linear(nn.Linear(256, 64), bits=3, group_size=128)
    dense = layer.to_linear()
    assert type(dense) is nn.Linear and torch.equal(dense.weight, layer.dequantize_weight())
    x = torch.randn(4, 256)
    assert torch.allclose(dense(x), layer(x), atol=1e-6)
    assert layer.storage_bytes() == 64 * 256 * 3 // 8 + 64 * 2 * 2 + (64 * 2 * 3 + 7) // 8


def test_peft_lora_attaches_without_registration():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", EvoPressQuantLinear.from_linear(nn.Linear(64, 96), bits=3, group_size=32))
    model.add_module("down", EvoPressQuantLinear.from_linear(nn.Linear(96, 64), bits=4, group_size=32))
    x = torch.randn(5, 64)
    before = model(x).detach()
    peft_model = get_peft_model(model, LoraConfig(target_modules=["up", "down"], r=4, lora_alpha=8))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.allclose(peft_model(x), before)  # lora_B starts at zero
    peft_model(x).pow(2).mean().backward()
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    assert not torch.allclose(peft_model(x), before)
