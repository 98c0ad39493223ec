"""Correct a 70%-sparse SmolLM2-135M with LoRA adapters (closed form, then KL distillation), save
them beside the compressed model and reload with the standard PEFT entry points.

    python examples/lora_correction.py            # ~15 minutes on 2 CPU cores
    python examples/lora_correction.py --quick    # a few minutes, to see the flow

The same from the command line, as part of an EvoPress search:

    optimum-evo search --model smollm2 --compression sparsity --target 0.7 --output out/sparse \
        --lora-correction 16 --lora-train-steps 100
"""

import copy
import sys

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_evo import embedded_model_path
from optimum_evo.compressors.calibrate import walk_blocks
from optimum_evo.compressors.obs import sparsegpt
from optimum_evo.correction import correct, merge_correction, save_correction
from optimum_evo.data import calibration_windows, evaluation_windows
from optimum_evo.fitness import evaluate

quick = "--quick" in sys.argv
path = embedded_model_path("smollm2")
tok = AutoTokenizer.from_pretrained(path)
dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
calib = calibration_windows("brown", tok, num_samples=4 if quick else 32, seq_len=512)
eval_ids = evaluation_windows("wikitext2", tok, 512, max_windows=2 if quick else 16)

# 1. Compress: uniform 70% SparseGPT (any sparse or quantized model with nn.Linear layers works).
sparse = copy.deepcopy(dense)
for block in walk_blocks(sparse, calib, desc="SparseGPT"):
    H = block.hessians()
    for name, linear in block.linears().items():
        with torch.no_grad():
            linear.weight.copy_(sparsegpt(linear.weight, H[name], 0.7))
sparse_linears = [n for n, m in sparse.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
sparse.save_pretrained("outputs/example-lora/model")
tok.save_pretrained("outputs/example-lora/model")
print("sparse ppl", evaluate(sparse, eval_ids, progress=False)["perplexity"])

# 2. Correct: EoRA closed form (rank <= 16, 4 % of the model's size), then KL distillation.
corrected = correct(sparse, dense, calib, rank=16, param_budget=3_000_000,
                    train={"max_steps": 4 if quick else 100, "learning_rate": 5e-4})
print("corrected ppl", evaluate(corrected.get_base_model(), eval_ids, progress=False)["perplexity"])

# 3. Save beside the compressed model; every standard loader restores model + adapter.
folder = save_correction(corrected, "outputs/example-lora/model")
reloaded = AutoPeftModelForCausalLM.from_pretrained(str(folder))
ids = tok("The old lighthouse keeper", return_tensors="pt").input_ids
with torch.inference_mode():
    print(tok.decode(reloaded.generate(ids, max_new_tokens=20, do_sample=False)[0]))

# 4. Merging keeps the exact 70% sparsity (the part of the correction on pruned weights is lost).
merged = merge_correction(reloaded, kinds={n: "sparsity" for n in sparse_linears})
print("merged ppl", evaluate(merged, eval_ids, progress=False)["perplexity"])
