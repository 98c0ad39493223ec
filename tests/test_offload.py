"""Sequential onloading: a level database built from a model whose blocks stay on disk (or in host
memory, built on a GPU) equals the one built from the model in memory."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_evo.compressors.calibrate import walk_blocks
from optimum_evo.compressors.database import LevelDatabase
from optimum_evo.compressors.offload import offloaded_model, resident_bytes


@pytest.fixture
def checkpoint(tmp_path, one_thread):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def windows():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def test_offloaded_model_holds_no_block_in_memory(checkpoint):
    model, path = checkpoint
    off = offloaded_model(path)
    assert all(p.is_meta for p in off.model.layers.parameters())
    assert off.lm_head.weight is off.model.embed_tokens.weight  # tied again after loading
    assert torch.equal(off.model.embed_tokens.weight, model.model.embed_tokens.weight)
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    assert resident_bytes(off) == resident_bytes(model) - 3 * block


def test_walk_onloads_one_block_at_a_time(checkpoint):
    model, path = checkpoint
    off = offloaded_model(path)
    seen = []
    for block in walk_blocks(off, windows(), progress=False, weights=path):
        seen.append([i for i, layer in enumerate(off.model.layers) if not any(p.is_meta for p in layer.parameters())])
        dense = model.model.layers[block.index]
        assert torch.equal(block.module.mlp.down_proj.weight, dense.mlp.down_proj.weight)
        block.hessians()
    assert seen == [[0], [1], [2]]
    assert all(p.is_meta for p in off.model.layers.parameters())  # dropped again afterwards


@pytest.mark.parametrize("kind,levels,settings", [
    ("quantization", [2, 4], {"group_size": 32}),
    ("quantization", [3], {"group_size": 32, "builder": "gptq-sequential"}),
    ("sparsity", [0.5], {}),
])
def test_database_from_disk_equals_database_in_memory(checkpoint, tmp_path, kind, levels, settings):
    model, path = checkpoint
    a = LevelDatabase.build(model, windows(), kind, levels, tmp_path / "a", settings=settings, progress=False)
    b = LevelDatabase.build(offloaded_model(path), windows(), kind, levels, tmp_path / "b", settings=settings,
                            progress=False, weights=path)
    assert len(a.manifest["modules"]) == 21
    for name, entry in a.manifest["modules"].items():
        assert b.manifest["modules"][name]["sha256"] == entry["sha256"], name
        assert b.manifest["modules"][name]["errors"] == entry["errors"]


def test_bad_offload_inputs_fail_early(checkpoint, tmp_path):
    model, path = checkpoint
    off = offloaded_model(path)
    with pytest.raises(ValueError, match="weights=<folder>"):
        next(iter(walk_blocks(off, windows(), progress=False)))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        offloaded_model(tmp_path)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="not this model's"):
        next(iter(walk_blocks(off, windows(), progress=False, weights=tmp_path / "other")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_database_built_on_cuda_from_host_memory(checkpoint, tmp_path):
    model, _ = checkpoint
    a = LevelDatabase.build(model, windows(), "quantization", [2, 4], tmp_path / "a", settings={"group_size": 32},
                            progress=False)
    b = LevelDatabase.build(model, windows(), "quantization", [2, 4], tmp_path / "b", settings={"group_size": 32},
                            progress=False, device="cuda")
    assert all(p.device.type == "cpu" for p in model.parameters())  # every block went back
    for name, entry in a.manifest["modules"].items():
        for level, err in entry["errors"].items():
            assert b.manifest["modules"][name]["errors"][level] == pytest.approx(err, rel=0.05, abs=1e-4), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefix_cache_spills_to_host_memory_on_cuda():
    import random

    from optimum_evo.fitness import KLObjective, TeacherCache
    from optimum_evo.methods.depth import DepthSpace
    from optimum_evo.search import mutate

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2)).eval().cuda()
    windows = torch.randint(0, 256, (4, 24), device="cuda")
    space = DepthSpace(model, 0.34)
    teacher = TeacherCache.build(model, windows, "topk", 32, progress=False)
    entry = 24 * 64 * 4
    free = KLObjective(model, windows, teacher, space)
    split = KLObjective(model, windows, teacher, space, cache_bytes=2 * entry, spill_bytes=3 * entry)
    parent = space.candidate(attention=[3, 4], mlp=[4, 5])
    rng = random.Random(0)
    for _ in range(3):
        for obj in (free, split):
            obj.set_parent(parent)
        kids = [mutate(parent, space.level_space, rng) for _ in range(4)]
        a, b = free.score(kids + [parent], [0, 1, 2]), split.score(kids + [parent], [0, 1, 2])
        assert a == pytest.approx(b, abs=1e-6)
        parent = kids[0]
    stats = split.stats()
    assert stats["prefix_cache_spilled_bytes"] > 0 and stats["prefix_cache_peak_bytes"] <= 5 * entry
    assert stats["prefix_cache_bytes"] - stats["prefix_cache_spilled_bytes"] <= 2 * entry
