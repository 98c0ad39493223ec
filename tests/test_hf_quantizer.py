"""from_pretrained(..., quantization_config=EvoPressConfig(...)) on tiny models: search on load, real
compressed storage, save -> reload with identical logits, dtypes, devices, loading without the plugin."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import optimum_evo
from optimum_evo import EvoPressConfig, EvoPressQuantLinear, check_evopress_model
from optimum_evo.integrations.transformers import EvoPressConfigError, EvoPressLoadError
from optimum_evo.decoder import DroppedAttention, DroppedMLP

CALIB = ["The committee met on Tuesday to discuss the new budget for the school district, and the members "
         "agreed that the library should stay open in the evening. " * 6] * 12
TARGETS = {"depth": 0.25, "sparsity": 0.5, "quantization": 3.0}


def char_tokenizer():
    """A 97-token character tokenizer, so tiny models can have a 128-entry vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate([chr(i) for i in range(32, 127)] + ["\n"])}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="\n")


def save_tiny(path, arch="llama", seed=0):
    torch.manual_seed(seed)
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(LlamaConfig(**kw)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw))
    with torch.no_grad():
        for name, p in model.model.layers.named_parameters():
            p.mul_(4.0 if p.dim() == 2 else 1.0)
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def tiny_config(kind, tmp_root, **overrides):
    kw = dict(compression=kind, target=TARGETS[kind], dataset=CALIB, generations=2, offspring=4, num_samples=4,
              seq_len=32, eval_windows=2, eval_seq_len=32, top_k=32, search_dtype="float32", progress=False,
              database_dir=str(tmp_root / f"db-{kind}"))
    if kind == "quantization":
        kw.update(levels=[2, 3, 4], group_size=32)
    if kind == "sparsity":
        kw.update(max_offset=2, sparsity_step=0.1)
    kw.update(overrides)
    return EvoPressConfig(**kw)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def compressed(tiny_dir, tmp_path_factory):
    """One search per compression kind (float32, CPU), saved once; shared by the tests below."""
    cache, root = {}, tmp_path_factory.mktemp("evopress")

    def get(kind):
        if kind not in cache:
            cfg = tiny_config(kind, root)
            model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=cfg, dtype=torch.float32)
            out = root / f"saved-{kind}"
            model.save_pretrained(out)
            cache[kind] = (model, out, cfg)
        return cache[kind]

    return get


IDS = torch.tensor([[41, 70, 77, 77, 80, 1, 88, 80, 83, 77, 69, 13, 1, 85, 73, 70]])


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids.to(model.device)).logits.float().cpu()


# ---------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, message", [
    (dict(compression="pruning"), "Unknown compression 'pruning'"),
    (dict(compression="depth", target=1.5), "target must be a fraction in (0, 1)"),
    (dict(compression="quantization", target=9.0, levels=[2, 3, 4]), "within the levels"),
    (dict(compression="quantization", target=3.0, levels=[0, 3]), "levels must be distinct bit widths"),
    (dict(dataset="wikitext2"), "dataset='wikitext2' is the evaluation text"),
    (dict(dataset=["", "  "]), "The dataset text is empty"),
    (dict(dataset=123), "dataset must be a name, a file path or a list of strings"),
    (dict(preset="slow"), "Unknown preset 'slow'"),
    (dict(eval_windows=-1), "eval_windows must be a non-negative integer"),
    (dict(num_samples=0), "num_samples must be a positive integer"),
    (dict(format_version=99), "Upgrade optimum-evo"),
    (dict(compression="sparsity", target=0.5, modules="(mlp"), "modules must be a regular expression"),
])
def test_invalid_configs_fail_at_construction(kwargs, message):
    with pytest.raises(EvoPressConfigError) as err:
        EvoPressConfig(**kwargs)
    assert message in str(err.value)


def test_config_serializes_a_whitelist_and_round_trips():
    tok = char_tokenizer()
    cfg = EvoPressConfig(compression="quantization", target=2.5, levels=[4, 2, 3], dataset=["some text " * 50],
                         tokenizer=tok, group_size=64)
    d = cfg.to_dict()
    json.dumps(d)  # nothing unserializable
    assert "tokenizer" not in d and d["quant_method"] == "evopress" and d["levels"] == [2, 3, 4]
    assert d["dataset"].startswith("<list of 1 texts")
    again = EvoPressConfig.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == {**d, "dataset": None}
    with pytest.raises(EvoPressConfigError, match="Unknown EvoPressConfig keys"):
        EvoPressConfig.from_dict({**d, "bits_per_weight": 3})


def test_registration_is_lazy_idempotent_and_guarded():
    code = textwrap.dedent("""
        import sys
        import optimum_evo.search
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        import optimum_evo
        from transformers import AutoModelForCausalLM  # registration happens when transformers loads it
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
        assert AUTO_QUANTIZER_MAPPING["evopress"].__name__ == "EvoPressHfQuantizer"
        assert AUTO_QUANTIZATION_CONFIG_MAPPING["evopress"].__name__ == "EvoPressConfig"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    from optimum_evo.integrations.transformers import EvoPressHfQuantizer, register
    register()
    register()
    assert AUTO_QUANTIZER_MAPPING["evopress"] is EvoPressHfQuantizer
    try:
        AUTO_QUANTIZER_MAPPING["evopress"] = type("OtherQuantizer", (EvoPressHfQuantizer,), {})
        with pytest.raises(RuntimeError, match="already registered"):
            register()
    finally:
        AUTO_QUANTIZER_MAPPING["evopress"] = EvoPressHfQuantizer


# ---------------------------------------------------------------------------------------- search on load
@pytest.mark.parametrize("kind", ["depth", "sparsity", "quantization"])
def test_search_on_load_then_save_reload_identical(kind, compressed):
    model, out, user_cfg = compressed(kind)
    qc = model.config.quantization_config
    assert qc is not user_cfg and user_cfg.profile is None  # the caller's config is not mutated
    assert qc.is_compressed and qc.metrics["search"]["generations"] == 2
    ev = qc.metrics["evaluation"]
    assert ev["dense"]["kl"] < 1e-6 < ev["evopress"]["kl"] and ev["windows"] == 2
    assert check_evopress_model(model) is qc

    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "evopress" and saved["profile"] == json.loads(json.dumps(qc.profile))
    assert "tokenizer" not in saved
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "generation_config.json",
                                              "README.md"}

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(reloaded.config.quantization_config, EvoPressConfig)
    assert torch.equal(logits(reloaded), logits(model))
    generated = reloaded.generate(IDS, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, IDS.shape[1] + 6)
    assert torch.equal(generated, model.generate(IDS, max_new_tokens=6, do_sample=False))
    check_evopress_model(reloaded)


def test_quantization_storage_is_packed_at_the_found_bits(compressed):
    model, out, _ = compressed("quantization")
    modules = model.config.quantization_config.profile["modules"]
    assert len(modules) == 4 * 7 and set(modules.values()) <= {2, 3, 4}
    weights = packed = 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name, bits in modules.items():
            assert f"{name}.weight" not in keys  # no dense copy on disk
            codes = f.get_tensor(f"{name}.qweight")
            out_f, in_f = model.get_submodule(name).out_features, model.get_submodule(name).in_features
            assert codes.dtype == torch.uint8 and codes.numel() == (out_f * in_f * bits + 7) // 8
            assert f.get_tensor(f"{name}.scales").dtype == torch.float16
            weights += out_f * in_f
            packed += sum(f.get_tensor(f"{name}.{k}").numel() * f.get_tensor(f"{name}.{k}").element_size()
                          for k in ("qweight", "scales", "qzeros"))
    average = sum(bits * model.get_submodule(n).in_features * model.get_submodule(n).out_features
                  for n, bits in modules.items()) / weights
    assert average == pytest.approx(3.0)
    # codes: 3/16 of bf16; fp16 scale + packed zero per 32 weights: (16 + 3) / 32 bits more per weight
    ratio = packed / (2 * weights)
    assert ratio == pytest.approx((3.0 + 19 / 32) / 16, rel=0.02)
    # the layer computes what the database level holds (its dequantized weight)
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(layer, EvoPressQuantLinear) and layer.weight is None


def test_sparsity_keeps_exact_zeros_at_the_found_levels(compressed):
    model, out, _ = compressed("sparsity")
    profile = model.config.quantization_config.profile
    total = zeros = 0
    for name, level in profile["modules"].items():
        w = model.get_submodule(name).weight
        assert int((w == 0).sum()) == round(level * w.numel())
        total, zeros = total + w.numel(), zeros + int((w == 0).sum())
    assert zeros / total == pytest.approx(0.5, abs=1e-3) == profile["sparsity"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name in profile["modules"]:
        assert torch.equal(reloaded.get_submodule(name).weight, model.get_submodule(name).weight)


def test_sparse_checkpoint_stores_bitmask_and_values(compressed, tmp_path):
    """The sparse linears are stored as a bitmask of the kept weights plus their values: the checkpoint
    is smaller than the dense model's and reloads bit-identically (tested above)."""
    from optimum_evo.exporters import export_dense

    model, out, _ = compressed("sparsity")
    kept = model.config.quantization_config.profile["kept"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name, n in kept.items():
            assert f"{name}.weight" not in keys and f.get_tensor(f"{name}.weight_values").numel() == n
            assert f.get_tensor(f"{name}.weight_mask").dtype == torch.uint8
    export_dense(model, tmp_path / "dense")  # the same model stored dense, for comparison
    assert (out / "model.safetensors").stat().st_size < 0.8 * (tmp_path / "dense" / "model.safetensors").stat().st_size
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded.get_submodule(next(iter(kept)))).__name__ == "EvoPressSparseLinear"
    assert torch.equal(logits(reloaded), logits(model))


def test_depth_with_sub_block_drops_reloads_them(tiny_dir, tmp_path):
    """A hand-made profile mixing whole-block removal and attention-/MLP-only drops (a search on a
    random model may not produce one) goes through save/reload with the stand-ins rebuilt."""
    from optimum_evo.integrations.hub import attach_hub_methods
    from optimum_evo.integrations.transformers.quantizer import EvoPressHfQuantizer
    from optimum_evo.methods.depth import DepthSpace

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    space = DepthSpace(model, 0.5, "separate")
    record = space.compress(model, space.candidate(attention=[0, 2], mlp=[2, 3]))
    assert record["removed_layers"] == [2] and record["dropped_attention"] == [0] and record["dropped_mlp"] == [2]
    cfg = EvoPressConfig(compression="depth", target=0.5, profile={"mode": "separate", **record})
    model.config.quantization_config = cfg
    model.hf_quantizer = EvoPressHfQuantizer(cfg, pre_quantized=True)
    attach_hub_methods(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 3
    assert isinstance(reloaded.model.layers[0].self_attn, DroppedAttention)
    assert isinstance(reloaded.model.layers[2].mlp, DroppedMLP)
    assert torch.equal(logits(reloaded), logits(model))
    # the KV cache stays aligned through the dropped attention of layer 0
    assert torch.equal(reloaded.generate(IDS, max_new_tokens=5, do_sample=False),
                       model.generate(IDS, max_new_tokens=5, do_sample=False))


def test_packed_layers_with_bias_and_bfloat16(tmp_path):
    """Qwen2 (q/k/v biases) loaded in bfloat16 and searched in float32 (search_dtype): the bfloat16
    model gets packed layers computing in bfloat16 with float16 scales, and reloads identically."""
    path = save_tiny(tmp_path / "qwen2", arch="qwen2")
    cfg = tiny_config("quantization", tmp_path, eval_windows=0)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and "evaluation" not in model.config.quantization_config.metrics
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, EvoPressQuantLinear) and q.bias is not None and q.bias.dtype == torch.bfloat16
    assert q.compute_dtype == torch.bfloat16 and q.scales.dtype == torch.float16
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert torch.equal(q.bias, dense.model.layers[0].self_attn.q_proj.bias)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    assert reloaded.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    assert torch.equal(logits(reloaded), logits(model))
    f32 = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert (logits(f32) - logits(model)).abs().max() < 0.1 * logits(f32).abs().max()


def test_search_on_load_scores_the_users_model_itself(tiny_dir, tmp_path, monkeypatch):
    """A bfloat16 model searched in bfloat16: no second copy of the model is loaded or made (the
    teacher cache, the objective, the level database and the evaluation all run on the user's
    model, in its dtype), and the result is evaluated in that dtype."""
    import copy

    import optimum_evo.loading
    from torch import nn

    deepcopy = copy.deepcopy

    def no_model_copies(obj, *args, **kwargs):
        assert not isinstance(obj, nn.Module), "the search made a copy of the model"
        return deepcopy(obj, *args, **kwargs)

    def no_loads(*args, **kwargs):
        raise AssertionError("the search loaded a second copy of the model")

    monkeypatch.setattr(optimum_evo.loading, "load_model", no_loads)
    monkeypatch.setattr(copy, "deepcopy", no_model_copies)
    cfg = tiny_config("quantization", tmp_path, search_dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=cfg, dtype=torch.bfloat16)
    assert isinstance(model.model.layers[0].mlp.up_proj, EvoPressQuantLinear) and model.dtype == torch.bfloat16
    metrics = model.config.quantization_config.metrics
    assert metrics["search"]["search_dtype"] == "bfloat16" and metrics["evaluation"]["dtype"] == "bfloat16"
    assert metrics["evaluation"]["evopress"]["perplexity"] > 1


def test_auto_search_dtype_is_the_models_own_on_an_accelerator(monkeypatch):
    """search_dtype="auto" on a model on an accelerator takes the model's dtype (no copy, no CPU
    timing); on the CPU it times float32 against bfloat16."""
    from types import SimpleNamespace

    from optimum_evo.pipeline import stages

    def timed():
        raise AssertionError("timed the CPU's dtypes for a model on an accelerator")

    monkeypatch.setattr(stages, "fastest_dtype", timed)
    on = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda", 0))]),
                         dtype=torch.float16)
    ctx = SimpleNamespace(args=SimpleNamespace(search_dtype="auto"), model=on, search_dtype=None)
    assert stages.local_search_dtype(ctx) == torch.float16
    monkeypatch.setattr(stages, "fastest_dtype", lambda: torch.bfloat16)
    cpu = SimpleNamespace(args=SimpleNamespace(search_dtype="auto"), model=torch.nn.Linear(2, 2), search_dtype=None)
    assert stages.local_search_dtype(cpu) == torch.bfloat16
    pinned = SimpleNamespace(args=SimpleNamespace(search_dtype="float32"), model=on, search_dtype=None)
    assert stages.local_search_dtype(pinned) == torch.float32


def test_search_on_load_through_accelerate_hooks_equals_the_plain_search(compressed, tiny_dir, tmp_path):
    """A model dispatched by accelerate (the hooks of a multi-device map, here all on the CPU) is searched
    as it is: the same profile and the same compressed logits as the plain model."""
    from accelerate import dispatch_model

    from optimum_evo.integrations.transformers.quantizer import compress_on_load

    import copy

    plain, _, cfg = compressed("quantization")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    blocks = {f"model.layers.{i}": "cpu" for i in range(model.config.num_hidden_layers)}
    dispatch_model(model, device_map={"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
                                      "lm_head": "cpu", **blocks}, force_hooks=True)
    assert hasattr(model.model.layers[1], "_hf_hook")
    hooked = copy.copy(cfg)  # the same settings (and level database)
    compress_on_load(model, hooked)
    assert hooked.profile == plain.config.quantization_config.profile
    assert torch.equal(logits(model), logits(plain))


def _offload_to_host(model, host: list) -> None:
    """What accelerate's ``dispatch_model`` does for a map with ``"cpu"`` entries next to a GPU (the
    weights of ``host`` kept in its weights map, the modules on meta), with the CPU as the execution
    device, so that it runs here."""
    from accelerate.hooks import attach_align_device_hook_on_blocks
    from accelerate.utils import OffloadedWeightsLoader, extract_submodules_state_dict

    names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head",
             *(f"model.layers.{i}" for i in range(model.config.num_hidden_layers))]
    state = extract_submodules_state_dict(model.state_dict(), host)
    attach_align_device_hook_on_blocks(model, execution_device={**dict.fromkeys(names, "cpu"), "": "cpu"},
                                       offload={n: n in host for n in names},
                                       weights_map=OffloadedWeightsLoader(state_dict=state), tied_params_map={})


@pytest.mark.parametrize("kind", ["quantization", "sparsity", "depth"])
def test_search_on_load_with_blocks_offloaded_to_host_memory(compressed, tiny_dir, tmp_path, kind):
    """Blocks that accelerate offloaded to host memory (meta tensors in the modules) are searched: they
    get their weights back as host-memory parameters run by a HostOffloadHook, the search finds the
    same profile and the same compressed logits as on the plain model, and the saved model reloads."""
    import copy

    from optimum_evo.compressors.offload import HostOffloadHook
    from optimum_evo.integrations.transformers.quantizer import compress_on_load, mark_compressed

    plain, _, cfg = compressed(kind)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    _offload_to_host(model, ["model.layers.1", "model.layers.2"])
    assert model.model.layers[1].mlp.up_proj.weight.is_meta
    hooked = copy.copy(cfg)  # the same settings (and level database)
    compress_on_load(model, hooked)
    assert hooked.profile == plain.config.quantization_config.profile
    for i in (1, 2):
        layer = model.model.layers[i]
        assert isinstance(layer._hf_hook, HostOffloadHook)
        assert not any(t.is_meta for t in [*layer.parameters(), *layer.buffers()])
    kinds = [[type(sub) for sub in lm.model.layers[1].modules()] for lm in (model, plain)]
    assert kinds[0] == kinds[1]  # the compressed modules (packed, sparse, dropped sub-blocks) of the plain search
    assert torch.equal(logits(model), logits(plain))
    mark_compressed(model, hooked)  # what from_pretrained does around compress_on_load
    model.save_pretrained(tmp_path / "saved")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")), logits(plain))


def test_search_on_load_with_the_whole_model_offloaded_to_host_memory(compressed, tiny_dir):
    """accelerate's cpu_offload (every module's weights in a plain dict of host tensors, the modules
    on meta) is searched as well: the same profile and logits as the plain search."""
    import copy

    from accelerate import cpu_offload

    from optimum_evo.integrations.transformers.quantizer import compress_on_load

    plain, _, cfg = compressed("quantization")
    model = cpu_offload(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), torch.device("cpu"))
    assert model.model.embed_tokens.weight.is_meta
    hooked = copy.copy(cfg)
    compress_on_load(model, hooked)
    assert hooked.profile == plain.config.quantization_config.profile
    assert torch.equal(logits(model), logits(plain))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_host_offload_hook_runs_on_cuda_and_keeps_the_host_weights():
    """The hook moves the weights and the inputs to the execution device for the forward and points
    the parameters at their host tensors afterwards."""
    from accelerate.hooks import add_hook_to_module

    from optimum_evo.compressors.offload import HostOffloadHook

    linear = torch.nn.Linear(4, 3)
    host = linear.weight.data
    add_hook_to_module(linear, HostOffloadHook("cuda"))
    out = linear(torch.ones(2, 4))
    assert out.device.type == "cuda" and torch.allclose(out.cpu(), torch.nn.functional.linear(
        torch.ones(2, 4), host, linear.bias))
    assert linear.weight.data is host and linear.bias.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_search_on_load_with_cuda_and_host_offload(tiny_dir, tmp_path):
    """from_pretrained with a device_map that keeps two blocks in host memory next to the GPU: the
    search runs, those blocks stay in host memory compressed, the others are on the GPU."""
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0,
                  **{f"model.layers.{i}": "cpu" if i in (1, 2) else 0 for i in range(4)}}
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=tiny_config("quantization", tmp_path),
                                                 device_map=device_map, dtype=torch.bfloat16)
    assert model.model.layers[1].mlp.up_proj.qweight.device.type == "cpu"
    assert model.model.layers[3].mlp.up_proj.qweight.device.type == "cuda"
    assert model.config.quantization_config.metrics["evaluation"]["evopress"]["perplexity"] > 1
    assert torch.isfinite(logits(model)).all()


def test_disk_offloaded_models_are_refused_when_compressing_on_load(tiny_dir, tmp_path):
    """Weights offloaded to disk cannot take the search's levels: a map with 'disk' entries is refused
    before loading, a disk-offloaded model before searching, both naming the fix; maps over several
    accelerators or with host memory are accepted."""
    from accelerate import dispatch_model

    from optimum_evo.integrations.transformers.quantizer import EvoPressHfQuantizer, compress_on_load

    quantizer = EvoPressHfQuantizer(tiny_config("depth", tmp_path), pre_quantized=False)
    quantizer.validate_environment(device_map={"model.layers.0": 0, "model.layers.1": 1})
    quantizer.validate_environment(device_map={"model.layers.0": 0, "model.layers.1": "cpu"})
    with pytest.raises(ValueError, match="disk"):
        quantizer.validate_environment(device_map={"model.layers.0": 0, "model.layers.1": "disk"})
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    blocks = {f"model.layers.{i}": "disk" if i == 1 else "cpu" for i in range(model.config.num_hidden_layers)}
    dispatch_model(model, device_map={"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
                                      "lm_head": "cpu", **blocks}, offload_dir=str(tmp_path / "offload"))
    assert model.model.layers[1].mlp.up_proj.weight.is_meta
    with pytest.raises(ValueError, match="offloaded to disk.*device_map without 'disk'"):
        compress_on_load(model, tiny_config("depth", tmp_path))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_search_on_load_spread_over_two_gpus(tiny_dir, tmp_path):
    blocks = {f"model.layers.{i}": i // 2 for i in range(4)}
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 1, "model.norm": 1, "lm_head": 1, **blocks}
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=tiny_config("quantization", tmp_path),
                                                 device_map=device_map, dtype=torch.bfloat16)
    assert model.model.layers[3].mlp.up_proj.qweight.device == torch.device("cuda", 1)
    assert model.config.quantization_config.metrics["evaluation"]["evopress"]["perplexity"] > 1
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("device_map", ["cpu", "auto", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_reload_with_device_map(compressed, device_map):
    model, out, _ = compressed("quantization")
    reloaded = AutoModelForCausalLM.from_pretrained(out, device_map=device_map)  # "auto": accelerate places it
    expected = "cpu" if device_map == "cpu" or not torch.cuda.is_available() else "cuda"
    layer = reloaded.model.layers[0].mlp.up_proj
    assert layer.qweight.device.type == expected and layer.scales.device.type == expected
    assert torch.allclose(logits(reloaded), logits(model), atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", ["depth", "sparsity", "quantization"])
def test_search_on_load_with_cuda_model(tiny_dir, tmp_path, kind):
    """The whole run on the GPU, in the model's dtype: search_dtype="auto" takes bfloat16 there, the
    evaluation runs on the model, nothing moves to the CPU."""
    cfg = tiny_config(kind, tmp_path, search_dtype="auto", lora_correction=2 if kind != "depth" else 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=cfg, device_map="cuda",
                                                 dtype=torch.bfloat16)
    metrics = model.config.quantization_config.metrics
    assert metrics["search"]["search_dtype"] == "bfloat16" and metrics["evaluation"]["dtype"] == "bfloat16"
    assert all(p.device.type == "cuda" for p in model.parameters())
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map="cuda", dtype=torch.bfloat16)
    if cfg.lora_correction:
        return  # the adapter is saved beside the model (its reload is tested on the CPU)
    assert torch.equal(logits(reloaded), logits(model))


def test_config_of_compressed_checkpoint_needs_a_profile():
    from optimum_evo.integrations.transformers.quantizer import EvoPressHfQuantizer

    with pytest.raises(EvoPressConfigError, match="without a profile"):
        EvoPressHfQuantizer(EvoPressConfig(), pre_quantized=True)


# ---------------------------------------------------------------------------------------- no silent garbage
def test_loading_without_the_plugin_warns_randomises_and_is_caught(compressed, tmp_path):
    """Documents transformers' behaviour: an 'evopress' checkpoint loaded without `import optimum_evo`
    only warns and randomly initialises the packed weights' places. check_evopress_model catches it,
    and our save_pretrained / push_to_hub refuse such a model."""
    model, out, _ = compressed("quantization")
    code = textwrap.dedent(f"""
        import torch, warnings
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
        logging.set_verbosity_warning()
        ids = torch.tensor({IDS.tolist()})
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        import sys
        assert "optimum_evo" not in sys.modules
        with torch.inference_mode():
            torch.save(model(ids).logits, {str(tmp_path / "logits.pt")!r})
        import optimum_evo
        try:
            optimum_evo.check_evopress_model(model)
        except optimum_evo.EvoPressLoadError as e:
            print("CAUGHT:", e)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Unknown quantization type, got evopress" in run.stderr + run.stdout
    assert "CAUGHT:" in run.stdout and "import optimum_evo" in run.stdout
    garbage = torch.load(tmp_path / "logits.pt")
    assert not torch.allclose(garbage, logits(model), atol=1e-2)


def test_check_refuses_a_model_with_missing_modules(compressed):
    import copy

    from torch import nn

    model, _, _ = compressed("quantization")
    broken = copy.deepcopy(model)
    broken.model.layers[0].mlp.up_proj = nn.Linear(64, 128, bias=False)
    with pytest.raises(EvoPressLoadError, match="should be a .-bit EvoPressQuantLinear"):
        check_evopress_model(broken)
    assert check_evopress_model(AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4))) is None
    assert optimum_evo.EvoPressLoadError is EvoPressLoadError
