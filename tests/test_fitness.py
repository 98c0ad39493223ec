"""Teacher cache, KL divergence and perplexity."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from optimum_evo.fitness import TeacherCache, evaluate, window_kl
from optimum_evo.methods.depth import DepthSpace


@pytest.fixture
def setup():
    model = tiny_model("llama")
    windows = torch.randint(0, 128, (3, 20))
    return model, windows


def reference_kl(model, student, ids):
    with torch.inference_mode():
        p = F.log_softmax(model(input_ids=ids).logits.float(), -1)
        q = F.log_softmax(student(input_ids=ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_full_kl_matches_direct_computation(setup):
    model, windows = setup
    teacher = TeacherCache.build(model, windows, "full", progress=False)
    assert window_kl(model, windows[0], teacher, 0) == pytest.approx(0.0, abs=1e-3)
    import copy
    student = copy.deepcopy(model)
    space = DepthSpace(student, 0.34)
    space.apply(student, space.candidate(attention=[1, 2], mlp=[3, 4]))
    expected = reference_kl(model, student, windows[1:2])
    assert window_kl(student, windows[1], teacher, 1) == pytest.approx(expected, rel=2e-3)
    # top-K KL is the KL of the coarsened distributions: a lower bound, exact when K = V
    topk = TeacherCache.build(model, windows, "topk", top_k=16, progress=False)
    assert 0 < window_kl(student, windows[1], topk, 1) < expected
    exact = TeacherCache.build(model, windows, "topk", top_k=128, progress=False)
    assert window_kl(student, windows[1], exact, 1) == pytest.approx(expected, rel=1e-4)


def test_bytes_per_token(setup):
    model, windows = setup
    assert TeacherCache.build(model, windows, "topk", top_k=32, progress=False).bytes_per_token == 8 * 32 + 4
    assert TeacherCache.build(model, windows, "full", progress=False).bytes_per_token == 2 * 128


def test_teacher_cache_roundtrip_and_staleness(setup, tmp_path):
    model, windows = setup
    teacher = TeacherCache.build(model, windows, "topk", top_k=8, progress=False)
    manifest = {"model": "tiny", "windows": "abc"}
    teacher.save(tmp_path, manifest)
    loaded = TeacherCache.load(tmp_path, manifest)
    assert torch.equal(loaded.values, teacher.values) and torch.equal(loaded.indices, teacher.indices)
    assert TeacherCache.load(tmp_path, {"model": "tiny", "windows": "other"}) is None  # stale
    (tmp_path / "teacher.safetensors").write_bytes(b"garbage")
    assert TeacherCache.load(tmp_path, manifest) is None  # corrupt


def test_perplexity_matches_transformers_loss(setup):
    model, windows = setup
    with torch.inference_mode():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    result = evaluate(model, windows, progress=False)
    assert result["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)
    assert result["tokens"] == 3 * 19


def test_evaluate_accepts_peft_models():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    teacher = TeacherCache.build(model, windows, "full", progress=False)
    dense = evaluate(model, windows, teacher, progress=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    same = evaluate(peft_model, windows, teacher, progress=False)  # lora_B starts at zero
    assert same["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-5) and same["kl"] < 1e-6
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert evaluate(peft_model, windows, teacher, progress=False)["kl"] > 1e-3  # the adapters are applied


def test_evaluate_per_window_means(setup):
    import copy

    model, windows = setup
    teacher = TeacherCache.build(model, windows, "full", progress=False)
    student = copy.deepcopy(model)
    space = DepthSpace(student, 0.34)
    space.apply(student, space.candidate(attention=[1, 2], mlp=[3, 4]))
    with torch.inference_mode():
        losses = [float(student(input_ids=w[None], labels=w[None]).loss) for w in windows]
    result = evaluate(student, windows, teacher, progress=False, per_window=True)
    assert result["window_nll"] == pytest.approx(losses, rel=1e-4)
    assert result["window_kl"] == pytest.approx(
        [window_kl(student, w, teacher, i) for i, w in enumerate(windows)], rel=1e-5)
    assert sum(result["window_kl"]) / 3 == pytest.approx(result["kl"], rel=1e-6)
    assert "window_nll" not in evaluate(student, windows, teacher, progress=False)
