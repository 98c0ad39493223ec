"""Depth-pruning space on tiny Llama, Qwen3, Mistral and Gemma3 models."""

import random

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from optimum_evo.fitness import KLObjective, TeacherCache
from optimum_evo.decoder import DroppedAttention, UnsupportedModelError, find_decoder_layout
from optimum_evo.search import mutate
from optimum_evo.methods.depth import (
    DepthSpace, apply_depth_record, residual_states, shortgpt_candidate, sliding_window_cosine_candidate,
)


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_layout_found_by_structure(arch):
    model = tiny_model(arch)
    layout = find_decoder_layout(model)
    assert len(layout) == 6 and layout.attn_name == "self_attn" and layout.mlp_name == "mlp"
    space = DepthSpace(model, 0.34)
    assert space.num_drop == 2 and space.level_space.num_units == 12
    assert space.level_space.groups[:4] == (0, 1, 0, 1)


def test_no_decoder_layers_is_a_clear_error():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    with pytest.raises(UnsupportedModelError, match="no recognisable decoder layers"):
        DepthSpace(model, 0.25)


@pytest.mark.parametrize("target", [0, 1, 1.5, -0.1, 0.1])
def test_bad_targets(target):
    with pytest.raises(ValueError, match="target"):
        DepthSpace(tiny_model("llama"), target)  # 0.1 * 6 layers drops nothing


def test_generate_with_dropped_attention_keeps_kv_cache_valid(arch):
    """Greedy decoding with the KV cache must equal decoding without it, even when the first
    layer's attention is dropped (the cache length comes from layer 0)."""
    model = tiny_model(arch)
    space = DepthSpace(model, 0.34)
    cand = space.candidate(attention=[0, 3], mlp=[1, 4])
    space.apply(model, cand)
    assert isinstance(model.model.layers[0].self_attn, DroppedAttention)
    ids = torch.randint(0, 128, (1, 5))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert with_cache.shape[1] == 17
    assert torch.equal(with_cache, without)
    space.restore(model)
    assert not isinstance(model.model.layers[0].self_attn, DroppedAttention)


def test_apply_changes_output_and_restore_is_exact(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (1, 16))
    dense = logits(model, ids)
    space = DepthSpace(model, 0.34)
    space.apply(model, space.candidate(attention=[1, 2], mlp=[1, 2]))
    assert not torch.allclose(logits(model, ids), dense)
    space.restore(model)
    assert torch.equal(logits(model, ids), dense)


def test_whole_blocks_removed_reload_without_plugin(arch, tmp_path):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (1, 20))
    space = DepthSpace(model, 0.34, mode="block")
    cand = space.candidate(blocks=[1, 4])
    space.apply(model, cand)
    expected = logits(model, ids)
    record = space.compress(model, cand)
    assert record["removed_layers"] == [1, 4] and record["dropped_attention"] == record["dropped_mlp"] == []
    assert torch.allclose(logits(model, ids), expected, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 4
    if getattr(reloaded.config, "layer_types", None):
        assert len(reloaded.config.layer_types) == 4
    assert [layer.self_attn.layer_idx for layer in reloaded.model.layers] == [0, 1, 2, 3]
    assert torch.allclose(logits(reloaded, ids), expected, atol=1e-5)
    out = reloaded.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 9


def test_partial_drops_recorded_and_reapplied(tmp_path):
    model = tiny_model("qwen3")
    ids = torch.randint(0, 128, (1, 20))
    space = DepthSpace(model, 0.34)
    cand = space.candidate(attention=[2, 5], mlp=[2, 0])
    space.apply(model, cand)
    expected = logits(model, ids)
    record = space.compress(model, cand)
    # layer 2 goes entirely; old 5 -> new 4 (attention only), old 0 stays 0 (MLP only)
    assert record == {"removed_layers": [2], "original_num_layers": 6, "dropped_attention": [4], "dropped_mlp": [0]}
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 5
    apply_depth_record(reloaded, record)  # what reloading an EvoPress checkpoint does from its profile
    assert torch.allclose(logits(reloaded, ids), expected, atol=1e-5)


def test_budget_and_parameters():
    model = tiny_model("llama")
    space = DepthSpace(model, 0.34)
    cand = space.candidate(attention=[0, 1], mlp=[2, 3])
    d = space.describe(cand)
    assert d["dropped_sub_blocks"] == 4
    assert d["dropped_parameters"] == 2 * space.attn_params[0] + 2 * space.mlp_params[0]
    with pytest.raises(ValueError, match="exactly 2"):
        space.candidate(attention=[0], mlp=[2, 3])
    rng = random.Random(0)
    for _ in range(200):
        cand = mutate(cand, space.level_space, rng)
        d = space.drops(cand)
        assert len(d["attention"]) == 2 and len(d["mlp"]) == 2


def test_baselines_are_feasible(arch):
    model = tiny_model(arch)
    space = DepthSpace(model, 0.34)
    states = residual_states(model, torch.randint(0, 128, (2, 16)), space)
    assert len(states) == 13 and states[0].shape == (32, 64)
    sg = space.drops(shortgpt_candidate(space, states))
    sw = space.drops(sliding_window_cosine_candidate(space, states))
    assert len(sg["attention"]) == len(sg["mlp"]) == 2
    units = sorted([2 * i for i in sw["attention"]] + [2 * i + 1 for i in sw["mlp"]])
    assert units == list(range(units[0], units[0] + 4)), "sliding window drops a contiguous run of sub-blocks"
    block_space = DepthSpace(model, 0.34, mode="block")
    blocks = block_space.drops(sliding_window_cosine_candidate(block_space, residual_states(model, torch.randint(0, 128, (1, 16)), block_space)))
    assert blocks["attention"] == blocks["mlp"] and blocks["attention"][1] == blocks["attention"][0] + 1


def test_prefix_cache_budget_keeps_scores_and_bounds_the_bytes_held():
    model = tiny_model("llama")
    windows = torch.randint(0, 128, (6, 24))
    space = DepthSpace(model, 0.34)
    teacher = TeacherCache.build(model, windows, "topk", 32, progress=False)
    entry = 24 * model.config.hidden_size * 4  # one window's input to one layer, float32
    free = KLObjective(model, windows, teacher, space)
    tight = KLObjective(model, windows, teacher, space, cache_bytes=5 * entry + entry // 2)
    none = KLObjective(model, windows, teacher, space, cache_bytes=0)
    parent = space.candidate(attention=[3, 4], mlp=[4, 5])
    rng = random.Random(0)
    for gen in range(4):
        for obj in (free, tight, none):
            obj.set_parent(parent)
        kids = [mutate(parent, space.level_space, rng) for _ in range(5)]
        ids = rng.sample(range(6), 3)
        scores = [obj.score(kids + [parent], ids) for obj in (free, tight, none)]
        assert scores[0] == scores[1] == scores[2]
        assert tight.stats()["prefix_cache_bytes"] <= 5 * entry
        parent = kids[min(range(5), key=lambda i: scores[0][i])]
    stats = {name: obj.stats() for name, obj in (("free", free), ("tight", tight), ("none", none))}
    assert stats["free"]["prefix_cache_peak_bytes"] > 5 * entry >= stats["tight"]["prefix_cache_peak_bytes"] > 0
    assert stats["none"]["prefix_cache_peak_bytes"] == 0 and stats["tight"]["prefix_cache_budget_bytes"] == 5 * entry + entry // 2
    assert free.layers_run < tight.layers_run < none.layers_run  # a smaller cache recomputes more
    assert stats["tight"]["prefix_cache_spilled_bytes"] == 0  # a CPU model has no second tier


def test_prefix_reuse_gives_identical_scores_with_fewer_layers(arch):
    model = tiny_model(arch)
    windows = torch.randint(0, 128, (6, 24))
    space = DepthSpace(model, 0.34)
    teacher = TeacherCache.build(model, windows, "topk", 32, progress=False)
    fast = KLObjective(model, windows, teacher, space, reuse_prefix=True)
    slow = KLObjective(model, windows, teacher, space, reuse_prefix=False)
    parent = space.candidate(attention=[3, 4], mlp=[4, 5])
    rng = random.Random(0)
    for obj in (fast, slow):
        obj.set_parent(parent)
    for gen in range(4):
        kids = [mutate(parent, space.level_space, rng) for _ in range(5)]
        ids = rng.sample(range(6), 3)
        a, b = fast.score(kids + [parent], ids), slow.score(kids + [parent], ids)
        assert a == b
        parent = kids[min(range(5), key=lambda i: a[i])]
        fast.set_parent(parent)
        slow.set_parent(parent)
    assert fast.layers_run < slow.layers_run
    # exact accounting: once the parent has run on a window, a child whose first change is at
    # layer d runs only layers d..L-1 there
    fast.score([parent], [0])
    for d in range(6):
        child = list(parent)
        u = 2 * d  # attention unit of layer d: switch it with the attention unit of another layer
        other = next(2 * j for j in range(6) if j != d and parent[2 * j] != parent[u] and j > d) \
            if any(j > d and parent[2 * j] != parent[u] for j in range(6)) else None
        if other is None:
            continue
        child[u], child[other] = child[other], child[u]
        before = fast.layers_run
        fast.score([tuple(child)], [0])
        assert fast.layers_run - before == 6 - d
