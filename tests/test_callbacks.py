"""Trainer callbacks: sparsity masks survive training, eval_kl/eval_ppl are logged, compress after training."""

import copy
import json

import pytest
import torch
from conftest import tiny_model
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from optimum_evo.compressors.obs import magnitude_prune
from optimum_evo.fitness import TeacherCache, evaluate
from optimum_evo.integrations.callbacks import (
    CompressAfterTrainingCallback, EvaluationCallback, SparsityPreservingCallback,
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: avoid oversubscribing shared CPUs
    yield
    torch.set_num_threads(before)


class LMData(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _ids(n=8, t=24, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _args(tmp_path, steps=6, **kw):
    return TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=steps, learning_rate=1e-2,
                             per_device_train_batch_size=2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_steps=100, disable_tqdm=True, **kw)


def _sparse_model():
    model = tiny_model("llama")
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and ".layers." in name:
                m.weight.copy_(magnitude_prune(m.weight, 0.6))
    return model


@pytest.mark.parametrize("with_callback", [True, False])
def test_sparsity_masks_survive_training(tmp_path, with_callback):
    model = _sparse_model()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and ".layers." in n}
    cb = SparsityPreservingCallback(model)
    assert set(cb.masks) == set(before)  # lm_head is dense: not protected
    assert all(abs(s - 0.6) < 1e-3 for s in cb.sparsity().values())
    Trainer(model=model, args=_args(tmp_path), train_dataset=LMData(_ids()),
            callbacks=[cb] if with_callback else []).train()
    kept = changed = 0
    for n, w0 in before.items():
        w = model.get_submodule(n).weight.detach()
        kept += torch.equal(w == 0, w0 == 0)
        changed += not torch.equal(w, w0)
    assert changed == len(before)  # training did update every layer
    if with_callback:
        assert kept == len(before)  # exact same zeros, hence exact same sparsity
        assert all(abs(s - 0.6) < 1e-3 for s in cb.sparsity().values())
    else:
        assert kept == 0  # without the callback, the optimizer fills the pruned weights in


def test_sparsity_callback_module_selection_and_errors():
    from peft import LoraConfig, get_peft_model

    model = _sparse_model()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["down_proj"]))
    masked = SparsityPreservingCallback(peft_model).masks
    assert len(masked) == 42 and not any("lora_" in n for n in masked)  # lora_B starts at zero: not a mask
    cb = SparsityPreservingCallback(model, modules=["model.layers.0.mlp.down_proj"])
    assert list(cb.masks) == ["model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match="not found"):
        SparsityPreservingCallback(model, modules=["nope"])
    with pytest.raises(ValueError, match="min_sparsity"):
        SparsityPreservingCallback(model, min_sparsity=0)


def test_evaluation_callback_logs_kl_and_perplexity(tmp_path):
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    eval_ids = _ids(n=3, seed=5)
    teacher = TeacherCache.build(dense, eval_ids, "topk", top_k=32, progress=False)
    cb = EvaluationCallback(eval_ids, teacher=teacher)
    trainer = Trainer(model=model, args=_args(tmp_path, steps=4, eval_strategy="steps", eval_steps=2),
                      train_dataset=LMData(_ids()), eval_dataset=LMData(_ids(n=2, seed=3)), callbacks=[cb])
    metrics = trainer.evaluate()
    assert metrics["eval_kl"] == pytest.approx(0.0, abs=1e-5)  # untrained: identical to the teacher
    assert metrics["eval_ppl"] == pytest.approx(evaluate(dense, eval_ids, progress=False)["perplexity"], rel=1e-5)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "eval_kl" in e]
    assert [e["step"] for e in logged] == [2, 4]  # log_history restarts with train()
    assert all("eval_loss" in e and "eval_ppl" in e for e in logged)  # merged into the Trainer's entries
    assert logged[-1]["eval_kl"] > 1e-3  # training on random tokens moved the model away from the teacher
    with torch.no_grad():
        assert logged[-1]["eval_ppl"] == pytest.approx(evaluate(model, eval_ids, progress=False)["perplexity"], rel=1e-4)
    with pytest.raises(ValueError, match="same windows"):
        EvaluationCallback(eval_ids[:2], teacher=teacher)


CALIB = ["The committee met on Tuesday to discuss the new budget for the school district. " * 30] * 10


def test_compress_after_training_saves_and_pushes(tmp_path, hub):
    from optimum_evo.embedded_models import embedded_model_path

    tok = AutoTokenizer.from_pretrained(embedded_model_path("smollm2"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    ids = tok(CALIB[0], return_tensors="pt").input_ids[0][:64].view(4, 16)
    cb = CompressAfterTrainingCallback(
        {"compression": "depth", "target": 0.25, "mode": "block", "generations": 1, "offspring": 2,
         "dataset": CALIB, "eval_dataset": CALIB, "num_samples": 4, "seq_len": 16, "eval_windows": 2,
         "eval_seq_len": 16, "top_k": 16, "search_dtype": "float32", "progress": False},
        output_dir=str(tmp_path / "evo"), push_to_hub="me/tiny-evopress")
    Trainer(model=model, args=_args(tmp_path, steps=2), train_dataset=LMData(ids), processing_class=tok,
            callbacks=[cb]).train()
    saved = LlamaForCausalLM.from_pretrained(tmp_path / "evo" / "model")
    assert saved.config.num_hidden_layers == 3  # one of four blocks dropped
    assert (tmp_path / "evo" / "result.json").is_file() and (tmp_path / "evo" / "model" / "tokenizer.json").is_file()
    assert cb.report["results"]["evopress"]["perplexity"] > 0
    # the repository is created, then every saved file goes up in one commit
    assert [repo for repo, _ in hub.repos] == ["me/tiny-evopress"]
    (commit,) = hub.commits
    assert commit["repo_id"] == "me/tiny-evopress"
    assert commit["commit_message"] == "EvoPress-compressed model (optimum-evo)"
    saved_files = {p.name: p.read_bytes() for p in (tmp_path / "evo" / "model").iterdir() if p.is_file()}
    assert set(commit["files"]) == set(saved_files) and "model.safetensors" in saved_files
    for name, data in commit["files"].items():  # the card and config name the repo, not local folders
        if name in ("README.md", "config.json"):
            assert b"/tmp" not in data and str(tmp_path).encode() not in data, name
        else:
            assert data == saved_files[name], name
    pushed = json.loads(commit["files"]["config.json"])["quantization_config"]
    assert pushed["metrics"]["model"] == "model-fine-tuned"
    assert pushed["profile"] == saved.config.quantization_config.profile
    with pytest.raises(ValueError, match="target"):
        CompressAfterTrainingCallback({"compression": "depth", "target": 2.0})


class Recorder(TrainerCallback):
    """Stands for a report_to integration (W&B, TensorBoard, ...): those only see `on_log`."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({**(logs or {}), "step": state.global_step})


@pytest.mark.parametrize("order", ["recorder first", "callback first"])
def test_evaluation_values_reach_the_report_to_integrations(tmp_path, order):
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    eval_ids = _ids(n=2, seed=5)
    cb = EvaluationCallback(eval_ids, teacher=TeacherCache.build(dense, eval_ids, "topk", top_k=32, progress=False))
    recorder = Recorder()
    trainer = Trainer(model=model, args=_args(tmp_path, steps=4, eval_strategy="steps", eval_steps=2),
                      train_dataset=LMData(_ids()), eval_dataset=LMData(_ids(n=2, seed=3)),
                      callbacks=[recorder, cb] if order == "recorder first" else [cb, recorder])
    trainer.train()
    seen = [e for e in recorder.logs if "eval_kl" in e]
    assert [e["step"] for e in seen] == [2, 4]
    for entry, computed in zip(seen, cb.history):
        assert entry["eval_kl"] == computed["eval_kl"] and entry["eval_ppl"] == computed["eval_ppl"]
    assert seen[-1]["eval_kl"] > 1e-3
    # one merged evaluation entry per evaluation in the Trainer's own history, not a second one
    assert [e["step"] for e in trainer.state.log_history if "eval_kl" in e] == [2, 4]


def test_evaluation_callback_logs_through_a_given_trainer(tmp_path):
    model = tiny_model("llama")
    eval_ids = _ids(n=2, seed=5)
    recorder = Recorder()
    trainer = Trainer(model=model, args=_args(tmp_path, steps=2), train_dataset=LMData(_ids()),
                      eval_dataset=LMData(_ids(n=2, seed=3)), callbacks=[recorder])
    cb = EvaluationCallback(eval_ids, trainer=trainer)
    trainer.add_callback(cb)
    metrics = trainer.evaluate()
    assert "eval_kl" not in metrics  # no teacher: perplexity only
    (entry,) = [e for e in recorder.logs if "eval_ppl" in e]
    assert entry["eval_ppl"] == metrics["eval_ppl"] == cb.history[-1]["eval_ppl"]


def _direct_kl(dense, model, ids):
    with torch.no_grad():
        t = torch.log_softmax(dense(ids).logits.double(), -1)
        s = torch.log_softmax(model(ids).logits.double(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_kl_divergence_evaluate_module_matches_the_definition():
    import evaluate
    import numpy as np

    from optimum_evo.integrations.metrics import KL_DIVERGENCE

    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(3, 5, 11)), rng.normal(size=(3, 5, 11))
    kl = evaluate.load(KL_DIVERGENCE)
    result = kl.compute(predictions=student, references=teacher)
    t = torch.log_softmax(torch.tensor(teacher), -1)
    s = torch.log_softmax(torch.tensor(student), -1)
    per_token = (t.exp() * (t - s)).sum(-1)
    assert result["tokens"] == 15 and result["kl_divergence"] == pytest.approx(float(per_token.mean()), rel=1e-4)
    mask = np.zeros((3, 5), dtype=bool)
    mask[0, :2] = True
    masked = kl.compute(predictions=student, references=teacher, mask=mask)
    assert masked["tokens"] == 2 and masked["kl_divergence"] == pytest.approx(float(per_token[0, :2].mean()), rel=1e-4)
    assert kl.compute(predictions=teacher, references=teacher)["kl_divergence"] == pytest.approx(0.0, abs=1e-9)


def test_kl_divergence_metric_as_trainer_compute_metrics(tmp_path):
    from optimum_evo.integrations.metrics import KLDivergenceMetric

    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    eval_ids = _ids(n=3, seed=5)
    recorder = Recorder()
    trainer = Trainer(model=model, args=_args(tmp_path, steps=4), train_dataset=LMData(_ids()),
                      eval_dataset=LMData(eval_ids), compute_metrics=KLDivergenceMetric(teacher=dense),
                      callbacks=[recorder])
    assert trainer.evaluate()["eval_kl_divergence"] == pytest.approx(0.0, abs=1e-6)  # identical to its teacher
    trainer.train()
    metrics = trainer.evaluate()
    expected = _direct_kl(dense, model.eval(), eval_ids)
    assert expected > 1e-3 and metrics["eval_kl_divergence"] == pytest.approx(expected, rel=1e-3)
    assert recorder.logs[-1]["eval_kl_divergence"] == metrics["eval_kl_divergence"]  # logged like eval_loss
    with pytest.raises(TypeError, match="teacher"):
        KLDivergenceMetric(teacher="dense")
