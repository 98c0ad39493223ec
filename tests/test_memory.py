"""The resource estimate made before a run: its numbers match what the run allocates, it is
printed and recorded, and a run that cannot fit stops before any work."""

import pytest
import torch

from conftest import tiny_model
from optimum_evo import SearchArguments
from optimum_evo.fitness import TeacherCache
from optimum_evo.methods import get_method, layerwise
from optimum_evo.pipeline import memory

ARGS = dict(num_samples=8, seq_len=32, top_k=16, search_dtype="float32")


def needs_by_name(needs):
    return {x.what.split(" (")[0]: x for x in needs}


def test_the_estimate_matches_the_allocations():
    model = tiny_model("llama", num_hidden_layers=2)
    args = SearchArguments(compression="quantization", target=3.0, levels=[2, 3, 4], group_size=32, **ARGS)
    needs = needs_by_name(memory.estimate(args, model, get_method("quantization")))
    windows = torch.randint(0, 128, (8, 32))
    teacher = TeacherCache.build(model, windows, "topk", 16, progress=False)
    built = sum(t.numel() * t.element_size() for t in (teacher.values, teacher.indices, teacher.rest))
    assert needs["teacher cache"].bytes == built
    assert needs["prefix cache"].bytes == 8 * 32 * 64 * 4 * 2  # windows x tokens x hidden x float32 x layers
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    numel = sum(m.weight.numel() for m in linears)
    assert needs["level weights"].bytes == numel * 4 * 3 and needs["dense copies of the searched linears"].bytes == numel * 4
    # the database: codes plus a float16 scale and a packed zero per group of 32, per level
    assert needs["level database"].where == "disk"
    assert needs["level database"].bytes == int(numel * sum(b / 8 + (2 + b / 8) / 32 for b in (2, 3, 4)))
    # the database build: one block at a time; its activations (in and out, one tensor each) grow with the windows
    build = needs["database build"]
    assert build.where == "memory" and build.device is None
    more = needs_by_name(memory.estimate(SearchArguments(**{**args.to_dict(), "num_samples": 16}), model,
                                         get_method("quantization")))
    activations = 8 * 32 * 64 * 4  # 8 more windows x tokens x hidden x float32
    overhead = layerwise.BUILD_OVERHEAD
    assert more["database build"].bytes - build.bytes == pytest.approx(overhead * 2 * activations, abs=2)
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    assert build.bytes > overhead * (block + 2 * activations)
    # builders that carry one calibration stream per level hold those too
    streams = needs_by_name(memory.estimate(SearchArguments(**{**args.to_dict(), "builder": "gptq-sequential"}), model,
                                            get_method("quantization")))
    assert streams["database build"].bytes - build.bytes == pytest.approx(overhead * 3 * activations, abs=2)
    # bfloat16 search of a float32 model: a copy of the model; no prefix reuse: no prefix cache
    args = SearchArguments(compression="depth", target=0.25, reuse_prefix=False, **{**ARGS, "search_dtype": "bfloat16"})
    needs = needs_by_name(memory.estimate(args, model, get_method("depth")))
    assert "prefix cache" not in needs and "level weights" not in needs
    assert needs["search model"].bytes == memory.model_bytes(model) // 2
    assert memory.available_memory(torch.device("cpu")) > 0


def test_a_run_that_cannot_fit_stops_before_any_work(monkeypatch, tmp_path, capsys):
    from test_hf_quantizer import save_tiny

    from optimum_evo.pipeline import run_search

    path = save_tiny(tmp_path / "tiny")
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**10)  # 1 KiB free
    args = SearchArguments(model=str(path), compression="depth", target=0.25, output_dir=str(tmp_path / "out"),
                           dataset="sotu", **ARGS)
    with pytest.raises(memory.InsufficientMemoryError) as err:
        run_search(args)
    message = str(err.value)
    assert "\n" not in message and "only 0.00 GB is free" in message
    assert "num_samples, seq_len or top_k" in message and "reuse_prefix=False" in message
    assert isinstance(err.value, ValueError)  # the command line reports it as a one-line error
    assert "estimated need" in capsys.readouterr().err
    assert not (tmp_path / "out" / "result.json").exists()


def test_the_report_records_the_estimate(tmp_path):
    from test_hf_quantizer import CALIB, save_tiny

    from optimum_evo.pipeline import run_search

    path = save_tiny(tmp_path / "tiny")
    report = run_search(SearchArguments(model=str(path), compression="depth", target=0.25, dataset=[CALIB[0]],
                                        generations=1, offspring=2, num_samples=2, seq_len=16, eval_windows=0, top_k=8,
                                        search_dtype="float32", progress=False, save_model=False,
                                        output_dir=str(tmp_path / "out")))
    estimate = {x["what"].split(" (")[0]: x["bytes"] for x in report["resources_estimate"]}
    assert estimate["teacher cache"] == 2 * 16 * (8 * 8 + 4)


def test_the_prefix_cache_keeps_to_its_budget_in_a_run(tmp_path):
    from test_hf_quantizer import CALIB, save_tiny

    from optimum_evo.pipeline import run_search

    path = save_tiny(tmp_path / "tiny")
    common = dict(model=str(path), compression="depth", target=0.25, dataset=[CALIB[0]], generations=3, offspring=4,
                  num_samples=4, seq_len=16, eval_windows=0, top_k=8, search_dtype="float32", progress=False,
                  save_model=False)
    free = run_search(SearchArguments(**common, output_dir=str(tmp_path / "a")))
    entry = 16 * 64 * 4  # one window's input to one layer of the tiny model (hidden 64, float32)
    tight = run_search(SearchArguments(**common, prefix_cache_size=str(3 * entry), output_dir=str(tmp_path / "b")))
    assert tight["search"]["work"]["prefix_cache_budget_bytes"] == 3 * entry
    assert 0 < tight["search"]["work"]["prefix_cache_peak_bytes"] <= 3 * entry < free["search"]["work"]["prefix_cache_peak_bytes"]
    assert tight["search"]["work"]["decoder_layer_forwards"] > free["search"]["work"]["decoder_layer_forwards"]
    assert tight["profile"] == free["profile"]  # the same search: only the recomputation differs
    assert any("budget" in x["what"] for x in tight["resources_estimate"] if x["what"].startswith("prefix cache"))
    with pytest.raises(ValueError, match="prefix_cache_size must be a size"):
        SearchArguments(**common, prefix_cache_size="lots")


def test_a_database_build_on_another_device_is_checked_against_that_device(monkeypatch):
    """``database_device``: the build's working memory is counted on that device, and a build that
    does not fit there stops the run early, naming the device and the setting."""
    model = tiny_model("llama", num_hidden_layers=2)
    args = SearchArguments(compression="quantization", target=3.0, levels=[2, 3, 4], group_size=32, **ARGS)
    args.database_device = "cuda:0"  # as validated on a machine with a GPU
    needs = memory.estimate(args, model, get_method("quantization"))
    build = needs_by_name(needs)["database build"]
    assert build.device == "cuda:0"
    assert "memory (cuda:0)" in memory.format_needs(needs)
    free = {"cpu": 2**40, "cuda": build.bytes // 2}
    monkeypatch.setattr(memory, "available_memory", lambda device: free[device.type])
    with pytest.raises(memory.InsufficientMemoryError, match=r"on cuda:0 .*database build .*num_samples or seq_len"):
        memory.check(args, model, get_method("quantization"))
    free["cuda"] = 2**40
    assert memory.check(args, model, get_method("quantization")) == needs


def test_host_memory_items_are_charged_to_the_host_for_a_model_on_an_accelerator(monkeypatch):
    """The teacher cache and the decoded levels live in host memory whatever the model's device: for a
    model on an accelerator they are checked against the host's free memory, not the device's."""
    model = tiny_model("llama", num_hidden_layers=2)
    args = SearchArguments(compression="quantization", target=3.0, levels=[2, 3, 4], group_size=32, **ARGS)
    method = get_method("quantization")
    on_cpu = needs_by_name(memory.estimate(args, model, method))
    assert on_cpu["teacher cache"].device is None and on_cpu["level weights"].device is None
    model.to("meta")  # stands for an accelerator: a device that is not the host
    away = needs_by_name(memory.estimate(args, model, method))
    assert away["teacher cache"].device == "cpu" and away["level weights"].device == "cpu"
    assert away["dense copies of the searched linears"].device is None and away["prefix cache"].device is None
    assert {k: v.bytes for k, v in away.items()} == {k: v.bytes for k, v in on_cpu.items()}
    host = away["teacher cache"].bytes + away["level weights"].bytes
    monkeypatch.setattr(memory, "available_memory", lambda d: host if d.type == "cpu" else None)
    with pytest.raises(memory.InsufficientMemoryError, match="on cpu .*level weights"):
        memory.check(args, model, method)
    monkeypatch.setattr(memory, "available_memory", lambda d: 2 * host if d.type == "cpu" else None)
    assert memory.check(args, model, method)
