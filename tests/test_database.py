"""The on-disk level database: packed levels, manifest, staleness and corruption detection."""

import os

import pytest
import torch

from conftest import tiny_model
from optimum_evo.compressors.database import LevelDatabase, StaleDatabaseError


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=2, hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def test_quantization_database_roundtrip_and_size(model, windows, tmp_path):
    db = LevelDatabase.build(model, windows, "quantization", [2, 4, 8], tmp_path / "db", identity={"model": "tiny"},
                             progress=False)
    assert len(db.modules) == 2 * 7
    name = "model.layers.1.mlp.down_proj"
    dense = model.get_submodule(name).weight.detach()
    errs = {b: float((db.weight(name, b) - dense).norm() / dense.norm()) for b in (2, 4, 8)}
    assert errs[8] < 0.02 and 8 * errs[8] < errs[4] < errs[2]
    bpw = db.bytes_per_weight()
    assert bpw["2"] == pytest.approx(2 / 8 + (16 + 2) / (8 * 128), rel=0.05)
    assert bpw["8"] < 1.2 and all(v < 2 / 2 for k, v in bpw.items() if k != "8")  # far below dense fp16 (2 B)
    reopened = LevelDatabase.open(tmp_path / "db", {"model": "tiny", "kind": "quantization"})
    assert torch.equal(reopened.weight(name, 4), db.weight(name, 4))


def test_sparsity_database_exact_zeros(model, windows, tmp_path):
    db = LevelDatabase.build(model, windows, "sparsity", [0.5, 0.7], tmp_path / "db", progress=False)
    w = db.weight("model.layers.0.self_attn.q_proj", 0.7)
    assert int((w == 0).sum()) == round(0.7 * w.numel())
    assert db.bytes_per_weight()["0.7"] == pytest.approx(1 / 8 + 2 * 0.3, rel=0.02)


def test_stale_and_corrupt_databases_are_detected(model, windows, tmp_path):
    root = tmp_path / "db"
    LevelDatabase.build(model, windows, "quantization", [3], root, identity={"calibration": "abc"}, progress=False)
    with pytest.raises(StaleDatabaseError, match="stale: its calibration"):
        LevelDatabase.open(root, {"calibration": "xyz"})
    with pytest.raises(StaleDatabaseError, match="stale: its levels"):
        LevelDatabase.open(root, {"levels": [2, 3]})
    f = next((root / "layers").iterdir())
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StaleDatabaseError, match="corrupt"):
        LevelDatabase.open(root)
    # open_or_build rebuilds it instead of using it
    db = LevelDatabase.open_or_build(root, model, windows, "quantization", [3], identity={"calibration": "abc"},
                                     progress=False)
    LevelDatabase.open(root)  # checksums fine again
    assert db.manifest["calibration"] == "abc"


def test_module_filter_builds_only_selected_layers_identically(model, windows, tmp_path):
    full = LevelDatabase.build(model, windows, "quantization", [3], tmp_path / "full", progress=False)
    calls = []
    orig = model.model.layers[1].forward
    model.model.layers[1].forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        part = LevelDatabase.build(model, windows, "quantization", [3], tmp_path / "part", progress=False,
                                   modules=lambda n: n.startswith("model.layers.0.") and "mlp" in n)
    finally:
        del model.model.layers[1].forward
    assert sorted(part.modules) == [f"model.layers.0.mlp.{n}" for n in ("down_proj", "gate_proj", "up_proj")]
    assert not calls  # the walk stopped after the last selected block
    for name in part.modules:
        assert torch.equal(part.weight(name, 3), full.weight(name, 3))
    # a filter that also selects the value projection of block 1 gets the same attention-aware levels
    v = "model.layers.1.self_attn.v_proj"
    only_v = LevelDatabase.build(model, windows, "quantization", [3], tmp_path / "v", progress=False,
                                 modules=lambda n: n == v)
    assert list(only_v.modules) == [v] and torch.equal(only_v.weight(v, 3), full.weight(v, 3))


def test_a_killed_build_leaves_no_orphan_folder_behind(model, windows, tmp_path):
    import subprocess
    import sys

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # its pid is now free: a build folder named after it is an orphan
    orphan = tmp_path / f".db.build-{done.pid}"
    (orphan / "layers").mkdir(parents=True)
    alive = tmp_path / f".db.build-{os.getppid()}"  # a live process's build is left alone
    alive.mkdir()
    LevelDatabase.build(model, windows, "sparsity", [0.5], tmp_path / "db", progress=False)
    assert not orphan.exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "db"])
