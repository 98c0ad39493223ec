"""Drop 25% of SmolLM2-135M's attention and MLP sub-blocks with EvoPress, then use the result.

    python examples/depth_pruning.py            # about 30 minutes on 2 CPU cores (fast preset)
    python examples/depth_pruning.py --quick    # a few minutes, to see the flow
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_evo  # noqa: F401  (reloads EvoPress checkpoints)
from optimum_evo import SearchArguments, run_search
from optimum_evo.pipeline import format_table

quick = "--quick" in sys.argv
args = SearchArguments(
    model="smollm2",            # embedded SmolLM2-135M; a local folder or Hub id works too
    compression="depth",
    target=0.25,                # 7 attention + 7 MLP sub-blocks of 30 layers
    output_dir="outputs/example-depth",
    preset="fast",
    generations=3 if quick else None,
    num_samples=16 if quick else 128,
    eval_windows=4 if quick else 40,
)
report = run_search(args)
print(format_table(report))

# The compressed model: whole dropped blocks are gone; attention-/MLP-only drops are recorded in the
# checkpoint's quantization_config profile and rebuilt on load (with `import optimum_evo`).
model = AutoModelForCausalLM.from_pretrained("outputs/example-depth/model")
tok = AutoTokenizer.from_pretrained("outputs/example-depth/model")
ids = tok("The old lighthouse keeper", return_tensors="pt").input_ids
with torch.inference_mode():
    print(tok.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))
