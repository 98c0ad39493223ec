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


def test_signround_with_a_mask_keeps_pruned_weights_at_zero_even_where_a_whole_group_is_pruned(model):
    block = next(iter(walk_blocks(model, WINDOWS, progress=False)))
    linears = block.linears()
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(m.weight.shape, generator=gen) > 0.5 for n, m in linears.items()}
    masks["mlp.down_proj"][:4] = False  # rows with every weight pruned: groups with nothing to range
    tuned = signround_block(block.module, block.inputs, block.dense_outputs(), block.kwargs, linears, bits=4,
                            group_size=32, iters=10, batch_size=4, autocast=False, mask_of=masks)
    for n, q in tuned.items():
        w = q.dequantize()
        assert torch.isfinite(w).all() and torch.isfinite(q.scales).all() and bool((q.scales > 0).all()), n
        assert torch.all(w[~masks[n]] == 0), n  # pruned weights hold their group's zero-point code
        assert int((w[masks[n]] != 0).sum()) > 0.5 * int(masks[n].sum()), n
    with pytest.raises(ValueError, match="mask shape"):
        signround_block(block.module, block.inputs, block.dense_outputs(), block.kwargs, linears, bits=4,
                        group_size=32, iters=0, mask_of={"mlp.down_proj": masks["mlp.down_proj"][:, :-1]})


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


def test_a_shared_stream_tunes_every_level_on_the_same_inputs(model, tmp_path):
    """stream="2": every level of a block sees the 2-bit model's activations, so the 2-bit level is the
    per-level database's, the 3-bit level of block 1 is not (its per-level stream is the 3-bit model's);
    stream="dense" is GPTQ on the dense activations."""
    def build(name, **settings):
        return LevelDatabase.build(model, WINDOWS, "quantization", [2, 3], tmp_path / name,
                                   settings={"group_size": 32, "builder": "gptq-sequential", **settings}, progress=False)

    per_level, shared, dense = build("a"), build("b", stream="2"), build("c", stream="dense")
    plain = LevelDatabase.build(model, WINDOWS, "quantization", [2, 3], tmp_path / "d", settings={"group_size": 32},
                                progress=False)
    first, later = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"
    for level in (2, 3):
        assert torch.equal(per_level.weight(first, level), shared.weight(first, level))
        assert torch.equal(dense.weight(later, level), plain.weight(later, level))
    assert torch.equal(per_level.weight(later, 2), shared.weight(later, 2))
    assert not torch.equal(per_level.weight(later, 3), shared.weight(later, 3))
    assert shared.manifest["settings"]["stream"] == "2"
    with pytest.raises(ValueError, match="stream 4g32 must be"):
        build("e", stream="4")


@pytest.mark.parametrize("builder", ["gptq-sequential", "signround"])
def test_retune_makes_the_chosen_levels_on_the_chosen_models_own_stream(model, builder, tmp_path):
    """A uniform profile re-tuned is the per-level database's level (the same stream); a mixed profile
    (two widths, two group sizes) is tuned on its own activations, so block 1 differs from the
    database's levels while GPTQ's block 0 (dense inputs either way, one linear at a time) does not."""
    from optimum_evo.compressors.retune import retune
    from optimum_evo.compressors.codecs import get_codec

    codec = get_codec("quantization")

    def stored(q):  # as the database stores it (float16 scales)
        return codec.decode(codec.encode(q), (q.codes.shape[0], q.codes.shape[1]), f"{q.bits}g{q.group_size}", {"group_size": 32})

    settings = {"group_size": 32, "builder": builder, "iters": 3, "batch_size": 2}
    db = LevelDatabase.build(model, WINDOWS, "quantization", [2, 3, "3g16"], tmp_path / "db", settings=settings,
                             progress=False)
    names = list(db.modules)
    uniform = retune(model, WINDOWS, {n: 2 for n in names}, settings, progress=False)
    assert all(torch.equal(stored(uniform[n]), db.weight(n, 2)) for n in names)
    mixed = {n: (2 if i % 2 else "3g16") for i, n in enumerate(names)}
    tuned = retune(model, WINDOWS, mixed, settings, progress=False)
    assert set(tuned) == set(names)
    for n, lv in mixed.items():
        bits, gs = quant_level(lv, 32)
        assert (tuned[n].bits, tuned[n].group_size) == (bits, gs)
        if n.startswith("model.layers.0.") and builder != "signround":  # signround tunes a block jointly
            assert torch.equal(stored(tuned[n]), db.weight(n, lv))
    later = [n for n in names if n.startswith("model.layers.1.")]
    assert any(not torch.equal(stored(tuned[n]), db.weight(n, mixed[n])) for n in later)
    assert all(torch.equal(model.get_submodule(n).weight, dense) for n, dense in
               ((n, model.get_submodule(n).weight.detach().clone()) for n in names))
    with pytest.raises(ValueError, match="decoder blocks"):
        retune(model, WINDOWS, {"lm_head": 3}, settings, progress=False)


def test_builder_stream_setting_resolves_the_target_and_is_checked():
    method = get_method("quantization")

    def stream(**kw):
        args = SearchArguments(compression="quantization", levels=[2, 3, 4], builder="signround", **kw)
        return method.database_request(args, None)[1]["stream"]

    assert stream(target=3.0) == "level" and stream(target=3.0, builder_stream="dense") == "dense"
    assert stream(target=3.0, builder_stream="target") == "3" and stream(target=2.5, builder_stream="target") == "2"
    assert stream(target=3.4, builder_stream="4") == "4"
    args = SearchArguments(compression="quantization", target=3.0, builder="gptq", builder_stream="dense")
    assert method.database_request(args, None)[1]["stream"] == "level"  # GPTQ reads no stream: one database
    with pytest.raises(ValueError, match="builder_stream must be"):
        SearchArguments(compression="quantization", target=3.0, levels=[2, 3, 4], builder="signround",
                        builder_stream="5")


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

    assert {"builder", "builder_iters", "builder_stream", "retune", "group_sizes"} <= set(config_fields())
    rows = dict(get_method("quantization").card_rows({"levels": [2, 3, 4], "builder": "signround",
                                                      "builder_stream": "3", "retune": True}))
    assert rows["levels made by"] == "signround, tuned on the shared stream of level 3" and "re-tuned" in str(rows)
    assert option_of("builder").choices == tuple(sorted(available_builders(), key=["gptq", "gptq-sequential",
                                                                                   "quantease", "signround"].index))


def test_retune_in_the_pipeline_evaluates_saves_and_reloads_the_retuned_codes(tmp_path, one_thread):
    """retune=True: the found profile's levels are made again on the found model's stream; the saved
    checkpoint holds those codes (not the database's) and reloads with the same logits."""
    from test_hf_quantizer import CALIB, save_tiny
    from transformers import AutoModelForCausalLM

    from optimum_evo.compressors.retune import retune
    from optimum_evo.loading import load_model
    from optimum_evo.pipeline import run

    path = tmp_path / "tiny"
    save_tiny(path)
    common = dict(model=str(path), compression="quantization", target=3.0, levels=[2, 3, 4], group_size=32,
                  builder="gptq-sequential", builder_stream="dense", dataset=CALIB, generations=1, offspring=2,
                  num_samples=4, seq_len=32, eval_windows=1, eval_seq_len=32, top_k=16, search_dtype="float32",
                  progress=False, database_dir=str(tmp_path / "db"))
    ctx = run(SearchArguments(**common, retune=True, output_dir=str(tmp_path / "out")))
    report = ctx.report
    assert report["retune"]["builder"] == "gptq-sequential" and report["retune"]["modules"] == len(ctx.database.modules)
    assert "refine_seconds" in report["timings"] and report["results"]["evopress"]["perplexity"] > 0
    dense = load_model(str(path), torch.float32)
    expected = retune(dense, ctx.calibration, report["levels"], ctx.database.manifest["settings"], progress=False)
    codec = ctx.database.codec
    differ = 0
    for name, q in expected.items():
        layer = ctx.model.get_submodule(name)
        stored = codec.decode(codec.encode(q), (layer.out_features, layer.in_features), report["levels"][name],
                              ctx.database.manifest["settings"])
        assert torch.equal(layer.dequantize_weight(torch.float32), stored)
        differ += not torch.equal(stored, ctx.database.weight(name, report["levels"][name]))
    assert differ > 0  # dense-input levels, re-made on the quantized model's stream
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    ids = torch.tensor([[5, 9, 33, 40, 41, 70]])
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, ctx.model(ids).logits)
    with pytest.raises(ValueError, match="retune applies to quantization"):
        SearchArguments(model=str(path), compression="depth", target=0.25, retune=True)
