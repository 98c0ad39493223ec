"""Bad input gets a clear, early, one-line error naming the problem and the fix: a table of cases
through the command line and through EvoPressConfig (the same table is in docs/reliability.md)."""

import time
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM, OPTConfig, OPTForCausalLM,
)

from optimum_evo import EvoPressConfig
from optimum_evo.cli import main
from optimum_evo.integrations.transformers import EvoPressConfigError

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"

# (case, extra command-line arguments, what the error says). {tiny} etc. are filled in by the fixture.
CLI_CASES = [
    ("unknown compression", ["--compression", "pruning"], "Unknown compression 'pruning'; choose one of"),
    ("depth target above 1", ["--target", "1.5"], "target must be a fraction in (0, 1) of the sub-blocks"),
    ("depth target 0", ["--target", "0"], "target must be a fraction in (0, 1) of the sub-blocks"),
    ("sparsity target above 1", ["--compression", "sparsity", "--target", "1.2"], "fraction in (0, 1) of the weights"),
    ("bits outside the levels", ["--compression", "quantization", "--target", "12"], "within the levels"),
    ("duplicated levels", ["--compression", "quantization", "--target", "3", "--levels", "2,2,4"],
     "levels must be distinct bit widths"),
    ("levels out of range", ["--compression", "quantization", "--target", "3", "--levels", "0,3"],
     "distinct bit widths in 1..8"),
    ("levels not numbers", ["--compression", "quantization", "--levels", "2,x"], "expected comma-separated integers"),
    ("negative group size", ["--compression", "quantization", "--target", "3", "--group-size", "-1"],
     "group_size must be >= 0"),
    ("damping 0", ["--compression", "quantization", "--target", "3", "--damp-percent", "0"],
     "damp_percent must be in (0, 1)"),
    ("negative mse", ["--compression", "quantization", "--target", "3", "--mse", "-1"], "mse must be >= 0"),
    ("sparsity step above 1", ["--compression", "sparsity", "--target", "0.5", "--sparsity-step", "1.5"],
     "sparsity_step must be in (0, 1)"),
    ("no sparsity offsets", ["--compression", "sparsity", "--target", "0.5", "--max-offset", "0"], "max_offset >= 1"),
    ("bad module regex", ["--compression", "sparsity", "--target", "0.5", "--modules", "(mlp"],
     "modules must be a regular expression"),
    ("more memory than the machine has", ["--model", "{llama}", "--num-samples", "100000000"],
     "would allocate about"),
    ("module selection for depth", ["--modules", "mlp"], "depth pruning drops whole sub-blocks"),
    ("calibration on the test text", ["--dataset", "wikitext2"], "is the evaluation text"),
    ("missing calibration file", ["--dataset", "/nonexistent/calib.txt"], "does not exist"),
    ("empty calibration file", ["--dataset", "{empty}"], "is empty"),
    ("unknown preset", ["--preset", "turbo"], "Unknown preset 'turbo'"),
    ("negative generations", ["--generations", "-1"], "generations must be positive"),
    ("no offspring", ["--offspring", "0"], "offspring must be positive"),
    ("no calibration windows", ["--num-samples", "0"], "num_samples must be a positive integer"),
    ("one-token windows", ["--seq-len", "1"], "seq_len must be at least 2"),
    ("top-K of 0", ["--top-k", "0"], "top_k must be a positive integer"),
    ("negative evaluation windows", ["--eval-windows", "-1"], "eval_windows must be a non-negative integer"),
    ("evaluation windows not a number", ["--eval-windows", "many"], "expected a number of windows or 'all'"),
    ("unknown search dtype", ["--search-dtype", "float16"], "invalid choice: 'float16'"),
    ("target not a number", ["--target", "abc"], "--target: could not convert"),
    ("quantized export of a depth run", ["--export", "gptq"], "needs --compression quantization"),
    ("unknown export format", ["--export", "onnx"], "Unknown export format 'onnx'"),
    ("correction of a depth run", ["--lora-correction", "8"], "a depth-pruned model has no per-linear"),
    ("unknown correction method", ["--lora-method", "pca"], "invalid choice: 'pca'"),
    ("no output folder", ["--output", ""], "--output is required"),
    ("missing model folder", ["--model", "/nonexistent/model-dir"], "not an existing local directory"),
    ("model path is a file", ["--model", "{file}"], "is a file, not a directory"),
    ("model folder without config", ["--model", "{empty_dir}"], "has no config.json"),
    ("model folder without weights", ["--model", "{config_only}"], "has a config.json but no weights"),
    ("architecture without decoder blocks (Mamba)", ["--model", "{mamba}"], "no recognisable decoder layers"),
    ("OPT-style blocks (fc1 / fc2, no MLP module)", ["--model", "{opt}"], "no recognisable decoder layers"),
    ("GPT-2 (Conv1D) for quantization", ["--model", "{gpt2}", "--compression", "quantization", "--target", "3"],
     "hold no torch.nn.Linear layers"),
    ("an EvoPress checkpoint as the model", ["--model", "{evopress}"], "is an EvoPress checkpoint"),
    ("module selection matching nothing", ["--model", "{llama}", "--compression", "sparsity", "--target", "0.5",
                                           "--modules", "nothing_matches"], "select none of the decoder blocks'"),
]

CONFIG_CASES = [
    ("unknown compression", dict(compression="pruning"), "Unknown compression 'pruning'"),
    ("target given as text", dict(target="3"), "target must be a number"),
    ("dataset of the wrong type", dict(dataset=123), "dataset must be a name, a file path or a list of strings"),
    ("empty calibration texts", dict(dataset=["", " "]), "The dataset text is empty"),
    ("lora_correction=True", dict(compression="sparsity", target=0.5, lora_correction=True), "must be a rank"),
    ("unknown correction key", dict(compression="sparsity", target=0.5, lora_correction={"rank": 4, "rnak": 2}),
     "Unknown lora_correction keys"),
    ("newer checkpoint format", dict(format_version=99), "Upgrade optimum-evo"),
    ("profile set by hand", dict(profile="x"), "profile must be a dict"),
    ("unknown setting", dict(bits=3), "Unknown EvoPressConfig settings ['bits']"),
    ("unknown search dtype", dict(search_dtype="float16"), "search_dtype must be one of"),
    ("duplicated levels", dict(compression="quantization", target=3, levels=[2, 2]), "distinct bit widths"),
    ("modules_to_not_convert as text", dict(compression="sparsity", target=0.5, modules_to_not_convert="down_proj"),
     "must be a list of module names"),
    ("sym not a bool", dict(compression="quantization", target=3, sym="yes"), "sym must be True or False"),
    ("negative evaluation windows", dict(eval_windows=-1), "eval_windows must be a non-negative integer"),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from test_hf_quantizer import CALIB, char_tokenizer, save_tiny

    root = tmp_path_factory.mktemp("bad-input")
    out = {"empty": root / "empty.txt", "file": root / "model.bin", "empty_dir": root / "empty-dir",
           "config_only": root / "config-only", "mamba": root / "mamba", "opt": root / "opt", "gpt2": root / "gpt2",
           "llama": root / "llama", "evopress": root / "evopress"}
    out["empty"].write_text("\n \n")
    out["file"].write_bytes(b"x")
    out["empty_dir"].mkdir()
    out["config_only"].mkdir()
    (out["config_only"] / "config.json").write_text("{}")
    tok = char_tokenizer()
    for key, model in (("mamba", MambaForCausalLM(MambaConfig(vocab_size=128, hidden_size=16, num_hidden_layers=2,
                                                                 state_size=4))),
                       ("opt", OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                                        num_attention_heads=2, word_embed_proj_dim=16))),
                       ("gpt2", GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=16, n_layer=2, n_head=2)))):
        model.save_pretrained(out[key])
        tok.save_pretrained(out[key])
    save_tiny(out["llama"])
    # an EvoPress checkpoint: a tiny depth run's saved model
    import optimum_evo  # noqa: F401
    from transformers import AutoModelForCausalLM

    calib = root / "calib.txt"
    calib.write_text("\n".join(CALIB))
    cfg = EvoPressConfig(compression="depth", target=0.25, dataset=[CALIB[0]], generations=1, offspring=2,
                         num_samples=2, seq_len=16, eval_windows=0, top_k=8, search_dtype="float32", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out["llama"], quantization_config=cfg, dtype=torch.float32)
    model.save_pretrained(out["evopress"])
    out["calib"] = calib
    return out


@pytest.mark.parametrize("case, extra, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_line_fails_early_with_one_line(paths, tmp_path, capsys, case, extra, message, one_thread):
    extra = [a.format(**{k: str(v) for k, v in paths.items()}) for a in extra]
    argv = ["search", "--output", str(tmp_path / "out"), "--dataset", str(paths["calib"]), "--seq-len", "16",
            "--num-samples", "2", *extra]
    if "--output" in extra:
        argv = ["search", *extra]
    start = time.perf_counter()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals (invalid choice, bad number)
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    last = err.splitlines()[-1]
    assert message in last, err
    assert time.perf_counter() - start < 20  # before any search, database or teacher cache
    assert not (tmp_path / "out" / "result.json").exists()


@pytest.mark.parametrize("case, kwargs, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_fails_at_construction_with_one_line(case, kwargs, message):
    with pytest.raises(EvoPressConfigError) as err:
        EvoPressConfig(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_dtype_on_load_is_refused(tmp_path):
    from test_hf_quantizer import save_tiny
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / "tiny")
    with pytest.raises(ValueError, match="run in float32, bfloat16 or float16"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=EvoPressConfig(), dtype=torch.int8)


def test_the_docs_hold_the_table():
    text = DOC.read_text(encoding="utf-8")
    for case, _, message in CLI_CASES + CONFIG_CASES:
        assert case in text and message.replace("|", r"\|") in text, case
