"""Quantization level builders (GPTQ, sequential GPTQ, QuantEase, SignRound), group size as a level
dimension (levels "BITSgGROUP", stored-bits budgets) and the profiles of mixed group sizes (tiny models)."""

import random

import pytest
import torch
from torch import nn

from conftest import tiny_model
from optimum_evo.compressors.builders import available_builders
from optimum_evo.compressors.calibrate import walk_blocks
from optimum_evo.compressors.codecs import quant_level, quant_level_name, stored_bits
from optimum_evo.compressors.database import LevelDatabase
from optimum_evo.compressors.grid import dequantize_codes, find_params, quantize_codes
from optimum_evo.compressors.obs import gptq, quantease
from optimum_evo.compressors.signround import signround_block
from optimum_evo.methods import get_method
from optimum_evo.methods.layerwise import dp_candidate
from optimum_evo.methods.quantization import QuantizationSpace
from optimum_evo.search import mutate
from optimum_evo.settings import SearchArguments

WINDOWS = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=96)


def rtn(weight, bits, gs):
    w = weight.detach().float()
    out = torch.empty_like(w)
    for g in range(0, w.shape[1], gs):
        s, z = find_params(w[:, g:g + gs], bits)
        out[:, g:g + gs] = dequantize_codes(quantize_codes(w[:, g:g + gs], s, z, bits), s, z)
    return out


def layer_error(w, q, H):
    d = w - q
    return float((d @ H * d).sum())


def test_level_names_parse_and_cost_their_stored_bits():
    assert quant_level(3) == (3, 128) and quant_level("2g64") == (2, 64) and quant_level("4", 32) == (4, 32)
    assert quant_level((3, 0)) == (3, 0) and quant_level_name(3, 128) == 3 and quant_level_name(3, 64) == "3g64"
    with pytest.raises(ValueError, match="BITSgGROUP"):
        quant_level("3bits")
    # codes + one fp16 scale and one 3-bit zero per row and (ragged) group
    assert stored_bits(3, 128, (10, 576)) == 10 * 576 * 3 + 10 * 5 * 19
    assert stored_bits(3, 0, (10, 576)) == 10 * 576 * 3 + 10 * 19


def test_quantease_never_increases_the_layer_error_of_its_start():
    torch.manual_seed(0)
    x = torch.randn(512, 16) @ torch.randn(16, 64) + 0.3 * torch.randn(512, 64)  # correlated features
    H = 2 * x.t() @ x / 512
    w = torch.randn(32, 64)
    start = gptq(w, H, 3, 32)
    better = quantease(w, H, start, iters=4)
    assert torch.equal(better.scales, start.scales) and torch.equal(better.zeros, start.zeros)
    e_start, e_better = layer_error(w, start.dequantize(), H), layer_error(w, better.dequantize(), H)
    assert e_better < e_start
    assert e_better < 0.9 * layer_error(w, rtn(w, 3, 32), H)


def test_signround_lowers_the_block_output_error_of_round_to_nearest(model):
    block = next(iter(walk_blocks(model, WINDOWS, progress=False)))
    linears = block.linears()
    targets = block.dense_outputs()
    tuned = signround_block(block.module, block.inputs, targets, block.kwargs, linears, bits=2, group_size=32,
                            iters=60, batch_size=4, autocast=False)

    def output_error(weights):
        dense = {n: m.weight.detach().clone() for n, m in linears.items()}
        with torch.no_grad():
            for n, w in weights.items():
                linears[n].weight.copy_(w)
            err = sum(float(((block._call(x) - y) ** 2).sum()) for x, y in zip(block.inputs, targets))
            for n, w in dense.items():
                linears[n].weight.copy_(w)
        return err

    e_rtn = output_error({n: rtn(m.weight, 2, 32) for n, m in linears.items()})
    e_tuned = output_error({n: q.dequantize() for n, q in tuned.items()})
    assert e_tuned < 0.8 * e_rtn
    q = tuned["mlp.down_proj"]
    assert q.codes.max() <= 3 and bool((q.zeros >= 0).all() and (q.zeros <= 3).all())
    # the block is untouched (the tuning swaps wrappers in and out)
    assert all(isinstance(m, nn.Linear) for m in block.linears().values())


@pytest.mark.parametrize("builder", ["gptq-sequential", "quantease", "signround"])
def test_every_builder_fills_a_database_that_records_it(model, builder, tmp_path):
    db = LevelDatabase.build(model, WINDOWS, "quantization", [2, 3, "3g32"], tmp_path / "db",
                             settings={"group_size": 64, "builder": builder, "iters": 4, "batch_size": 2},
                             progress=False)
    assert db.manifest["level_builders"] == {"2": builder, "3": builder, "3g32": builder}
    name = "model.layers.1.self_attn.o_proj"
    dense = model.get_submodule(name).weight.detach()
    for level, (bits, gs) in ((2, (2, 64)), (3, (3, 64)), ("3g32", (3, 32))):
        w = db.weight(name, level)
        groups = w.view(w.shape[0], -1, gs)
        assert max(len(torch.unique(g)) for g in groups.reshape(-1, gs)) <= 2 ** bits  # really quantized
        assert float((w - dense).norm() / dense.norm()) < 0.8
    assert db.bytes_per_weight()["3g32"] > db.bytes_per_weight()["3"]
    assert sorted(available_builders()) == ["gptq", "gptq-sequential", "quantease", "signround"]


def test_sequential_levels_see_the_quantized_model_below(model, tmp_path):
    """Block 0 has the same inputs either way; from block 1 on, the sequential builder's 2-bit level
    is computed on the 2-bit model's activations, so its codes differ from dense-input GPTQ."""
    kw = dict(settings={"group_size": 32}, progress=False)
    dense = LevelDatabase.build(model, WINDOWS, "quantization", [2], tmp_path / "a", **kw)
    seq = LevelDatabase.build(model, WINDOWS, "quantization", [2], tmp_path / "b",
                              settings={"group_size": 32, "builder": "gptq-sequential"}, progress=False)
    first, later = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"
    assert torch.equal(dense.weight(first, 2), seq.weight(first, 2))
    assert not torch.equal(dense.weight(later, 2), seq.weight(later, 2))


@pytest.fixture(scope="module")
def mixed(model, tmp_path_factory):
    db = LevelDatabase.build(model, WINDOWS, "quantization", [2, "2g16", 3, "3g16", "3g64", 4], tmp_path_factory.mktemp("m")
                             / "db", settings={"group_size": 32}, progress=False)
    return db


def test_group_size_levels_keep_the_stored_bits_of_the_uniform_model(model, mixed):
    space = QuantizationSpace(model, mixed, 3.0)
    start = space.uniform()
    n = space.num_modules
    assert all(space.level_pair(i, j) == (3, 32) for i, j in enumerate(start[:n])) and set(start[n:]) == {0}
    reference = space.effective_bits(start)
    total = sum(stored_bits(3, 32, mixed.modules[m]["shape"]) for m in space.names) / sum(space.numel)
    assert reference == pytest.approx(total)

    def check(c):
        d = space.describe(c)
        stored = d["effective_bits"]
        assert stored <= reference + 1e-12  # never more than the uniform model stores
        # what is not stored is parked in the reserves or lost to rounding (< 1/64 bit per weight)
        assert reference - 1 / 64 - 1e-9 <= stored + d["unspent_bits_per_weight"] <= reference + 1e-12
        return d

    rng, c, seen = random.Random(0), start, set()
    for _ in range(3000):
        c = mutate(c, space.level_space, rng)
        check(c)
        seen |= {space.level_pair(i, j) for i, j in enumerate(c[:n])}
    assert {(3, 16), (3, 64), (2, 16), (2, 32), (4, 32)} <= seen  # group sizes and bit widths both move
    d = check(c)
    assert sum(d["levels"].values()) == n and len(space.profile(c)) == n
    dp = dp_candidate(space)
    assert check(dp)["unspent_bits_per_weight"] < 0.05  # the DP spends its budget
    half = QuantizationSpace(model, mixed, 2.5)
    assert half.average_bits(half.uniform()) == pytest.approx(2.5)


def test_mixed_group_sizes_materialize_and_rebuild_from_the_profile(mixed):
    method = get_method("quantization")
    model = tiny_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=96)
    space = QuantizationSpace(model, mixed, 3.0)
    cand = list(space.uniform())
    cand[0] = next(j for j, lv in enumerate(space.unit_levels[0]) if lv == "3g16")
    cand[1] = next(j for j, lv in enumerate(space.unit_levels[1]) if lv == "2g16")
    expected = {}
    with torch.no_grad():
        space.apply(model, cand)
        for n in space.names[:2]:
            expected[n] = model.get_submodule(n).weight.detach().clone()
    space.restore(model)
    profile = method.materialize(model, space, cand)
    assert profile["modules"][space.names[0]] == "3g16" and profile["modules"][space.names[2]] == 3
    for n in space.names[:2]:
        layer = model.get_submodule(n)
        assert layer.group_size == 16 and torch.equal(layer.dequantize_weight(torch.float32), expected[n])
    assert method.summary(profile)["modules per level"] == {"2g16": 1, 3: len(space.names) - 2, "3g16": 1}
    fresh = tiny_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=96)
    method.build_skeleton(fresh, profile)
    assert fresh.get_submodule(space.names[1]).group_size == 16 and fresh.get_submodule(space.names[1]).bits == 2
    fresh.load_state_dict(model.state_dict(), assign=True)
    method.verify(fresh, profile)
    old = {"modules": {n: 3 for n in space.names}, "group_size": 32, "act_order": False}  # an earlier profile
    skeleton = tiny_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=96)
    method.build_skeleton(skeleton, old)
    assert {skeleton.get_submodule(n).group_size for n in space.names} == {32}


def test_builder_and_group_sizes_settings():
    args = SearchArguments(compression="quantization", target=3.0, levels=[2, 3, 4], builder="signround",
                           builder_iters=50, group_sizes=[64])
    levels, settings, _ = get_method("quantization").database_request(args, None)
    assert levels == [2, "2g64", 3, "3g64", 4, "4g64"] or sorted(map(str, levels)) == sorted(
        ["2", "2g64", "3", "3g64", "4", "4g64"])
    assert settings["builder"] == "signround" and settings["iters"] == 50 and args.group_sizes == [64, 128]
    for bad, message in ((dict(builder="awq"), "builder must be one of"), (dict(builder_iters=-1), "builder_iters"),
                         (dict(group_sizes=[64, 64]), "group_sizes"), (dict(group_sizes=[64], desc_act=True),
                                                                       "act-order")):
        with pytest.raises(ValueError, match=message):
            SearchArguments(compression="quantization", target=3.0, **bad)


def test_builder_settings_reach_the_command_line_and_the_config():
    from optimum_evo.settings import config_fields, option_of

    assert {"builder", "builder_iters", "group_sizes"} <= set(config_fields())
    assert option_of("builder").choices == tuple(sorted(available_builders(), key=["gptq", "gptq-sequential",
                                                                                   "quantease", "signround"].index))
