"""Compress SmolLM2-135M inside ``from_pretrained`` with an ``EvoPressConfig``, evaluate it, save it,
reload it, and (optionally) push it to the Hub. One script for the three compression kinds.

    python examples/from_pretrained.py quantization --quick     # 3.0 average bits: half of the linears at 2, half at 4 bits
    python examples/from_pretrained.py sparsity --quick         # 50 % unstructured sparsity
    python examples/from_pretrained.py depth --quick            # drop 20 % of the sub-blocks
    python examples/from_pretrained.py depth --push-to me/smollm2-evopress-depth   # needs a Hub login

``--quick`` uses tiny calibration / search / evaluation settings (minutes on 2 CPU cores; the first
quantization or sparsity run also builds the level database, reused by later runs). Without it the
fast preset runs with the default settings (128 x 512 calibration tokens, 40 evaluation windows).
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_evo import EvoPressConfig, embedded_model_path  # importing optimum_evo registers "evopress"
from optimum_evo.data import evaluation_windows
from optimum_evo.fitness import evaluate

parser = argparse.ArgumentParser()
parser.add_argument("compression", choices=["depth", "sparsity", "quantization"])
parser.add_argument("--quick", action="store_true", help="tiny settings, to see the flow")
parser.add_argument("--output", default=None, help="save folder (default outputs/from-pretrained-KIND)")
parser.add_argument("--push-to", default=None, help="Hub repo id to push the compressed model to")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
args = parser.parse_args()

path = embedded_model_path("smollm2")  # a local folder; any causal LM folder or Hub id works
output = args.output or f"outputs/from-pretrained-{args.compression}"
dtype = getattr(torch, args.dtype)
settings = {
    "depth": dict(target=0.2),
    "sparsity": dict(target=0.5),
    "quantization": dict(target=3.0, levels=[2, 4] if args.quick else [2, 3, 4, 5, 6, 8]),
}[args.compression]
quick = dict(num_samples=8, seq_len=128, generations=2, offspring=4, eval_windows=2, eval_seq_len=128,
             top_k=128, search_dtype="float32") if args.quick else {}
config = EvoPressConfig(compression=args.compression, dataset="brown", preset="fast", **settings, **quick)

# 1. Load + search + compress, in one call.
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype)
tokenizer = AutoTokenizer.from_pretrained(path)
found = model.config.quantization_config
print(f"searched and compressed in {time.perf_counter() - start:.0f} s")
print("profile summary:", found.summary())
print("metrics recorded in the config:", found.metrics.get("evaluation", found.metrics["search"]))

# 2. Evaluate (WikiText-2 perplexity on a few windows).
windows = evaluation_windows("wikitext2", tokenizer, seq_len=128 if args.quick else 512,
                             max_windows=2 if args.quick else 40)
print("WikiText-2 perplexity:", round(evaluate(model, windows, progress=False)["perplexity"], 2))

# 3. Save (weights packed / zeros / blocks removed, config with the profile, README.md model card).
model.save_pretrained(output)
tokenizer.save_pretrained(output)

# 4. Reload: no search, the compressed modules are rebuilt from the profile in config.json.
reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=dtype)
ids = tokenizer("The old lighthouse keeper climbed the stairs", return_tensors="pt").input_ids
with torch.inference_mode():
    diff = (reloaded(ids).logits - model(ids).logits).abs().max().item()
print("max |logit difference| after reload:", diff)
print(tokenizer.decode(reloaded.generate(ids, max_new_tokens=20, do_sample=False)[0]))

# 5. Push: uploads exactly the files save_pretrained writes (the model card included).
if args.push_to:
    reloaded.push_to_hub(args.push_to)
    tokenizer.push_to_hub(args.push_to)
