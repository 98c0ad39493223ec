"""What an EvoPress run costs on Llama-3-8B and Llama-3-70B: memory, disk and hours per phase, on paper.

Nothing is run on the large models. The per-layer costs are measured here, on SmolLM2-135M's own
layers (a decoder block's forward, a Hessian's accumulation, GPTQ and SparseGPT of one linear at
all of a database's levels), turned into rates (FLOP/s; for the column sweeps of GPTQ and SparseGPT
seconds linear in ``rows x cols^2 + cols^3``, ``rows x cols`` and ``cols``, fitted on three shapes and
checked on a fourth), and scaled to the large models by their shapes:

* **teacher**: the dense model's forward over the calibration tokens (``num_samples x seq_len``);
* **calibration walk** (sparsity, quantization): the forward through every block and the Hessian
  of every distinct linear input (q/k/v share one, gate/up share one);
* **database**: GPTQ (quantization, all levels in one sweep) or SparseGPT (sparsity) of every linear;
* **search**: the preset's candidate-tokens (``generations x (offspring x stage-1 tokens + survivors x
  later stages' tokens) + init_tokens``), each a forward of the model (prefix reuse only lowers it);
* **evaluation**: 40 x 512 WikiText-2 tokens.

Memory and disk are the run's own estimate (`optimum_evo.pipeline.memory.estimate`, on a meta-device
model of the target's config) plus the bf16 weights. GPU hours use assumed H200 rates (``--gpu-*``
options; stated in the table): no GPU measurement enters them.

Usage::

    python benchmarks/cost_model.py --threads 2 --doc docs/benchmarks/cost-model.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from doc_sections import command_line

#: the target models' shapes (their published configs)
TARGETS = {
    # the model the rates are measured on: its rows check the model against measured runs
    "SmolLM2-135M": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "Llama-3-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
    "Llama-3-70B": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8),
}
#: each kind at a high-compression target
KINDS = {"depth": 0.25, "sparsity": 0.6, "quantization": 3.0}
H200_MEMORY = 141e9


def best_time(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def sweep_features(rows: int, cols: int) -> list:
    """What one GPTQ / SparseGPT column sweep over ``rows`` stacked rows costs in proportion to: the
    trailing updates and the inverse Hessian (``rows x cols^2 + cols^3``), the in-block steps of
    each column (``rows x cols``) and the fixed work per column (``cols``)."""
    return [rows * cols ** 2 + cols ** 3, rows * cols, cols]


def measure(tokens: int = 512) -> dict:
    """Rates of this machine on SmolLM2-135M's layers."""
    from optimum_evo.compressors.obs import gptq_levels, sparsegpt_levels
    from optimum_evo.embedded_models import resolve_model
    from optimum_evo.loading import load_model
    from optimum_evo.methods.quantization import DEFAULT_BITS

    model = load_model(resolve_model("smollm2"), torch.float32).eval()
    cfg = model.config
    block = model.model.layers[0]
    x = torch.randn(1, tokens, cfg.hidden_size)
    rotary = model.model.rotary_emb(x, torch.arange(tokens)[None])
    params = sum(p.numel() for p in block.parameters() if p.dim() == 2)
    with torch.no_grad():
        fwd = best_time(lambda: block(x, position_embeddings=rotary, attention_mask=None))
    fwd_flops = 2 * params * tokens + 4 * tokens ** 2 * cfg.hidden_size
    acts = torch.randn(4096, cfg.intermediate_size)
    hess = best_time(lambda: acts.t() @ acts)
    hess_flops = 2 * acts.shape[0] * acts.shape[1] ** 2
    # a sweep's seconds, linear in `sweep_features`: fitted on layer 10's down_proj, gate_proj and
    # k_proj (576 x 1536, 1536 x 576, 192 x 576), checked on its q_proj (576 x 576)
    bits = list(DEFAULT_BITS)
    sparsities = [0.6 + 0.05 * k for k in range(-4, 5)]
    layer = model.model.layers[10]
    linears = {"down_proj": layer.mlp.down_proj, "gate_proj": layer.mlp.gate_proj, "k_proj": layer.self_attn.k_proj,
               "q_proj": layer.self_attn.q_proj}
    timed = {}
    for name, m in linears.items():
        w = m.weight.detach().float()
        a = torch.randn(4096, w.shape[1])
        H = a.t() @ a / a.shape[0]
        timed[name] = (tuple(w.shape), best_time(lambda: gptq_levels(w, H, bits)),
                       best_time(lambda: sparsegpt_levels(w, H, sparsities)))
    rates = {"forward_flops": fwd_flops / fwd, "hessian_flops": hess_flops / hess,
             "gptq_levels": len(bits), "sparsegpt_levels": len(sparsities), "checks": {}}
    for j, sweep, levels in ((1, "gptq", len(bits)), (2, "sparsegpt", len(sparsities))):
        fit = ("down_proj", "gate_proj", "k_proj")
        X = torch.tensor([sweep_features(levels * timed[n][0][0], timed[n][0][1]) for n in fit], dtype=torch.float64)
        y = torch.tensor([timed[n][j] for n in fit], dtype=torch.float64)
        coef = torch.linalg.solve(X, y).tolist()
        rates[f"{sweep}_coefficients"] = coef
        shape = timed["q_proj"][0]
        predicted = sum(c * f for c, f in zip(coef, sweep_features(levels * shape[0], shape[1])))
        rates["checks"][f"{sweep} on q_proj ({shape[0]} x {shape[1]})"] = {"seconds": timed["q_proj"][j],
                                                                          "predicted_seconds": predicted}
    rates["measured"] = {n: {"shape": list(v[0]), "gptq_seconds": v[1], "sparsegpt_seconds": v[2]} for n, v in timed.items()}
    rates["block_forward_seconds"] = fwd
    return rates


def candidate_tokens(cfg) -> int:
    """Candidate-tokens of a search with ``cfg`` (a `SearchConfig` with its generations resolved)."""
    per_generation, entering = 0, cfg.offspring
    for stage in cfg.stages:
        per_generation += entering * stage.tokens
        entering = stage.survivors
    return cfg.generations * per_generation + cfg.init_tokens


def shapes(c: dict) -> list:
    """``(rows, cols, hessian input)`` of one block's linears."""
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    return [(h, h, "attn"), (kv, h, "attn"), (kv, h, "attn"), (h, h, "o"), (i, h, "mlp"), (i, h, "mlp"), (h, i, "down")]


def plan(name: str, kind: str, preset: str, rates: dict, gpu: dict) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimum_evo import SearchArguments
    from optimum_evo.methods.registry import run_method
    from optimum_evo.pipeline.memory import estimate
    from optimum_evo.search import SearchConfig

    c = TARGETS[name]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{"tie_word_embeddings": False, **c}))
    args = SearchArguments(compression=kind, target=KINDS[kind], preset=preset, search_dtype="bfloat16")
    method = run_method(args)
    layers, h, vocab = c["num_hidden_layers"], c["hidden_size"], c["vocab_size"]
    block = sum(r * k for r, k, _ in shapes(c))
    params = layers * block + (1 if c.get("tie_word_embeddings") else 2) * vocab * h
    T = args.num_samples * args.seq_len

    def fwd(tokens):  # FLOPs of a forward over `tokens` in windows of seq_len
        return 2 * tokens * (layers * block + vocab * h) + 4 * tokens * args.seq_len * h * layers

    subblocks = 2 * layers
    n_units, changed = (subblocks, round(KINDS[kind] * subblocks)) if kind == "depth" else (7 * layers, 1)
    cfg = SearchConfig.from_preset(preset, method.presets).resolve_generations(n_units, changed)
    tokens = candidate_tokens(cfg)
    forward = {"teacher": fwd(T), "evaluation": fwd(40 * 512), "search": fwd(tokens)}
    if kind != "depth":
        forward["calibration walk"] = fwd(T)
        distinct = {(k, tag) for _, k, tag in shapes(c)}  # one Hessian per distinct input of a block
        hessians = layers * sum(2 * T * k ** 2 for k, _ in distinct)
        sweep = "gptq" if kind == "quantization" else "sparsegpt"
        # the database's sweeps, summed `sweep_features` of every linear
        features = [layers * sum(col) for col in zip(*(sweep_features(rates[f"{sweep}_levels"] * r, k)
                                                       for r, k, _ in shapes(c)))]

    def seconds(forward_rate: float, hessian_rate: float, database: float) -> dict:
        """Seconds per phase at the given forward and Hessian rates, ``database`` the sweeps' seconds."""
        out = {k: v / forward_rate for k, v in forward.items()}
        if kind != "depth":
            out["calibration walk"] += hessians / hessian_rate
            out["database"] = database
        return out

    if kind == "depth":
        cpu_database = gpu_database = 0.0
    else:
        cpu_database = sum(c_ * f for c_, f in zip(rates[f"{sweep}_coefficients"], features))
        gpu_database = 2 * features[0] / gpu["sweep"] + features[2] * gpu["column"]
    cpu = seconds(rates["forward_flops"], rates["hessian_flops"], cpu_database)
    gpu_s = seconds(gpu["forward"], gpu["hessian"], gpu_database)
    needs = estimate(args, model, method, torch.bfloat16)
    memory = {x.what: x.bytes for x in needs if x.where == "memory"}
    memory["model weights (bfloat16)"] = 2 * params
    disk = {x.what: x.bytes for x in needs if x.where == "disk"}
    # what must sit on the GPUs: weights and teacher cache; the prefix cache and level weights may spill to CPU
    on_gpu = 2 * params + sum(v for k, v in memory.items() if k.startswith("teacher"))
    return {"model": name, "kind": kind, "target": KINDS[kind], "preset": preset, "params": params,
            "candidate_tokens": tokens, "generations": cfg.generations,
            "memory_gb": {k: v / 1e9 for k, v in memory.items()}, "disk_gb": {k: v / 1e9 for k, v in disk.items()},
            "gpus": max(1, math.ceil(on_gpu / (0.9 * H200_MEMORY))),
            "cpu_hours": {k: v / 3600 for k, v in cpu.items()}, "gpu_hours": {k: v / 3600 for k, v in gpu_s.items()}}


def hours(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 1 else f"{x:.2f}" if x >= 0.01 else f"{x:.3f}"


def table(rows: list, rates: dict, gpu: dict, command: str, threads: int) -> list:
    checks = "; ".join(f"{k}: {v['seconds']:.2f} s measured, {v['predicted_seconds']:.2f} s predicted"
                       for k, v in rates["checks"].items())
    lines = ["<!-- cost-model:start -->", "",
             f"- Command: `{command}`",
             f"- Machine: {os.cpu_count()} cores, torch {torch.__version__}; date {datetime.date.today().isoformat()}.",
             f"- Rates measured here on SmolLM2-135M's layers: block forward {rates['forward_flops'] / 1e9:.1f} GFLOP/s, "
             f"Hessian {rates['hessian_flops'] / 1e9:.1f} GFLOP/s; GPTQ ({rates['gptq_levels']} levels in one sweep) "
             f"and SparseGPT ({rates['sparsegpt_levels']} levels) sweeps as seconds linear in rows x cols^2 + cols^3, "
             f"rows x cols and cols (fitted on layer 10's down_proj, gate_proj and k_proj); {checks}.",
             f"- GPU hours assume one H200 at {gpu['forward'] / 1e12:.0f} TFLOP/s for forwards (bf16), "
             f"{gpu['hessian'] / 1e12:.0f} TFLOP/s for Hessians, {gpu['sweep'] / 1e12:.0f} TFLOP/s + "
             f"{gpu['column'] * 1e6:.0f} us per column for the column sweeps (fp32). A model split over several "
             "GPUs runs as one (hours are wall-clock); more GPUs, each holding a copy, divide the search and the "
             "database (torch.distributed).",
             "- Memory: weights (bf16) + teacher cache must be on the GPUs; the prefix cache (worst case) and the "
             "level weights spill to CPU memory within a byte budget.", "",
             "| model | kind (target) | preset | candidate-tokens (M) | weights + teacher (GB) | prefix cache, worst (GB) "
             "| database on disk (GB) | H200s | H200 hours: teacher / calibration / database / search / evaluation | "
             f"total H200 hours | CPU hours here ({threads} thread{'s' if threads > 1 else ''}) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, g = r["memory_gb"], r["gpu_hours"]
        held = m["model weights (bfloat16)"] + sum(v for k, v in m.items() if k.startswith("teacher"))
        prefix = sum(v for k, v in m.items() if k.startswith("prefix"))
        phases = " / ".join(hours(g[k]) if k in g else "-" for k in ("teacher", "calibration walk", "database", "search", "evaluation"))
        lines.append(f"| {r['model']} | {r['kind']} ({r['target']:g}) | {r['preset']} | {r['candidate_tokens'] / 1e6:.0f} "
                     f"| {held:.0f} | {prefix:.0f} | {sum(r['disk_gb'].values()):.0f} | {r['gpus']} | {phases} | "
                     f"{hours(sum(g.values()))} | {hours(sum(r['cpu_hours'].values()))} |")
    return lines + ["", "<!-- cost-model:end -->"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="outputs/bench-cost-model")
    p.add_argument("--doc", default=None)
    p.add_argument("--gpu-forward-tflops", type=float, default=400.0,
                   help="assumed bf16 forward throughput of one H200 (about 40%% of its dense peak)")
    p.add_argument("--gpu-hessian-tflops", type=float, default=600.0, help="assumed bf16 X^T X throughput")
    p.add_argument("--gpu-sweep-tflops", type=float, default=20.0,
                   help="assumed fp32 throughput of the GPTQ / SparseGPT trailing updates")
    p.add_argument("--gpu-column-us", type=float, default=100.0,
                   help="assumed per-column cost of a sweep on the GPU (kernel launches of one column's steps)")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    gpu = {"forward": ns.gpu_forward_tflops * 1e12, "hessian": ns.gpu_hessian_tflops * 1e12,
           "sweep": ns.gpu_sweep_tflops * 1e12, "column": ns.gpu_column_us * 1e-6}
    rates = measure()
    print(json.dumps(rates), flush=True)
    rows = [plan(name, kind, preset, rates, gpu) for name in TARGETS for kind in KINDS for preset in ("fast", "paper")]
    out = Path(ns.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost_model.json").write_text(json.dumps({"rates": rates, "gpu": gpu, "rows": rows}, indent=1))
    command = command_line(__file__, argv)
    lines = table(rows, rates, gpu, command, ns.threads)
    print("\n".join(lines))
    if ns.doc:
        doc = Path(ns.doc)
        text = doc.read_text()
        head, rest = text.split(lines[0], 1)
        doc.write_text(head + "\n".join(lines) + rest.split(lines[-1], 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
