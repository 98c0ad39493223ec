"""Shared fixtures: tiny randomly initialised decoder models of several architectures; an
intercepted Hugging Face Hub (``hub``)."""

import types

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import (
    Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Qwen3Config, Qwen3ForCausalLM,
)

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def tiny_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kw = {**COMMON, **overrides}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **kw))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=16, **kw))
    elif arch == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"] * (kw["num_hidden_layers"] // 3),
                                                   **kw))
    else:
        raise ValueError(arch)
    # Random init makes near-uniform outputs; scale up so candidates differ clearly.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


ARCHS = ["llama", "qwen3", "mistral", "gemma3"]

#: calibration text of the command-line tests (their ``--dataset`` file)
CALIB = ("The committee met on Tuesday to discuss the new budget for the school district. " * 40 + "\n") * 20


def save_tiny_llama(path, hidden_size: int, intermediate_size: int, num_hidden_layers: int, scale: float):
    """Save a tiny random Llama with SmolLM2's tokenizer in ``path`` for command-line runs: its decoder
    weights times ``scale`` (so candidates differ clearly), ``CALIB`` in ``path.parent / "calib.txt"``."""
    from transformers import AutoTokenizer

    from optimum_evo.embedded_models import embedded_model_path

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                         num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=True))
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.mul_(scale)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_path("smollm2")).save_pretrained(path)
    (path.parent / "calib.txt").write_text(CALIB)
    return path


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def one_thread():
    """Tiny models run on one thread: on shared 2-core machines several threads per process
    oversubscribe the cores (up to 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hub(monkeypatch):
    """Intercepted Hub: records created repos and every committed file's bytes."""
    calls = types.SimpleNamespace(repos=[], commits=[])

    def create_repo(self, repo_id, *args, **kwargs):
        calls.repos.append((repo_id, kwargs))
        return types.SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, *args, **kwargs):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = open(src, "rb").read() if isinstance(src, str) else bytes(src)
        calls.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return types.SimpleNamespace(oid="0" * 40, commit_url=f"https://hub.invalid/{repo_id}")

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted for something other than create_repo / create_commit")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", no_network)
    return calls
