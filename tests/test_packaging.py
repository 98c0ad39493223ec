"""Packaging: extras instead of hard dependencies, upper bounds, one version source, licence,
changelog, typing marker, URLs, the lm-eval entry point, plots without a global matplotlib backend,
and the built wheel running a search where no local data exists (the Hub call intercepted)."""

import json
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip()


def test_optional_features_are_extras_not_dependencies():
    names = {_name(r).lower() for r in PROJECT["dependencies"]}
    assert not names & {"gguf", "matplotlib", "lm-eval", "compressed-tensors", "gptqmodel", "auto-round"}
    extras = PROJECT["optional-dependencies"]
    assert {"gguf", "plots", "lm-eval", "export", "gptq", "autoround"} <= set(extras)
    assert {_name(r) for r in extras["plots"]} == {"matplotlib"} and {_name(r) for r in extras["gguf"]} == {"gguf"}
    assert {_name(r) for r in extras["lm-eval"]} == {"lm-eval"}
    assert "evaluate" in names  # the KL-divergence metric module (optimum_evo.integrations.metrics)


def test_private_api_dependencies_have_upper_bounds():
    pins = {_name(r): r for r in PROJECT["dependencies"]}
    for name in ("transformers", "optimum", "peft"):
        assert "<" in pins[name], pins[name]


def test_one_version_source_licence_changelog_urls_typing():
    from optimum_evo.version import __version__

    assert PROJECT["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "optimum_evo.version.__version__"}
    assert __version__
    assert PROJECT["license"] == "Apache-2.0" and "Apache License" in (ROOT / "LICENSE").read_text()
    assert "Version 2.0" in (ROOT / "LICENSE").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    for part in ("`dataset`", "`eval_dataset`", "`database_dir`", "eval_windows=0", "format 2",
                 "lm_eval --model evopress"):
        assert part in changelog, part
    assert {"Homepage", "Documentation", "Repository", "Changelog"} <= set(PROJECT["urls"])
    assert (ROOT / "optimum_evo" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["optimum_evo"]


def test_the_lm_eval_entry_point_names_the_registered_model():
    pytest.importorskip("lm_eval")
    import importlib

    target = PROJECT["entry-points"]["lm_eval.models"]["evopress"]
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    from lm_eval.api.registry import get_model

    assert get_model("evopress") is cls
    import _optimum_evo_lm_eval

    assert _optimum_evo_lm_eval.PLACEHOLDER == target  # the startup hook registers the same class


def test_plots_use_figure_objects_and_leave_the_backend_alone(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import matplotlib
        matplotlib.use("svg")
        from optimum_evo.plotting import plot_depth_profile, plot_fitness, plot_layer_levels
        plot_fitness([{{"generation": 1, "best_fitness": 0.5, "total_tokens": 4096}}], r"{tmp_path}/fitness.png", 0.7)
        plot_depth_profile({{"dropped_attention": [1], "dropped_mlp": [2]}}, 4, r"{tmp_path}/depth.png")
        plot_layer_levels({{"model.layers.0.q_proj": 3, "model.layers.0.k_proj": "4g64"}}, r"{tmp_path}/q.png", "bits")
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert "matplotlib.pyplot" not in sys.modules
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr
    for name in ("fitness.png", "depth.png", "q.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_without_matplotlib_plots_are_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    from optimum_evo import plotting

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    monkeypatch.setattr(plotting, "_warned", [])
    with caplog.at_level("WARNING", logger="optimum_evo.plotting"):
        assert plotting.plot_fitness([], tmp_path / "f.png") is None
        assert plotting.plot_depth_profile({"dropped_attention": [], "dropped_mlp": []}, 2, tmp_path / "d.png") is None
    assert not (tmp_path / "f.png").exists()
    assert [r.message for r in caplog.records].count(
        "matplotlib is not installed, so no plots are written (pip install optimum-evo[plots]).") == 1


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (path,) = out.glob("optimum_evo-*.whl")
    return path


def test_the_wheel_holds_the_texts_the_hook_and_the_entry_point(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        pth = z.read("optimum_evo_lm_eval.pth").decode()
    texts = {f"optimum_evo/texts/{name}.txt.xz" for name in ("brown", "sotu", "tinyshakespeare")}
    assert texts | {"optimum_evo/py.typed", "_optimum_evo_lm_eval.py", "optimum/commands/register/evopress.py"} <= names
    assert not any(n.startswith(("tests/", "docs/", "benchmarks/")) for n in names)
    assert pth.strip() == "import _optimum_evo_lm_eval"
    assert "[lm_eval.models]\nevopress = optimum_evo.integrations.lm_eval:EvoPressLM" in entry_points
    assert "optimum-evo = optimum_evo.cli:main" in entry_points


def test_the_installed_wheel_searches_without_local_data(wheel, tmp_path):
    """`pip install optimum-evo` (the wheel, into a folder of its own) on a machine without the data
    folder: the default calibration text is the shipped Brown corpus, WikiText-2 comes through
    `datasets` (intercepted here: the machine has no Hub), and the run writes its checkpoint."""
    from test_hf_quantizer import save_tiny

    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    model = save_tiny(tmp_path / "tiny")
    script = tmp_path / "search.py"
    script.write_text(textwrap.dedent(f"""
        import json
        import datasets

        calls = []

        def load_dataset(*args, **kwargs):  # the Hub, as datasets serves WikiText-2 raw
            calls.append(kwargs)
            rows = ["", " = Valkyria Chronicles = \\n", ""] + [" The game began development in 2010 . \\n"] * 300
            return datasets.Dataset.from_dict({{"text": rows}})

        datasets.load_dataset = load_dataset
        import optimum_evo
        from optimum_evo import SearchArguments, run_search
        from optimum_evo.data import builtin_text_path

        report = run_search(SearchArguments(model=r"{model}", compression="depth", target=0.25, generations=1,
                                            offspring=2, num_samples=4, seq_len=32, eval_windows=2, eval_seq_len=32,
                                            top_k=32, search_dtype="float32", progress=False, output_dir="out"))
        print(json.dumps({{"package": optimum_evo.__file__, "brown": str(builtin_text_path("brown")), "calls": calls,
                          "dataset": report["arguments"]["dataset"], "eval": report["evaluation"]["text"],
                          "ppl": report["results"]["evopress"]["perplexity"]}}))
    """))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "OPTIMUM_EVO_DATA": str(tmp_path / "nowhere"),
           "OPTIMUM_EVO_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["package"].startswith(str(site))  # the installed wheel, not the repository
    assert result["brown"] == str(site / "optimum_evo" / "texts" / "brown.txt.xz")
    assert result["calls"] == [{"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}]
    assert (result["dataset"], result["eval"]) == ("brown", "wikitext2") and result["ppl"] > 1
    assert (tmp_path / "out" / "model" / "config.json").is_file()
