"""Nothing is lost: every long job is stopped at a chosen point (``OPTIMUM_EVO_FAULT``, a deterministic
``os._exit`` like a SIGKILL, not a timer), restarted with the same command, and must end with the
result of an uninterrupted run, trusting no half-written file. Also: database faults through the
command line, and two processes asking for the same database at once."""

import json
import os
import subprocess
import sys

import pytest
from test_hf_quantizer import CALIB, save_tiny

from optimum_evo.faults import ENV_VAR, POINTS, FaultInjected, fault_point

KILLED = 137
TARGETS = {"depth": ["--target", "0.25"],
           "sparsity": ["--target", "0.5", "--max-offset", "2", "--sparsity-step", "0.1"],
           "quantization": ["--target", "3", "--levels", "2,3,4", "--group-size", "32"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    calib = root / "calib.txt"
    calib.write_text("\n".join(CALIB))
    return save_tiny(root / "tiny"), calib


def cli(tiny, out, kind, *extra, fault=None, db=None):
    model, calib = tiny
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if fault:
        env[ENV_VAR] = fault
    args = ["search", "--model", model, "--compression", kind, *TARGETS[kind], "--dataset", calib, "--output", out,
            "--generations", "4", "--offspring", "3", "--num-samples", "4", "--seq-len", "32", "--eval-windows", "2",
            "--eval-seq-len", "32", "--top-k", "16", "--search-dtype", "float32", "--quiet",
            "--database-dir", db or out.parent / f"db-{out.name}", *extra]
    return subprocess.run([sys.executable, "-m", "optimum_evo", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


def outcome(out) -> dict:
    """What must not depend on an interruption: the found candidate, the search trajectory, the
    evaluation, and the saved files' bytes."""
    report = json.loads((out / "result.json").read_text())
    files = {}
    for folder in [out / "model", *sorted(out.glob("export-*"))]:
        for f in sorted(folder.rglob("*")):
            if f.is_file() and f.suffix in (".safetensors", ".json") and f.name != "evopress_correction.json":
                data = f.read_bytes()
                if f.name == "config.json":  # the recorded metrics include wall-clock seconds
                    config = json.loads(data)
                    config.get("quantization_config", {}).get("metrics", {}).get("search", {}).pop("seconds", None)
                    (config.get("quantization_config", {}).get("metrics", {}).get("lora_correction") or {}).pop(
                        "seconds", None)
                    data = json.dumps(config, sort_keys=True).encode()
                if f.name == "adapter_config.json":  # names the folder it lies in
                    data = json.dumps({k: v for k, v in json.loads(data).items()
                                       if k != "base_model_name_or_path"}).encode()
                files[str(f.relative_to(out))] = data
    return {"candidate": report["candidate"],
            "trajectory": [(h["best_fitness"], h["parent_changed"]) for h in report["search"]["history"]],
            "results": {name: {k: v for k, v in row.items()} for name, row in report["results"].items()},
            "files": files}


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """One uninterrupted run per kind (with an export; sparsity with a LoRA correction)."""
    root, cache = tmp_path_factory.mktemp("reference"), {}

    def get(kind, *extra):
        key = (kind, extra)
        if key not in cache:
            out = root / f"{kind}-{len(cache)}"
            run = cli(tiny, out, kind, *extra)
            assert run.returncode == 0, run.stderr[-3000:]
            cache[key] = outcome(out)
        return cache[key]

    return get


def test_fault_points_are_inert_without_the_variable(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    fault_point("search.checkpoint")
    monkeypatch.setenv(ENV_VAR, "database.layer:2:raise")
    fault_point("search.checkpoint")  # another point
    fault_point("database.layer")  # first hit
    with pytest.raises(FaultInjected, match="database.layer"):
        fault_point("database.layer")  # second hit
    monkeypatch.setenv(ENV_VAR, "nowhere:1")
    with pytest.raises(ValueError, match="Unknown fault point"):
        fault_point("nowhere")


@pytest.mark.parametrize("kind", ["depth", "sparsity", "quantization"])
@pytest.mark.parametrize("point, hit", [("search.checkpoint", 3), ("search.checkpoint.write", 2)])
def test_killed_search_resumes_to_the_uninterrupted_result(tiny, tmp_path, reference, kind, point, hit):
    out = tmp_path / "killed"
    killed = cli(tiny, out, kind, fault=f"{point}:{hit}")
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    assert not (out / "result.json").exists() and not (out / "model").exists()
    state = json.loads((out / "checkpoint" / "search_state.json").read_text())  # never half-written
    # a kill after checkpoint N leaves generation N-1; halfway through writing N, the previous one
    assert state["generation"] == (hit - 1 if point == "search.checkpoint" else hit - 2)
    again = cli(tiny, out, kind)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((out / "result.json").read_text())
    assert report["search"]["resumed_from"] == state["generation"]
    assert outcome(out) == reference(kind)
    assert not list((out / "checkpoint").glob(".*.tmp"))  # the killed writer's temporary file is gone


@pytest.mark.parametrize("point, hit", [("database.layer", 2), ("database.manifest", 1)])
def test_killed_database_build_is_rebuilt_cleanly(tiny, tmp_path, reference, point, hit):
    out, db = tmp_path / "run", tmp_path / "db"
    killed = cli(tiny, out, "quantization", fault=f"{point}:{hit}", db=db)
    assert killed.returncode == KILLED
    assert not db.exists()  # the build folder is moved into place only when complete
    assert list(tmp_path.glob(".db.build-*"))  # what the killed build left
    again = cli(tiny, out, "quantization", db=db)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list(tmp_path.glob(".db.build-*"))  # orphan build folders are removed
    assert outcome(out) == reference("quantization")


def test_killed_teacher_cache_is_rebuilt(tiny, tmp_path, reference):
    out = tmp_path / "run"
    killed = cli(tiny, out, "depth", fault="teacher.write:1")
    assert killed.returncode == KILLED
    teacher = out / "cache" / "teacher"
    assert (teacher / "teacher.safetensors").exists() and not (teacher / "manifest.json").exists()
    again = cli(tiny, out, "depth")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (teacher / "manifest.json").exists()
    assert outcome(out) == reference("depth")


def test_killed_lora_correction_leaves_no_adapter_and_restarts(tiny, tmp_path, reference):
    extra = ("--lora-correction", "2")
    out = tmp_path / "run"
    killed = cli(tiny, out, "sparsity", *extra, fault="correction.fitted:1")
    assert killed.returncode == KILLED
    assert not (out / "model").exists()
    again = cli(tiny, out, "sparsity", *extra)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "model" / "lora-correction" / "adapter_model.safetensors").is_file()
    assert outcome(out) == reference("sparsity", *extra)


@pytest.mark.parametrize("point", ["export.write", "model.write"])
def test_killed_save_or_export_leaves_nothing_loadable_and_restarts(tiny, tmp_path, reference, point):
    extra = ("--export", "dense")
    out = tmp_path / "run"
    killed = cli(tiny, out, "quantization", *extra, fault=f"{point}:1")
    assert killed.returncode == KILLED
    written = out / ("export-dense" if point == "export.write" else "model")
    assert not (written / "config.json").exists()  # nothing a loader would take for a model
    assert list(out.glob(".*.tmp-*"))  # the staging folder of the killed write
    again = cli(tiny, out, "quantization", *extra)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list(out.glob(".*.tmp-*"))
    assert outcome(out) == reference("quantization", *extra)


def test_every_fault_point_is_exercised_here():
    source = open(__file__, encoding="utf-8").read()
    assert all(f'"{p}' in source for p in POINTS), [p for p in POINTS if f'"{p}' not in source]


# ---------------------------------------------------------------------------- database and cache faults
def _break(db, fault):
    manifest = json.loads((db / "manifest.json").read_text())
    layer = db / next(iter(manifest["modules"].values()))["file"]
    if fault == "corrupt manifest":
        (db / "manifest.json").write_text("{not json")
    elif fault == "missing manifest":
        (db / "manifest.json").unlink()
    elif fault == "missing layer file":
        layer.unlink()
    elif fault == "truncated layer file":
        layer.write_bytes(layer.read_bytes()[: layer.stat().st_size // 2])
    elif fault == "format version mismatch":
        manifest["format"] = 1
        (db / "manifest.json").write_text(json.dumps(manifest))
    elif fault == "settings changed":
        return ["--damp-percent", "0.02"]
    return []


@pytest.fixture(scope="module")
def built_database(tiny, tmp_path_factory):
    """A quantization database built once through the command line (each test breaks a copy)."""
    root = tmp_path_factory.mktemp("built")
    first = cli(tiny, root / "first", "quantization", db=root / "db")
    assert first.returncode == 0, first.stderr[-2000:]
    return root / "db"


@pytest.mark.parametrize("fault", ["corrupt manifest", "missing manifest", "missing layer file", "truncated layer file",
                                   "format version mismatch", "settings changed"])
def test_database_faults_are_detected_and_rebuilt_through_the_cli(tiny, tmp_path, reference, built_database, fault):
    import shutil

    db = tmp_path / "db"
    shutil.copytree(built_database, db)
    extra = _break(db, fault)
    again = cli(tiny, tmp_path / "again", "quantization", *extra, db=db)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Rebuilding it" in again.stderr  # said, not silent
    report = json.loads((tmp_path / "again" / "result.json").read_text())
    assert report["database"]["reused"] is False
    manifest = json.loads((db / "manifest.json").read_text())
    assert manifest["format"] == 2 and manifest["settings"]["damp"] == (0.02 if extra else 0.01)
    if not extra:  # the rebuilt database gives the uninterrupted result
        assert outcome(tmp_path / "again")["candidate"] == reference("quantization")["candidate"]


def test_two_processes_asking_for_one_database_build_it_once(tiny, tmp_path):
    db = tmp_path / "db"
    procs = []
    for name in ("a", "b"):
        model, calib = tiny
        args = ["search", "--model", model, "--compression", "quantization", *TARGETS["quantization"], "--dataset",
                calib, "--output", tmp_path / name, "--generations", "1", "--offspring", "2", "--num-samples", "4",
                "--seq-len", "32", "--eval-windows", "0", "--top-k", "16", "--search-dtype", "float32", "--quiet",
                "--database-dir", db]
        env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
        procs.append(subprocess.Popen([sys.executable, "-m", "optimum_evo", *map(str, args)], env={
            **env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    reused = sorted(json.loads((tmp_path / n / "result.json").read_text())["database"]["reused"] for n in "ab")
    assert reused == [False, True]  # one built it, the other waited and reused it
    a, b = (json.loads((tmp_path / n / "result.json").read_text())["candidate"] for n in "ab")
    assert a == b


@pytest.fixture(scope="module")
def killed_depth_run(tiny, tmp_path_factory):
    """A depth search killed after its second checkpoint (each test resumes a copy)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    killed = cli(tiny, out, "depth", fault="search.checkpoint:2")
    assert killed.returncode == KILLED
    return out


@pytest.mark.parametrize("change, named", [
    (["--num-samples", "5"], "num_samples"), (["--seq-len", "24"], "seq_len"), (["--top-k", "12"], "top_k"),
    (["--fitness", "full"], "fitness"), (["--dataset", "{other}"], "dataset"), (["--seed", "3"], "seed"),
])
def test_resuming_with_other_settings_is_refused_naming_them(tiny, tmp_path, killed_depth_run, change, named):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(killed_depth_run, out)
    other = tmp_path / "other.txt"
    other.write_text("\n".join(reversed(CALIB)) + "\nA different text for the calibration windows.\n")
    again = cli(tiny, out, "depth", *[c.format(other=other) for c in change])
    assert again.returncode == 2
    message = again.stderr.strip().splitlines()[-1]
    assert "was written by a search with a different" in message and named in message, message
    assert "delete the checkpoint" in message


def test_resuming_with_other_model_weights_is_refused(tiny, tmp_path, killed_depth_run):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    shutil.copytree(killed_depth_run, out)
    model_dir = tmp_path / "changed"
    changed = AutoModelForCausalLM.from_pretrained(tiny[0])
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    changed.save_pretrained(model_dir)
    (model_dir / "tokenizer.json").write_bytes((tiny[0] / "tokenizer.json").read_bytes())
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tiny[0] / f).exists():
            (model_dir / f).write_bytes((tiny[0] / f).read_bytes())
    again = cli((model_dir, tiny[1]), out, "depth")
    assert again.returncode == 2
    assert "model weights" in again.stderr.strip().splitlines()[-1]
