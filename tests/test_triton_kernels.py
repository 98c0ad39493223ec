"""The packed layer's GPU kernels (Triton), run on CPU tensors by Triton's interpreter.

The kernels are the same code that runs on a CUDA device; ``TRITON_INTERPRET=1`` makes Triton
execute them with NumPy instead of compiling them, so their indexing, bit-plane decoding, zero-point
unpacking and masks are checked here without a GPU. Their speed is measured on a GPU by
``benchmarks/gpu_check.py``. Triton reads ``TRITON_INTERPRET`` when it is imported (its own
library functions are decorated then), so in a pytest run without it the interpreted tests run
again in a child process that sets it.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from optimum_evo.compressors import kernels  # noqa: E402
from optimum_evo.compressors.kernels import triton_planes  # noqa: E402
from optimum_evo.compressors.codecs import encode_quantized  # noqa: E402
from optimum_evo.compressors.packed_linear import EvoPressQuantLinear  # noqa: E402

from test_hf_modules import _gptq_layer  # noqa: E402


@pytest.fixture
def interpreter():
    if not triton_planes.interpreted():
        pytest.skip("runs under TRITON_INTERPRET=1 (test_the_interpreted_tests_pass runs it)")
    assert triton_planes.available("cpu")


@pytest.mark.skipif(triton_planes.interpreted(), reason="this is the child run")
def test_the_interpreted_tests_pass():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "not the_interpreted_tests_pass"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"\b12 passed", run.stdout), run.stdout[-2000:]


@pytest.mark.parametrize("bits", range(1, 9))
def test_triton_kernels_serve_every_width(interpreter, bits):
    """Dequantize is bit-identical to the PyTorch path; the matrix-vector product is within float32
    rounding of the exact product. 40 rows and 160 columns leave partial tiles on both axes (tiles
    are 32 x 128); group size 32 makes the zero-points straddle bytes for 3, 5, 6 and 7 bits."""
    torch.manual_seed(bits)
    layer = EvoPressQuantLinear.from_linear(nn.Linear(160, 40, bias=False), bits=bits, group_size=32)
    assert layer.layout == "planes"
    weight = layer.dequantize_weight(torch.float32)
    got = triton_planes.dequantize(layer.qweight, layer.scales, layer.qzeros, bits, 160, 32)
    assert torch.equal(got, weight)
    x = torch.randn(3, 160)
    y = triton_planes.gemv(x, layer.qweight, layer.scales, layer.qzeros, bits, 32)
    assert y.shape == (3, 40)
    assert torch.allclose(y, x @ weight.t(), rtol=1e-5, atol=1e-5)


def test_triton_kernels_refuse_layers_that_are_not_bit_planes(interpreter):
    layer = EvoPressQuantLinear.from_linear(nn.Linear(64, 8, bias=False), bits=3, group_size=32)
    with pytest.raises(ValueError, match="multiples of 32"):
        triton_planes.dequantize(layer.qweight, layer.scales, layer.qzeros, 3, 48, 32)
    with pytest.raises(ValueError, match="needs"):
        triton_planes.gemv(torch.randn(1, 64), layer.qweight, layer.scales, layer.qzeros, 4, 32)


@pytest.mark.parametrize("act_order", [False, True])
def test_the_packed_layer_runs_on_the_triton_kernels(interpreter, monkeypatch, act_order):
    """With the Triton kernels as its device's kernels, the layer decodes a few rows through their
    matrix-vector product and prefill through their dequantize, and matches PyTorch's path (act-order
    columns included); the float32 product within rounding, the bfloat16 one as close as PyTorch's."""
    calls = []

    def spy(name):
        fn = getattr(triton_planes, name)
        return lambda *a, **k: calls.append(name) or fn(*a, **k)

    class Triton:
        gemv, dequantize = spy("gemv"), spy("dequantize")

    _, q = _gptq_layer(3, act_order=act_order, out_features=40, in_features=192, group_size=64)
    enc = encode_quantized(q)
    if act_order:
        enc["g_idx"] = q.g_idx.to(torch.int32)
    reference = EvoPressQuantLinear.from_packed(enc, 192, 40, 3, 64, act_order=act_order, layout="stream")
    layer = EvoPressQuantLinear.from_packed(enc, 192, 40, 3, 64, act_order=act_order)
    assert layer.layout == "planes" and (layer.g_idx is not None) == act_order
    monkeypatch.setattr(kernels, "for_device", lambda device_type: Triton if device_type == "cpu" else None)
    weight = reference.dequantize_weight(torch.float32)
    for rows in (1, 5, 16):
        x = torch.randn(2, rows, 192)
        calls.clear()
        y = layer(x)
        assert calls == (["gemv"] if 2 * rows <= 8 else ["dequantize"]), (rows, calls)
        assert torch.allclose(y, x @ weight.t(), rtol=1e-5, atol=1e-5), rows
    assert torch.equal(layer.dequantize_weight(torch.float32), weight)
    layer, reference = layer.to(torch.bfloat16), reference.to(torch.bfloat16)
    x = torch.randn(1, 192)
    exact = x @ weight.t()
    assert (layer(x.bfloat16()).float() - exact).abs().max() <= 1.5 * (
        reference(x.bfloat16()).float() - exact).abs().max() + 1e-3


def test_kernels_are_chosen_by_device():
    """The C++ kernels serve CPU tensors, Triton's CUDA tensors (when there is a GPU), nothing else."""
    assert kernels.for_device("cpu") is (kernels if kernels.available() else None)
    assert kernels.for_device("meta") is None
    expected = triton_planes if torch.cuda.is_available() else None
    assert kernels.for_device("cuda") is expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_packed_layer_on_the_gpu_uses_the_triton_kernels():
    torch.manual_seed(0)
    dense = nn.Linear(256, 96, bias=True)
    cpu = EvoPressQuantLinear.from_linear(dense, bits=3, group_size=128)
    gpu = EvoPressQuantLinear.from_linear(dense, bits=3, group_size=128).to("cuda")
    assert gpu._kernels() is triton_planes
    x = torch.randn(4, 256)
    assert torch.allclose(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)
    assert torch.equal(gpu.dequantize_weight(torch.float32).cpu(), cpu.dequantize_weight(torch.float32))
