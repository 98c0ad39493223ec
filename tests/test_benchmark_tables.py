"""Benchmark scripts: the layer-wise doc writer keeps sections of runs whose output folder is gone;
the depth benchmark's in-domain diagnostic never sees the evaluated tokens."""

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _benchmark(name: str):
    """Import a script of ``benchmarks/`` as a module."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def _writer():
    return _benchmark("layerwise_smollm2")


def _report(kind, target, ppl):
    result = {"perplexity": ppl, "kl": 1.0}
    result.update({"sparsity": target} if kind == "sparsity" else {"average_bits": target, "effective_bits": target + 0.16})
    return {"compression": kind, "arguments": {"target": target},
            "results": {"dense": {"perplexity": 29.0, "kl": 0.0}, "evopress": result},
            "database": {"build_seconds": 1.0, "disk_bytes": 2e6, "bytes_per_weight": {"per-module": 0.74}},
            "search": {"generations": 3, "tokens": 1e6},
            "timings": {"search_seconds": 1, "teacher_seconds": 1, "baseline_seconds": 0, "random_baseline_seconds": 1},
            "baseline_settings": {}}


def _run(root: Path, kind: str, target: float, ppl: float) -> None:
    out = root / f"{kind}-{target}"
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps(_report(kind, target, ppl)))
    (out / "benchmark.json").write_text(json.dumps({"command": f"bench {kind} {target}", "date": "d", "machine": "m"}))


def test_write_doc_merges_new_runs_with_kept_sections(tmp_path):
    writer = _writer()
    doc = tmp_path / "bench.md"
    first, second = tmp_path / "machine1", tmp_path / "machine2"
    _run(first, "sparsity", 0.7, 240.0)
    _run(first, "quantization", 3.0, 77.0)
    writer.write_doc(doc, first, "smollm2")
    doc.write_text(doc.read_text() + "Notes kept.\n")
    # A later machine has only its own run (0.5) and a re-run of 0.7 with a new result.
    _run(second, "sparsity", 0.5, 40.0)
    _run(second, "sparsity", 0.7, 230.0)
    writer.write_doc(doc, second, "smollm2")
    text = doc.read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## quantization, target 3.0", "## sparsity, target 0.5", "## sparsity, target 0.7"]
    assert "| 3.0 | evopress | 77.00 |" in text  # kept from the first machine
    assert "| 0.7 | evopress | 230.00 |" in text and "240.00" not in text  # replaced by the re-run
    assert text.endswith("Notes kept.\n")
    writer.write_doc(doc, second, "smollm2")
    assert doc.read_text() == text  # idempotent


def test_depth_oracle_calibration_text_leaves_out_the_evaluated_tokens(tmp_path):
    """The in-domain diagnostic calibrates on WikiText-2 test text *after* the evaluation windows:
    the evaluated text is not in the file, and a window count that would overlap it is refused."""
    from transformers import AutoTokenizer

    from optimum_evo.data import builtin_text_path, evaluation_windows
    from optimum_evo.embedded_models import resolve_model

    depth = _benchmark("depth_smollm2")
    out = depth.oracle_calibration_file("smollm2", 40, 512, tmp_path / "oracle.txt")
    text = out.read_text(encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    last_window = tok.decode(evaluation_windows("wikitext2", tok, 512, 40)[-1])
    assert last_window[100:300] in builtin_text_path("wikitext2").read_text(encoding="utf-8")
    assert last_window[100:300] not in text
    assert len(text) > 500_000  # most of the test text is still there
    with pytest.raises(SystemExit, match="raise ORACLE_SKIP"):
        depth.oracle_calibration_file("smollm2", 200, 512, tmp_path / "oracle2.txt")


def test_depth_profile_specs_parse():
    profiles = _benchmark("depth_profiles_kl")
    assert profiles.parse_layers("6,12-14, 3") == [3, 6, 12, 13, 14]
    assert profiles.parse_profile("w:attention=12-13;mlp=1") == ("w", [12, 13], [1])
    assert profiles.parse_profile("a:attention=2") == ("a", [2], [])
    with pytest.raises(SystemExit, match="unknown keys"):
        profiles.parse_profile("x:blocks=1-3")


def test_depth_oracle_run_never_writes_the_benchmark_table():
    depth = _benchmark("depth_smollm2")
    with pytest.raises(SystemExit, match="pass --doc ''"):
        depth.main(["--oracle-calibration"])


def test_inference_speed_doc_keeps_other_machines_sections(tmp_path, monkeypatch):
    speed = _benchmark("inference_speed")
    doc = tmp_path / "speed.md"
    results = {"smollm2": {"bfloat16": {"dense": {"decode_tokens_per_s": 20.0, "prefill_512_s": 2.0,
                                                   "resident_bytes": 2e8, "disk_bytes": 5e8},
                                         "quantization 3.0 bits": {"decode_tokens_per_s": 25.0, "prefill_512_s": 2.0,
                                                                   "resident_bytes": 1e8, "disk_bytes": 1.5e8}}}}
    monkeypatch.setattr(speed, "section_key", lambda: "cpu-avx512")
    speed.write_doc(doc, speed.markdown(results, "python first"))
    results["smollm2"]["bfloat16"]["quantization 3.0 bits"]["decode_tokens_per_s"] = 30.0
    monkeypatch.setattr(speed, "section_key", lambda: "cpu-avx2")
    speed.write_doc(doc, speed.markdown(results, "python second"))
    text = doc.read_text()
    assert text.startswith("# Inference speed and size")
    assert "## CPU with AVX-512" in text and "## CPU with AVX2 (no AVX-512)" in text
    assert "| quantization 3.0 bits | 25.0 | 1.25x |" in text and "| quantization 3.0 bits | 30.0 | 1.50x |" in text
    speed.write_doc(doc, speed.markdown(results, "python third"))  # a rerun replaces its own section only
    assert doc.read_text().count("## CPU with AVX2") == 1 and "python second" not in doc.read_text()
    # a variant that could not run in its runtime is named with the reason, not silently left out
    text = speed.markdown(results, "python fourth", {"smollm2": {"bfloat16": {speed.GPTQ: "needs float16"}}})
    assert f"Not measured: {speed.GPTQ} (needs float16)." in text


def test_peer_page_keeps_the_rows_a_run_does_not_remake(tmp_path):
    """The peer table of a model is the union of every run's rows: a run (a fresh output folder, on
    another day) replaces the rows it remakes, keeps the others, and names every command."""
    peers = _benchmark("peers")

    def run(out, rows, command):
        (out / "smollm2" / "rows").mkdir(parents=True)
        for key, method, ppl in rows:
            (out / "smollm2" / "rows" / f"{key}.json").write_text(json.dumps(
                {"key": key, "method": method, "config": "W3 g128", "effective_bits": 3.161,
                 "perplexity": {"40": ppl}, "kl": {"40": 0.5}, "seconds": 10}))
        (out / "smollm2" / "meta.json").write_text(json.dumps(
            {"command": command, "machine": "cpu", "threads": 1, "date": command[-1], "num_samples": 8, "seq_len": 64}))
        peers.write_doc(doc, out, {})

    doc = tmp_path / "peers.md"
    doc.write_text(f"# Peers\n\nintro\n\n{peers.MARK_START}\n{peers.MARK_END}\n\nReading kept.\n")
    run(tmp_path / "a", [("rtn", "round-to-nearest", 145.0), ("ours", "EvoPress", 47.0)], "bench 1")
    run(tmp_path / "b", [("ar", "AutoRound", 47.3), ("ours", "EvoPress", 46.0)], "bench 2")
    text = doc.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 3.16")]
    assert [r.split("|")[2].strip() for r in rows] == ["EvoPress", "AutoRound", "round-to-nearest"]  # by perplexity
    assert "46.00" in text and "47.00 " not in text, "a remade row replaces the earlier one"
    assert "`bench 1`; `bench 2`" in text and "date 1, 2" in text
    assert text.startswith("# Peers\n\nintro") and text.endswith("Reading kept.\n")
    peers.write_doc(doc, tmp_path / "b", {})
    assert doc.read_text() == text  # idempotent


def test_preset_curves_snapshot_each_schedule_at_its_token_budgets(tmp_path, monkeypatch):
    """benchmarks/presets.py on a tiny model: each schedule's parent is taken once the candidate-tokens
    first reach each budget (never before), evaluated, tabled and plotted; a rerun reuses them."""
    from conftest import save_tiny_llama

    monkeypatch.setenv("OPTIMUM_EVO_CACHE", str(tmp_path / "cache"))  # its level databases, not the user's cache

    presets = _benchmark("presets")
    model = save_tiny_llama(tmp_path / "tiny", 32, 64, 4, scale=6.0)
    doc, out = tmp_path / "presets.md", tmp_path / "out"
    argv = ["--model", str(model), "--compression", "quantization", "--target", "3", "--levels", "2,3,4",
            "--schedules", "one=4:1@64,1@128", "two=8:2@64,1@128", "--tokens", "1k,3k", "--num-samples", "6",
            "--seq-len", "32", "--eval-windows", "1", "--threads", "1", "--output", str(out), "--doc", str(doc)]
    assert presets.main(argv) == 0
    assert list((tmp_path / "cache" / "databases").glob("quantization-*"))  # built under $OPTIMUM_EVO_CACHE
    records = {p.stem: json.loads(p.read_text()) for p in (out / "tiny" / "quantization-3").glob("*.json")}
    assert set(records) >= {"one", "two"}
    for name in ("one", "two"):
        snaps = records[name]["snapshots"]
        assert sorted(snaps, key=int) == ["1000", "3000"]
        assert all(s["tokens"] >= int(t) and s["perplexity"] > 1 for t, s in snaps.items())
        assert snaps["1000"]["generation"] <= snaps["3000"]["generation"]
    text = doc.read_text()
    assert "| one (4: 1@64, 1@128) |" in text and "| two (8: 2@64, 1@128) |" in text
    assert (tmp_path / "presets-quantization.png").read_bytes()[:4] == b"\x89PNG"
    stamp = (out / "tiny" / "quantization-3" / "one.json").stat().st_mtime_ns
    assert presets.main(argv) == 0
    assert (out / "tiny" / "quantization-3" / "one.json").stat().st_mtime_ns == stamp  # reused, not searched again
    # another process's schedule into the same folder joins the table, with its command
    # (run to the first budget only: its row shows a dash under the budget it has not reached)
    other = argv[:argv.index("--schedules") + 1] + ["three=4:1@128", "--tokens", "1k"] + argv[argv.index("--num-samples"):]
    assert presets.main(other) == 0
    text = doc.read_text()
    assert all(f"| {n} (" in text for n in ("one", "two", "three")) and "three=4:1@128" in text and "two=8" in text
    row = next(line for line in text.splitlines() if line.startswith("| three ("))
    assert row.split(" | ")[2] == "–" and "(1k)" in row
    # asked for a further budget, a finished schedule resumes its search instead of stopping at its record
    other[other.index("1k")] = "1k,3k"
    assert presets.main(other) == 0
    three = json.loads((out / "tiny" / "quantization-3" / "three.json").read_text())
    assert sorted(three["snapshots"], key=int) == ["1000", "3000"] and three["snapshots"]["3000"]["perplexity"] > 1
    # a record holding budgets this run did not ask for still resumes for the one it lacks
    other[other.index("1k,3k")] = "1k,4k"
    assert presets.main(other) == 0
    three = json.loads((out / "tiny" / "quantization-3" / "three.json").read_text())
    assert sorted(three["snapshots"], key=int) == ["1000", "3000", "4000"] and three["snapshots"]["4000"]["tokens"] >= 4000


def test_all_kinds_page_summarises_each_target_against_its_best_baseline(tmp_path):
    """benchmarks/all_kinds.py: one section per finished run in the order asked, a summary line per
    target with the best baseline and the ratio, the reading below the tables kept, bad runs refused."""
    import argparse

    kinds = _benchmark("all_kinds")
    with pytest.raises(argparse.ArgumentTypeError, match="KIND:TARGET"):
        kinds.parse_run("width:0.5")
    root, doc = tmp_path / "out", tmp_path / "page.md"
    timings = {"search_seconds": 10, "teacher_seconds": 2, "baseline_seconds": 1, "random_baseline_seconds": 1}
    common = {"search": {"generations": 3, "tokens": 1e5}, "timings": timings,
              "arguments": {"num_samples": 8, "seq_len": 512, "dataset": "brown", "preset": "fast", "eval_windows": 4,
                            "eval_seq_len": 512, "eval_dtype": "float32"}}
    runs = {("depth", 0.25): {"dense": {"perplexity": 20.0}, "evopress": {"perplexity": 40.0, "dropped_sub_blocks": 2,
                                                                         "dropped_attention": [1], "dropped_mlp": [0]},
                              "shortgpt": {"perplexity": 50.0, "dropped_sub_blocks": 2}},
            ("quantization", 3.0): {"dense": {"perplexity": 20.0},
                                    "evopress": {"perplexity": 30.0, "average_bits": 3.0, "effective_bits": 3.16},
                                    "uniform": {"perplexity": 27.0, "average_bits": 3.0, "effective_bits": 3.16},
                                    "dp": {"perplexity": 33.0, "average_bits": 3.0, "effective_bits": 3.16}}}
    for (kind, target), results in runs.items():
        out = root / kinds.run_name(kind, target)
        out.mkdir(parents=True)
        (out / "result.json").write_text(json.dumps({**common, "results": results}))
    asked = [("quantization", 3.0), ("sparsity", 0.7), ("depth", 0.25)]  # 0.7 not run yet: no line
    kinds.write_doc(doc, "gemma3", root, asked)
    doc.write_text(doc.read_text() + "## Reading\n\nKept.\n")
    kinds.write_doc(doc, "gemma3", root, asked)
    text = doc.read_text()
    assert text.startswith("# Gemma-3-270M: depth, sparsity and bit widths") and text.endswith("## Reading\n\nKept.\n")
    assert "| 3 bits | **30.00** | uniform | 27.00 | 1.111 | uniform 27.00, dp 33.00 |" in text
    assert "| depth 25% of sub-blocks | **40.00** | shortgpt | 50.00 | 0.800 | shortgpt 50.00 |" in text
    assert "sparsity 70%" not in text
    sections = [line for line in text.splitlines() if line.startswith("### ")]
    assert sections == ["### 3 bits", "### depth 25% of sub-blocks"]
    assert "| evopress | **30.00** | 0.0000 | 3.00 (3.16 eff.) |" in text and "[1] attn, [0] MLP dropped" in text


def test_fitness_transfer_table_marks_the_best_candidate_of_each_window_set():
    transfer = _benchmark("fitness_transfer")
    scores = {"evopress": {"calibration (searched)": 0.90, "WikiText-2 test (evaluation)": 1.33},
              "uniform": {"calibration (searched)": 0.95, "WikiText-2 test (evaluation)": 1.29}}
    text = transfer.markdown(scores, "python fitness_transfer.py r.json")
    assert "| candidate | KL, calibration (searched) | KL, WikiText-2 test (evaluation) |" in text
    assert "| evopress | **0.9000** | 1.3300 |" in text and "| uniform | 0.9500 | **1.2900** |" in text


def test_fitness_transfer_held_out_windows_share_no_token_with_the_calibration_windows():
    import torch

    from optimum_evo.data import calibration_windows, load_texts, tokenize_corpus
    from optimum_evo.loading import load_tokenizer

    transfer = _benchmark("fitness_transfer")
    tok = load_tokenizer("smollm2")
    texts = load_texts("tinyshakespeare")[:400]
    ids = tokenize_corpus(texts, tok)
    calib = calibration_windows(texts, tok, num_samples=6, seq_len=64, seed=3)
    searched, held = transfer.searched_and_held_out_windows(texts, tok, num_samples=6, seq_len=64, seed=3, count=5)
    assert torch.equal(searched, calib) and held.shape == (5, 64)

    def start(window):  # where the window sits in the tokenized text
        hits = [s for s in range(ids.numel() - 63) if torch.equal(ids[s:s + 64], window)]
        assert hits, "a window is not a slice of the text"
        return hits[0]

    calib_starts = [start(w) for w in calib]
    held_starts = [start(w) for w in held]
    assert held_starts == sorted(held_starts) and len(set(held_starts)) == 5  # spread over the text, distinct
    for h in held_starts:
        assert all(h + 64 <= c or c + 64 <= h for c in calib_starts), (h, calib_starts)
    with pytest.raises(ValueError, match="outside the calibration windows"):
        transfer.searched_and_held_out_windows(texts, tok, num_samples=6, seq_len=64, seed=3, count=10 ** 6)


def test_recorded_commands_read_back_as_typed():
    import shlex

    command = _benchmark("doc_sections").command_line("/somewhere/benchmarks/joint.py",
                                                      ["--doc", "", "--calibration", "my texts/a b.txt"])
    assert command.startswith("python benchmarks/joint.py ")
    assert shlex.split(command)[2:] == ["--doc", "", "--calibration", "my texts/a b.txt"]
