"""Many processes through torch.distributed (gloo on CPU): a 2-process search gives the result of one
process with the same seed, and a killed multi-process search resumes with any number of processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import outcome
from test_hf_quantizer import CALIB, save_tiny

from optimum_evo.faults import ENV_VAR

TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    calib = root / "calib.txt"
    calib.write_text("\n".join(CALIB))
    return save_tiny(root / "tiny"), calib


def search(tiny, out, kind="depth", processes=1, fault=None):
    model, calib = tiny
    extra = {"depth": ["--target", "0.25"],
             "quantization": ["--target", "3", "--levels", "2,3,4", "--group-size", "32"]}[kind]
    args = ["search", "--model", model, "--compression", kind, *extra, "--dataset", calib, "--output", out,
            "--generations", "5", "--offspring", "5", "--num-samples", "6", "--seq-len", "32", "--eval-windows", "2",
            "--eval-seq-len", "32", "--top-k", "16", "--search-dtype", "float32", "--quiet", "--compare-baselines",
            "--random-candidates", "3", "--database-dir", Path(out).parent / f"db-{Path(out).name}"]
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if fault:
        env[ENV_VAR] = fault
    if processes == 1:
        command = [sys.executable, "-m", "optimum_evo"]
    else:
        command = [str(TORCHRUN), f"--nproc-per-node={processes}", f"--master-port={free_port()}", "-m", "optimum_evo"]
    return subprocess.run([*command, *map(str, args)], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("kind", ["depth", "quantization"])
def test_two_processes_find_what_one_process_finds(tiny, tmp_path, kind):
    one = search(tiny, tmp_path / "one", kind)
    assert one.returncode == 0, one.stderr[-3000:]
    two = search(tiny, tmp_path / "two", kind, processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "result.json").read_text())
    assert report["search"]["work"]["processes"] == 2
    single = json.loads((tmp_path / "one" / "result.json").read_text())
    assert report["search"]["work"]["window_scores"] == single["search"]["work"]["window_scores"]
    assert outcome(tmp_path / "two") == outcome(tmp_path / "one")  # same candidate, trajectory, metrics, files
    if kind == "quantization":  # the level database was built by both processes, each half of the linears
        one_db = json.loads((tmp_path / "db-one" / "manifest.json").read_text())
        two_db = json.loads((tmp_path / "db-two" / "manifest.json").read_text())
        assert (one_db["build_processes"], two_db["build_processes"]) == (1, 2)
        assert list(two_db["modules"]) == list(one_db["modules"])
        assert {n: e["sha256"] for n, e in two_db["modules"].items()} == {
            n: e["sha256"] for n, e in one_db["modules"].items()}
        assert two_db["bytes_per_weight"] == one_db["bytes_per_weight"]


def test_killed_multi_process_search_resumes_with_any_number_of_processes(tiny, tmp_path):
    reference = search(tiny, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    for restart_with in (2, 1):
        out = tmp_path / f"killed-{restart_with}"
        killed = search(tiny, out, processes=2, fault="search.checkpoint:3")
        assert killed.returncode != 0 and not (out / "result.json").exists()
        assert json.loads((out / "checkpoint" / "search_state.json").read_text())["generation"] == 2
        again = search(tiny, out, processes=restart_with)
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads((out / "result.json").read_text())["search"]["resumed_from"] == 2
        assert outcome(out) == outcome(tmp_path / "reference")
