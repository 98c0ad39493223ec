"""lm-eval integration: the registered model ``evopress`` loads the real compressed model (with its
LoRA correction), and ``lm_eval --model evopress`` on a local task reports the accuracy computed
directly from the model's log-likelihoods."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

QUESTIONS = [
    ("The capital of France is", ["Paris", "Berlin", "Madrid"], 0),
    ("The capital of Germany is", ["Rome", "Berlin", "Lisbon"], 1),
    ("Water freezes at zero degrees", ["Celsius", "dollars", "kilometres"], 0),
    ("The opposite of hot is", ["cold", "blue", "seven"], 0),
    ("Two plus two equals", ["five", "four", "a banana"], 1),
    ("The sun rises in the", ["west", "north", "east"], 2),
    ("The largest planet of the solar system is", ["Mercury", "Jupiter", "the Moon"], 1),
    ("The chemical symbol of gold is", ["Ag", "Fe", "Au"], 2),
    ("In 1492 Columbus sailed across the", ["Atlantic", "Pacific", "desert"], 0),
    ("The author of Hamlet is", ["Dickens", "Shakespeare", "Tolstoy"], 1),
]


def write_task(folder: Path) -> str:
    """A local multiple-choice task (YAML + JSONL data file), as lm-eval reads with --include_path."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / "questions.yaml").write_text(f"""task: evopress_questions
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return "evopress_questions"


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as lm-eval does (the pair encoded whole, the
    context's tokens taken off the front)."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def direct_results(model, tokenizer):
    """(accuracy, per-question log-likelihoods of every choice) computed from the model itself."""
    lls = [[loglikelihood(model, tokenizer, q, " " + c) for c in choices] for q, choices, _ in QUESTIONS]
    correct = [max(range(len(ll)), key=ll.__getitem__) == answer for ll, (_, _, answer) in zip(lls, QUESTIONS)]
    return sum(correct) / len(correct), lls


@pytest.mark.integration
def test_lm_eval_cli_evaluates_the_compressed_smollm2(tmp_path):
    """``lm_eval --model evopress --model_args pretrained=DIR`` (the console script, a fresh process
    that never imports optimum-evo itself) on a local task: the accuracy and every log-likelihood
    are those of the compressed model, not of its dense base."""
    import optimum_evo
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_evo.cli import main

    out = tmp_path / "depth"
    assert main(["search", "-m", "smollm2", "--compression", "depth", "--target", "0.1", "--generations", "1",
                 "--offspring", "2", "--num-samples", "4", "--seq-len", "64", "--eval-windows", "0",
                 "--search-dtype", "float32", "--quiet", str(out)]) == 0
    checkpoint = out / "model"
    task = write_task(tmp_path / "tasks")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    lm_eval = Path(sys.executable).with_name("lm_eval")
    run = subprocess.run([str(lm_eval), "--model", "evopress", "--model_args", f"pretrained={checkpoint},dtype=float32",
                          "--tasks", task, "--include_path", str(tmp_path / "tasks"), "--output_path",
                          str(tmp_path / "results"), "--log_samples", "--batch_size", "1"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    reported = json.loads(results_file.read_text())["results"][task]["acc,none"]
    (samples_file,) = (tmp_path / "results").rglob(f"samples_{task}_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    lm_eval_lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert optimum_evo.check_evopress_model(model) is not None
    accuracy, lls = direct_results(model, tokenizer)
    assert reported == accuracy
    assert torch.allclose(torch.tensor(lm_eval_lls, dtype=torch.float64), torch.tensor(lls, dtype=torch.float64),
                          atol=1e-3)
    dense = AutoModelForCausalLM.from_pretrained(optimum_evo.embedded_model_path("smollm2"), dtype=torch.float32)
    _, dense_lls = direct_results(dense.eval(), tokenizer)
    assert not torch.allclose(torch.tensor(dense_lls), torch.tensor(lls), atol=1e-2)  # it is not the base model


@pytest.fixture(scope="module")
def corrected(tmp_path_factory):
    """A tiny sparse EvoPress checkpoint with its LoRA correction in lora-correction/."""
    from test_hf_quantizer import save_tiny, tiny_config
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lm-eval")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = tiny_config("sparsity", root, lora_correction=4)
        model = AutoModelForCausalLM.from_pretrained(save_tiny(root / "tiny"), dtype=torch.float32,
                                                     quantization_config=config)
        model.save_pretrained(root / "sparse")
    finally:
        torch.set_num_threads(before)
    from test_hf_quantizer import char_tokenizer

    char_tokenizer().save_pretrained(root / "sparse")
    assert (root / "sparse" / "lora-correction" / "adapter_config.json").is_file()
    return root / "sparse"


def _lm_eval_loglikelihoods(lm, pairs):
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    return [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]


PAIRS = [("The committee met on", " Tuesday"), ("the members agreed that", " the library should stay open")]


def test_evopress_model_is_registered_and_loads_the_lora_correction(corrected, one_thread):
    from lm_eval.api.registry import get_model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from optimum_evo.correction.peft_io import load_corrected
    from optimum_evo.integrations.lm_eval import EvoPressLM
    from test_hf_quantizer import char_tokenizer

    assert get_model("evopress") is EvoPressLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models are still there
    lm = EvoPressLM(pretrained=str(corrected), device="cpu", dtype="float32")
    assert lm.has_correction and isinstance(lm.model, PeftModel)
    tok = char_tokenizer()
    direct = [loglikelihood(load_corrected(corrected).eval(), tok, c, x) for c, x in PAIRS]
    assert _lm_eval_loglikelihoods(lm, PAIRS) == pytest.approx(direct, abs=1e-4)

    alone = EvoPressLM(pretrained=str(corrected), device="cpu", dtype="float32", lora_correction=False)
    assert not alone.has_correction and not isinstance(alone.model, PeftModel)
    compressed = AutoModelForCausalLM.from_pretrained(corrected).eval()
    without = [loglikelihood(compressed, tok, c, x) for c, x in PAIRS]
    assert _lm_eval_loglikelihoods(alone, PAIRS) == pytest.approx(without, abs=1e-4)
    assert without != pytest.approx(direct, abs=1e-3)  # the correction changes the model


def test_evaluate_tasks_runs_a_local_task_and_refuses_unknown_ones(corrected, tmp_path, one_thread, monkeypatch):
    from optimum_evo.integrations.lm_eval import evaluate_tasks
    from transformers import AutoModelForCausalLM

    from optimum_evo.correction.peft_io import load_corrected
    from test_hf_quantizer import char_tokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = write_task(tmp_path / "tasks")
    results = evaluate_tasks(corrected, [task], include_path=tmp_path / "tasks", device="cpu", dtype="float32")
    accuracy, _ = direct_results(load_corrected(corrected).eval(), char_tokenizer())
    assert results["results"][task]["acc,none"] == accuracy
    without = evaluate_tasks(corrected, [task], include_path=tmp_path / "tasks", device="cpu", dtype="float32",
                             lora_correction=False)
    assert without["results"][task]["acc,none"] == direct_results(
        AutoModelForCausalLM.from_pretrained(corrected).eval(), char_tokenizer())[0]
    with pytest.raises(ValueError, match="Unknown lm-eval tasks"):
        evaluate_tasks(corrected, ["no_such_task"], device="cpu")


def test_the_startup_hook_registers_evopress_without_importing_optimum_evo():
    code = ("import sys\n"
            "assert '_optimum_evo_lm_eval' in sys.modules, 'optimum_evo_lm_eval.pth is not installed'\n"
            "import lm_eval.models\n"
            "from lm_eval.api.registry import get_model, model_registry\n"
            "assert 'evopress' in model_registry and 'hf' in model_registry and 'optimum_evo' not in sys.modules\n"
            "assert get_model('evopress').__module__ == 'optimum_evo.integrations.lm_eval'\n"
            "print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr
