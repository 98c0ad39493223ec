"""One settings source: SearchArguments drives the command line, EvoPressConfig and HfArgumentParser,
with one vocabulary (deprecated names warn) and one meaning of eval_windows=0; GPTQ's sym / desc_act /
damp_percent and modules_to_not_convert reach the level database from Python, the config and the CLI."""

import dataclasses
import json
import warnings

import pytest
import torch
from test_hf_quantizer import CALIB, save_tiny
from transformers import AutoModelForCausalLM, HfArgumentParser

from optimum_evo import EvoPressConfig, EvoPressQuantLinear, SearchArguments
from optimum_evo.cli import arguments_from_namespace, build_parser, main
from optimum_evo.settings import config_fields, option_of, setting_fields

pytestmark = pytest.mark.usefixtures("one_thread")


def search_parser():
    return next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("search"))


def parse_cli(*argv) -> SearchArguments:
    return arguments_from_namespace(build_parser().parse_args(["search", *map(str, argv)]))


def test_hf_argument_parser_parses_the_settings_dataclass():
    (args,) = HfArgumentParser(SearchArguments).parse_args_into_dataclasses(
        ["--compression", "quantization", "--target", "2.5", "--levels", "2", "3", "4", "--sym", "--desc_act",
         "--damp_percent", "0.05", "--modules_to_not_convert", "down_proj", "--eval_windows", "0", "--no_progress"])
    assert args == SearchArguments(compression="quantization", target=2.5, levels=[2, 3, 4], sym=True, desc_act=True,
                                   damp_percent=0.05, modules_to_not_convert=["down_proj"], eval_windows=0,
                                   progress=False)


def test_the_command_line_is_generated_from_the_settings():
    parser = search_parser()
    options = {o for a in parser._actions for o in a.option_strings}
    help_text = " ".join(parser.format_help().split())
    for f in setting_fields():
        option = option_of(f.name)
        if not option.cli:
            continue
        flags = option.flags or (f"--{f.name.replace('_', '-')}",)
        expected = option.negate if f.default is True else flags[-1]
        assert expected in options, f.name
        assert " ".join(f.metadata["help"].split())[:40] in help_text, f.name
    # an option not given keeps the dataclass default; given ones are converted as the field says
    assert parse_cli() == SearchArguments()
    args = parse_cli("-m", "smollm2", "--compression", "quantization", "--target", "3", "--levels", "2,3,4", "--sym",
                     "--desc-act", "--damp-percent", "0.05", "--mse", "2.4", "--modules-to-not-convert",
                     "down_proj,o_proj", "--eval-windows", "all", "--quiet", "--no-prefix-reuse", "--export", "gptq",
                     "--export", "dense", "--no-fused-groups")
    assert args == SearchArguments(model="smollm2", compression="quantization", target=3.0, levels=[2, 3, 4], sym=True,
                                   desc_act=True, damp_percent=0.05, mse=2.4,
                                   modules_to_not_convert=["down_proj", "o_proj"], eval_windows=None, progress=False,
                                   reuse_prefix=False, export=["gptq", "dense"], fused_groups=False)


def test_the_config_takes_the_same_fields_with_the_same_defaults():
    cfg = EvoPressConfig()
    defaults = {f.name: f.default for f in dataclasses.fields(SearchArguments)}
    assert set(config_fields()) == set(defaults) - {"model", "eval_dtype", "save_model", "export"}
    for name in config_fields():
        value = getattr(cfg, name)
        assert value == defaults[name], name
    record = cfg.to_dict()
    # the run's local folders and devices are settings of the config but not recorded in a checkpoint
    local = {"output_dir", "database_dir", "database_device", "latency_dir", "init_from", "prefix_cache_size"}
    assert set(record) == set(config_fields()) - local | {"quant_method", "format_version", "profile", "metrics"}
    cfg = EvoPressConfig("quantization", 3.0, sym=True, desc_act=True, damp_percent=0.02, mse=2.4, fused_groups=False)
    args = cfg.search_arguments(model="m")
    assert (args.sym, args.desc_act, args.damp_percent, args.mse, args.model, args.fused_groups) == (
        True, True, 0.02, 2.4, "m", False)
    assert EvoPressConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()


def test_deprecated_names_warn_and_map():
    with pytest.warns(FutureWarning, match="calibration= is deprecated; use dataset="):
        args = SearchArguments(calibration="sotu", evaluation="wikitext2")
    assert args.dataset == "sotu" and args.eval_dataset == "wikitext2"
    with pytest.warns(FutureWarning, match="cache_dir= is deprecated; use database_dir="):
        assert EvoPressConfig(compression="sparsity", target=0.5, cache_dir="db").database_dir == "db"
    with pytest.warns(FutureWarning, match="--calibration is deprecated; use --dataset"):
        assert parse_cli("--calibration", "sotu").dataset == "sotu"
    with pytest.raises(TypeError, match="Pass dataset= only"):
        SearchArguments(dataset="brown", calibration="sotu")


@pytest.mark.parametrize("kwargs, message", [
    (dict(compression="quantization", target=3, damp_percent=0), "damp_percent must be in (0, 1)"),
    (dict(compression="quantization", target=3, sym="yes"), "sym must be True or False"),
    (dict(compression="quantization", target=3, mse=-1), "mse must be >= 0"),
    (dict(compression="sparsity", target=0.5, modules_to_not_convert="down_proj"), "must be a list of module names"),
    (dict(compression="depth", target=0.25, modules_to_not_convert=["mlp"]), "depth pruning drops whole sub-blocks"),
    (dict(eval_windows=-1), "eval_windows must be a non-negative integer (0 = no evaluation"),
])
def test_new_settings_are_validated_early(kwargs, message):
    with pytest.raises(ValueError) as err:
        SearchArguments(**kwargs)
    assert message in str(err.value)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-settings"))


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(CALIB))
    return path


TINY_CLI = ["--generations", "1", "--offspring", "2", "--num-samples", "4", "--seq-len", "32", "--eval-seq-len", "32",
            "--top-k", "16", "--search-dtype", "float32", "--quiet"]


def test_eval_windows_zero_means_no_evaluation_on_the_command_line(tiny_dir, calib_file, tmp_path):
    rc = main(["search", "--model", str(tiny_dir), "--dataset", str(calib_file), "--output", str(tmp_path / "o"),
               "--eval-windows", "0", "--no-save-model", *TINY_CLI])
    assert rc == 0
    report = json.loads((tmp_path / "o" / "result.json").read_text())
    assert report["results"] == {} and report["evaluation"] is None


def _packed(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, EvoPressQuantLinear)}


def _assert_gptq_settings(db_dir, model, damp):
    settings = json.loads((db_dir / "manifest.json").read_text())["settings"]
    assert (settings["sym"], settings["act_order"], settings["damp"]) == (True, True, damp)
    packed = _packed(model)
    assert packed and "model.layers.0.mlp.down_proj" not in packed  # modules_to_not_convert
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), torch.nn.Linear)
    for name, layer in packed.items():
        data = layer.quantized_data()
        assert bool((data.zeros == 1 << (data.bits - 1)).all()), f"{name} is not symmetric"
        assert layer.act_order and layer.g_idx is not None  # desc_act: columns in act-order


def test_gptq_settings_from_the_command_line(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "cli"
    rc = main(["search", "--model", str(tiny_dir), "--compression", "quantization", "--target", "3", "--levels",
               "2,3,4", "--group-size", "32", "--sym", "--desc-act", "--damp-percent", "0.05",
               "--modules-to-not-convert", "layers.0.mlp.down_proj", "--database-dir", str(tmp_path / "db"),
               "--dataset", str(calib_file), "--output", str(out), "--eval-windows", "1", *TINY_CLI])
    assert rc == 0
    _assert_gptq_settings(tmp_path / "db", AutoModelForCausalLM.from_pretrained(out / "model"), 0.05)


def test_gptq_settings_from_python(tiny_dir, tmp_path):
    from optimum_evo.pipeline import run

    ctx = run(SearchArguments(model=str(tiny_dir), compression="quantization", target=3.0, levels=[2, 3, 4],
                              group_size=32, sym=True, desc_act=True, damp_percent=0.03,
                              modules_to_not_convert=["layers.0.mlp.down_proj"], database_dir=str(tmp_path / "db"),
                              dataset=CALIB, output_dir=str(tmp_path / "out"), generations=1, offspring=2,
                              num_samples=4, seq_len=32, eval_windows=0, top_k=16, search_dtype="float32",
                              progress=False))
    _assert_gptq_settings(tmp_path / "db", ctx.model, 0.03)


def test_gptq_settings_from_the_config(tiny_dir, tmp_path):
    cfg = EvoPressConfig(compression="quantization", target=3.0, levels=[2, 3, 4], group_size=32, sym=True,
                         desc_act=True, damp_percent=0.02, modules_to_not_convert=["layers.0.mlp.down_proj"],
                         database_dir=str(tmp_path / "db"), dataset=CALIB, generations=1, offspring=2, num_samples=4,
                         seq_len=32, eval_windows=0, top_k=16, search_dtype="float32", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the current names raise no deprecation warning
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=cfg, dtype=torch.float32)
    _assert_gptq_settings(tmp_path / "db", model, 0.02)
    assert model.config.quantization_config.profile["act_order"] is True
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert (saved["sym"], saved["desc_act"], saved["damp_percent"]) == (True, True, 0.02)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([[5, 9, 33, 40, 41, 70]])
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
