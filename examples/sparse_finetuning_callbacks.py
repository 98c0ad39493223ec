"""Fine-tune a 50%-sparse SmolLM2-135M with `Trainer` while keeping its exact sparsity
(`SparsityPreservingCallback`) and logging KL to the dense model and WikiText-2 perplexity at every
evaluation (`EvaluationCallback`: `eval_kl`, `eval_ppl`).

    python examples/sparse_finetuning_callbacks.py           # ~10 minutes on 2 CPU cores
    python examples/sparse_finetuning_callbacks.py --quick
"""

import copy
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from optimum_evo import embedded_model_path
from optimum_evo.compressors.obs import magnitude_prune
from optimum_evo.data import calibration_windows, evaluation_windows
from optimum_evo.fitness import TeacherCache
from optimum_evo.integrations.callbacks import EvaluationCallback, SparsityPreservingCallback

quick = "--quick" in sys.argv
path = embedded_model_path("smollm2")
tok = AutoTokenizer.from_pretrained(path)
dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
model = copy.deepcopy(dense)
with torch.no_grad():
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            m.weight.copy_(magnitude_prune(m.weight, 0.5))

train = calibration_windows("brown", tok, num_samples=8 if quick else 200, seq_len=256)
dataset = [{"input_ids": x, "labels": x} for x in train]
eval_ids = evaluation_windows("wikitext2", tok, 512, max_windows=2 if quick else 8)
keep_sparse = SparsityPreservingCallback(model)
evaluation = EvaluationCallback(eval_ids, teacher=TeacherCache.build(dense, eval_ids, "topk", 512))
args = TrainingArguments(output_dir="outputs/example-sparse-ft", max_steps=4 if quick else 100, learning_rate=2e-5,
                         per_device_train_batch_size=1, eval_strategy="steps", eval_steps=2 if quick else 25,
                         logging_steps=5, save_strategy="no", report_to=[])
trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset[:2],
                  callbacks=[keep_sparse, evaluation])
trainer.train()
for entry in evaluation.history:
    print(entry)                                    # {'step': ..., 'eval_ppl': ..., 'eval_kl': ...}
print("sparsity per layer after training:", sorted(set(round(s, 4) for s in keep_sparse.sparsity().values())))
