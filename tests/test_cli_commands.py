"""``optimum-evo show / export / eval`` and the optimum-cli conventions of ``search`` (positional
output folder, ``--output`` alias, ``--push-to-hub``), on tiny models; the Hub is intercepted."""

import json
import re
from pathlib import Path

import pytest
import torch

from optimum_evo.cli import build_parser, checkpoint_summary, main
from optimum_evo.methods import get_method

ABSOLUTE = re.compile(r"""(?<![\w.:/-])(/(?:tmp|home|root|work|Users|var|private|mnt|data)/|[A-Za-z]:\\)""")
KINDS = ["depth", "sparsity", "quantization"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from test_hf_quantizer import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-llama") / "tiny")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from test_hf_quantizer import CALIB

    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n".join(CALIB))
    return path


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory):
    """One EvoPress checkpoint per compression kind (the sparse one with a LoRA correction)."""
    from test_hf_quantizer import tiny_config
    from transformers import AutoModelForCausalLM

    root, cache = tmp_path_factory.mktemp("checkpoints"), {}
    before = torch.get_num_threads()

    def get(kind):
        if kind not in cache:
            torch.set_num_threads(1)
            try:
                extra = {"lora_correction": 4} if kind == "sparsity" else {}
                model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32,
                                                             quantization_config=tiny_config(kind, root, **extra))
                model.save_pretrained(root / kind)
            finally:
                torch.set_num_threads(before)
            cache[kind] = root / kind
        return cache[kind]

    return get


def _record(folder):
    return json.loads((Path(folder) / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("kind", KINDS)
def test_show_prints_the_profile_of_each_kind(kind, checkpoints, capsys):
    folder = checkpoints(kind)
    assert main(["show", str(folder)]) == 0
    out = capsys.readouterr().out
    method = get_method(kind)
    summary = method.summary(_record(folder)["profile"])
    assert summary
    for key, value in summary.items():
        assert f"  {key}: {value}" in out, key
    for part in ("EvoPress checkpoint (format 2)", method.description, "size: weights", "lm-eval: lm_eval --model "
                 "evopress", "import optimum_evo; AutoModelForCausalLM.from_pretrained", "evaluation on"):
        assert part in out, part
    assert ("LoRA correction:" in out) == (kind == "sparsity")
    exports = checkpoint_summary(folder)["exports"]
    assert ("gptq" in exports) == method.packs_weights and "dense" in exports
    assert main(["show", str(folder), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["compression"] == kind and parsed["profile"] == json.loads(json.dumps(summary))
    assert parsed["weights_bytes"] == (folder / "model.safetensors").stat().st_size


def test_show_refuses_what_is_not_a_model(tmp_path, capsys):
    assert main(["show", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["show", str(tmp_path)]) == 2
    assert "holds no config.json" in capsys.readouterr().err


def test_export_writes_a_plugin_free_folder_with_its_card(checkpoints, tmp_path, capsys, one_thread):
    from test_hf_quantizer import IDS
    from transformers import AutoModelForCausalLM

    folder = checkpoints("quantization")
    out = tmp_path / "dense"
    assert main(["export", str(folder), str(out), "--format", "dense"]) == 0
    assert f"Exported {folder} as dense to {out}" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "`dense` export" in card and "loads **without** optimum-evo" in card
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    evopress = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        assert torch.allclose(plain(IDS).logits, evopress(IDS).logits, atol=1e-5)
    assert main(["show", str(out)]) == 0
    assert "plain transformers checkpoint" in capsys.readouterr().out
    # --output is the same as the positional folder; both, different, is an error
    assert main(["export", str(folder), "--output", str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 0
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"
    assert main(["export", str(folder), str(tmp_path / "a"), "--output", str(tmp_path / "b"), "--format", "dense"]) == 2
    assert "Two output folders" in capsys.readouterr().err


def test_export_errors_name_the_fix(checkpoints, tiny_dir, tmp_path, capsys):
    assert main(["export", str(tiny_dir), str(tmp_path / "x"), "--format", "dense"]) == 2
    assert "is not an EvoPress checkpoint" in capsys.readouterr().err
    assert main(["export", str(checkpoints("depth")), "--format", "dense"]) == 2
    assert "give the output folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(checkpoints("depth")), str(tmp_path / "y"), "--format", "onnx"])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


def test_export_push_to_hub_uploads_the_export_without_local_paths(checkpoints, hub, capsys):
    assert main(["export", str(checkpoints("depth")), "--format", "dense", "--push-to-hub", "me/tiny-depth-dense"]) == 0
    (commit,) = hub.commits
    files = commit["files"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert 'from_pretrained("me/tiny-depth-dense")' in card
    for name, data in files.items():
        if name.endswith((".json", ".md")):
            assert not ABSOLUTE.search(data.decode()), name


def test_eval_reports_the_perplexity_and_kl_of_the_reloaded_model(checkpoints, tiny_dir, calib_file, tmp_path,
                                                                  capsys, one_thread):
    from test_hf_quantizer import char_tokenizer
    from transformers import AutoModelForCausalLM

    from optimum_evo.correction.peft_io import load_corrected
    from optimum_evo.data import evaluation_windows
    from optimum_evo.fitness import TeacherCache, evaluate

    folder = checkpoints("sparsity")
    report = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--eval-dataset", str(calib_file), "--eval-windows", "2", "--eval-seq-len",
                 "32", "--top-k", "32", "--device", "cpu", "--output", str(report)]) == 0
    out = capsys.readouterr().out
    assert "evopress+lora" in out and "KL to dense" in out
    rows = json.loads(report.read_text())["held_out"]["rows"]
    windows = evaluation_windows(str(calib_file), char_tokenizer(), 32, 2)
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    teacher = TeacherCache.build(dense, windows, "topk", 32, progress=False)
    expected = {"dense": evaluate(dense, windows, teacher, progress=False),
                "evopress": evaluate(AutoModelForCausalLM.from_pretrained(folder).eval(), windows, teacher,
                                     progress=False),
                "evopress+lora": evaluate(load_corrected(folder).eval(), windows, teacher, progress=False)}
    for name, row in expected.items():
        assert rows[name]["perplexity"] == pytest.approx(row["perplexity"], rel=1e-5), name
        assert rows[name]["kl"] == pytest.approx(row["kl"], rel=1e-4, abs=1e-7), name
    assert rows["evopress+lora"]["kl"] < rows["evopress"]["kl"]
    assert main(["eval", str(folder), "--eval-windows", "0"]) == 2
    assert "Nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", str(folder), "--eval-windows", "-3"]) == 2
    assert "eval_windows must be a non-negative integer" in capsys.readouterr().err


def test_eval_runs_lm_eval_tasks(checkpoints, tmp_path, capsys, monkeypatch, one_thread):
    pytest.importorskip("lm_eval")
    from test_hf_quantizer import char_tokenizer
    from test_lm_eval import direct_results, write_task
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = checkpoints("quantization")
    task = write_task(tmp_path / "tasks")
    report = tmp_path / "tasks.json"
    assert main(["eval", str(folder), "--tasks", task, "--include-path", str(tmp_path / "tasks"), "--eval-windows",
                 "0", "--device", "cpu", "--output", str(report)]) == 0
    assert task in capsys.readouterr().out
    accuracy, _ = direct_results(AutoModelForCausalLM.from_pretrained(folder).eval(), char_tokenizer())
    assert json.loads(report.read_text())["lm_eval"][task]["acc,none"] == accuracy


def test_search_takes_the_output_folder_positionally_and_pushes(tiny_dir, calib_file, tmp_path, hub, capsys,
                                                                 one_thread):
    out = tmp_path / "out"
    common = ["--model", str(tiny_dir), "--compression", "depth", "--target", "0.25", "--generations", "1",
              "--offspring", "2", "--num-samples", "4", "--seq-len", "32", "--eval-windows", "2", "--eval-seq-len",
              "32", "--eval-dataset", str(calib_file), "--dataset", str(calib_file), "--top-k", "32",
              "--search-dtype", "float32", "--quiet"]
    assert main(["search", str(out), *common, "--push-to-hub", "me/tiny-depth", "--private"]) == 0
    assert (out / "result.json").is_file() and (out / "model" / "config.json").is_file()
    assert hub.repos == [("me/tiny-depth", {"private": True, "token": None, "exist_ok": True})]
    (commit,) = hub.commits
    files = commit["files"]
    for name, data in files.items():
        if name.endswith((".json", ".md", ".jinja")):
            text = data.decode()
            assert str(tmp_path) not in text and not ABSOLUTE.search(text), name
    pushed = json.loads(files["config.json"])["quantization_config"]
    assert pushed["metrics"]["model"] == "tiny" and pushed["dataset"] == "<local file calib.txt>"
    assert pushed["metrics"]["evaluation"]["text"] == "<local file calib.txt>"
    assert _record(out / "model")["metrics"]["model"] == str(tiny_dir)  # the local checkpoint keeps the folder
    card = files["README.md"].decode()
    assert 'from_pretrained("me/tiny-depth")' in card
    if (out / "profile.png").is_file():  # matplotlib installed: the search's picture is beside the card
        assert files["profile.png"] == (out / "profile.png").read_bytes() and "](profile.png)" in card
    from transformers import AutoModelForCausalLM

    for name, data in files.items():  # what was pushed reloads as the same compressed model
        (tmp_path / "pushed" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pushed" / name).write_bytes(data)
    pushed_model = AutoModelForCausalLM.from_pretrained(tmp_path / "pushed")
    assert pushed_model.config.quantization_config.profile == _record(out / "model")["profile"]
    capsys.readouterr()
    assert main(["search", str(tmp_path / "a"), "--output", str(tmp_path / "b"), *common]) == 2
    assert "Two output folders" in capsys.readouterr().err
    assert main(["search", *common, "--no-save-model", "--output", str(tmp_path / "c"), "--push-to-hub", "me/x"]) == 2
    assert "drop --no-save-model" in capsys.readouterr().err


def test_choices_and_help_come_from_the_registries_and_settings():
    from optimum_evo.exporters import available_exporters
    from optimum_evo.settings import SearchArguments

    sub = build_parser()._subparsers._group_actions[0].choices
    fmt = next(a for a in sub["export"]._actions if a.dest == "format")
    assert fmt.choices == available_exporters()
    windows = next(a for a in sub["eval"]._actions if a.dest == "eval_windows")
    assert windows.help.startswith(SearchArguments.__dataclass_fields__["eval_windows"].metadata["help"])
    search_dests = {a.dest for a in sub["search"]._actions}
    assert {"output_positional", "output_dir", "push_to_hub"} <= search_dests
    from optimum_evo.settings import option_of

    assert {f for f in SearchArguments.__dataclass_fields__ if option_of(f).cli} - search_dests == set()
