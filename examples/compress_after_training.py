"""Fine-tune SmolLM2-135M briefly, then let `CompressAfterTrainingCallback` run an EvoPress depth
search on the trained weights and save (optionally push) the compressed model.

    python examples/compress_after_training.py           # ~30 minutes on 2 CPU cores
    python examples/compress_after_training.py --quick   # a few minutes
    python examples/compress_after_training.py --push me/smollm2-evopress   # also upload (needs the Hub)
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from optimum_evo import embedded_model_path
from optimum_evo.data import calibration_windows
from optimum_evo.integrations.callbacks import CompressAfterTrainingCallback
from optimum_evo.pipeline import format_table

quick = "--quick" in sys.argv
push = sys.argv[sys.argv.index("--push") + 1] if "--push" in sys.argv else None
path = embedded_model_path("smollm2")
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
train = calibration_windows("sotu", tok, num_samples=8 if quick else 100, seq_len=256)

compress = CompressAfterTrainingCallback(
    {"compression": "depth", "target": 0.25, "generations": 2 if quick else None,
     "num_samples": 8 if quick else 128, "eval_windows": 2 if quick else 40},
    output_dir="outputs/example-compress-after-training", push_to_hub=push)
args = TrainingArguments(output_dir="outputs/example-ft", max_steps=4 if quick else 50, learning_rate=2e-5,
                         per_device_train_batch_size=1, save_strategy="no", report_to=[])
Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in train],
        processing_class=tok, callbacks=[compress]).train()
print(format_table(compress.report))
print("compressed model in outputs/example-compress-after-training/model")
