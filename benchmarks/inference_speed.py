"""Inference speed and size of EvoPress checkpoints against the dense model, all in one run.

For each model and dtype, every variant is saved as a checkpoint and loaded back the way users load
it (EvoPress checkpoints with ``import optimum_evo``, exports in their own runtime), then measured:

* decode tokens/s: greedy ``generate`` of 64 new tokens after a 10-token prompt (best of 5);
* prefill: one forward of 512 tokens (best of 5), seconds;
* resident weight memory: bytes of every parameter and buffer of the loaded model;
* on-disk size of the weight files.

Variants: dense; packed quantization at 3.0 bits (every decoder linear 3-bit g128) and at 2.5 bits
(half of them 2-bit, half 3-bit), as reloaded EvoPress checkpoints; the 3-bit one with the
dequantized-weight cache; depth pruning of 25% of the blocks; 70% unstructured sparsity (stored as
bitmask + values); the 3-bit model's plain-transformers export, and its GPTQ export run by
gptqmodel's torch CPU kernel. Only the storage format matters
for speed, so the weights are round-to-nearest (a search would pick other levels of the same
format). Ratios are against the dense model in the same dtype, measured in the same run. The doc
keeps one section per kind of machine (the CPU kernels' instruction set, or CUDA): a run replaces
its own machine's section and keeps the others.

    python benchmarks/inference_speed.py --threads 2 --doc docs/benchmarks/inference-speed.md
    python benchmarks/inference_speed.py --models smollm2 --dtypes float32 --variants "dense;quantization 3.0 bits" --doc ''
    python benchmarks/inference_speed.py --models PATH --dtypes bfloat16 --device cuda --doc gpu.md   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optimum_evo  # noqa: E402,F401  (registers the EvoPress quantizer)
from optimum_evo.checkpoint import save_checkpoint  # noqa: E402
from optimum_evo.compressors import EvoPressQuantLinear, kernels, set_dequantized_cache  # noqa: E402
from optimum_evo.compressors.obs import magnitude_prune  # noqa: E402
from optimum_evo.compressors.offload import resident_bytes  # noqa: E402
from optimum_evo.embedded_models import resolve_model  # noqa: E402
from optimum_evo.record import checkpoint_record  # noqa: E402
from optimum_evo.settings import SearchArguments  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_sections import command_line, write_section  # noqa: E402

GPTQ = "GPTQ export of 3.0 bits, in gptqmodel"
VARIANTS = ("dense", "quantization 3.0 bits", "quantization 2.5 bits", "3.0 bits + dequantized cache",
            "depth 25%", "sparsity 70%", "plain-transformers export of 3.0 bits", GPTQ)
ROUNDS = 5  # every variant of a model and dtype is timed once per round, rounds interleaved
GPTQMODEL = Path(__file__).resolve().parents[1] / ".venv" / "gptqmodel-cpu"  # `make setup` puts it there
DEVICE = torch.device("cpu")  # --device: where the loaded variants run


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}, kernels {kernels.isa()}"
    if DEVICE.type == "cuda":
        text = f"{torch.cuda.get_device_name(DEVICE)} (Triton kernels), host {text}"
    return text


def decoder_linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def build(variant: str, path: str, folder: Path):
    """Write ``variant`` of the model at ``path`` into ``folder`` as its users would get it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if variant == "dense":
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return
    if variant.startswith("depth"):
        from optimum_evo.methods.depth import DepthSpace

        space = DepthSpace(model, 0.25, mode="block")
        n = space.num_layers
        start = (n - space.num_drop) // 2
        cand = space.candidate(blocks=range(start, start + space.num_drop))
        args = SearchArguments(model=path, compression="depth", target=0.25, mode="block")
        profile = {"mode": "block", **space.compress(model, cand)}
    elif variant.startswith("sparsity"):
        modules, kept = {}, {}
        with torch.no_grad():
            for name, linear in decoder_linears(model):
                linear.weight.copy_(magnitude_prune(linear.weight, 0.7))
                modules[name], kept[name] = 0.7, int(linear.weight.count_nonzero())
        args = SearchArguments(model=path, compression="sparsity", target=0.7)
        profile = {"modules": modules, "sparsity": 0.7, "kept": kept}
    else:
        target = 2.5 if "2.5" in variant else 3.0
        modules = {}
        for i, (name, linear) in enumerate(decoder_linears(model)):
            bits = 3 if target == 3.0 or i % 2 else 2
            set_module(model, name, EvoPressQuantLinear.from_linear(linear, bits=bits, group_size=128))
            modules[name] = bits
        args = SearchArguments(model=path, compression="quantization", target=target, levels=[2, 3, 4])
        profile = {"modules": modules, "group_size": 128, "act_order": False, "qweight_layout": "planes",
                   "average_bits": target}
        if variant.startswith("plain-transformers export"):
            from optimum_evo.exporters import export_dense

            export_dense(model, folder, tokenizer=tokenizer)
            return
        if variant == GPTQ:
            from optimum_evo.exporters import export_gptq

            export_gptq(model, folder, tokenizer=tokenizer)
            return
    save_checkpoint(model, folder, checkpoint_record(args, profile, {"model": path}), tokenizer=tokenizer)


MEASURE_GPTQMODEL = """
import json, sys, torch
sys.path.insert(0, {bench!r})
torch.set_num_threads({threads})
from gptqmodel import BACKEND, GPTQModel
from inference_speed import timings
m = GPTQModel.load({folder!r}, device="cpu", backend=BACKEND.TORCH, dtype=torch.{dtype})
print(json.dumps(timings(m.model, {folder!r})))
"""


def measure_in_gptqmodel(folder: Path, dtype: torch.dtype) -> dict:
    """The GPTQ export timed in gptqmodel's own runtime (its torch CPU kernel), in a subprocess."""
    import os
    import subprocess

    if not (GPTQMODEL / "gptqmodel").is_dir():
        raise RuntimeError("gptqmodel is not set up (make setup installs it into .venv/gptqmodel-cpu)")
    script = MEASURE_GPTQMODEL.format(bench=str(Path(__file__).parent), threads=torch.get_num_threads(),
                                      folder=str(folder), dtype=str(dtype).replace("torch.", ""))
    run = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(GPTQMODEL)},
                         capture_output=True, text=True, timeout=3600)
    if run.returncode:
        raise RuntimeError(run.stderr[-2000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


class Timed:
    """A loaded model with its decode and prefill workloads; `round` times each once."""

    @torch.inference_mode()
    def __init__(self, model, folder):
        from transformers import AutoTokenizer

        self.model, self.folder = model, Path(folder)
        tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.prompt = tokenizer("The old lighthouse keeper climbed the winding stairs",
                                return_tensors="pt").input_ids[:, :10].to(DEVICE)
        self.window = torch.randint(0, model.config.vocab_size, (1, 512),
                                    generator=torch.Generator().manual_seed(0)).to(DEVICE)
        model.generate(self.prompt, max_new_tokens=4, do_sample=False)  # warm-up
        self.decode, self.prefill = math.inf, math.inf

    @torch.inference_mode()
    def round(self) -> None:
        m = self.model
        self.decode = min(self.decode, _time(lambda: m.generate(self.prompt, max_new_tokens=64, min_new_tokens=64,
                                                                do_sample=False)))
        self.prefill = min(self.prefill, _time(lambda: m(self.window, use_cache=False)))

    def row(self) -> dict:
        disk = sum(p.stat().st_size for p in self.folder.glob("*.safetensors"))
        return {"decode_tokens_per_s": 64 / self.decode, "prefill_512_s": self.prefill,
                "resident_bytes": resident_bytes(self.model), "disk_bytes": disk}


def load(folder: Path, dtype: torch.dtype, cache: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(DEVICE).eval()
    if cache:
        set_dequantized_cache(model)
    return model


def timings(model, folder, rounds: int = ROUNDS) -> dict:
    """Best-of-``rounds`` decode and prefill times, resident and on-disk bytes of ``model`` (from ``folder``)."""
    timed = Timed(model, folder)
    for _ in range(rounds):
        timed.round()
    return timed.row()


def _time(fn) -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    start = time.perf_counter()
    fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter() - start


def section_key() -> str:
    """The doc section of this run: one per kind of machine (``cpu-avx512``, ``cpu-avx2``, ``cuda``)."""
    return "cuda" if DEVICE.type == "cuda" else f"cpu-{kernels.isa() or 'no-kernels'}"


SECTION_TITLES = {"cpu-avx512": "CPU with AVX-512", "cpu-avx2": "CPU with AVX2 (no AVX-512)", "cuda": "GPU"}
DOC_HEADER = """# Inference speed and size

Decode speed, prefill time and memory of EvoPress checkpoints against the dense model, measured by
`benchmarks/inference_speed.py`. One section per kind of machine: the CPU kernels take a different
path with AVX-512 (masked adds on the float inputs) than with AVX2 only, and CUDA runs the Triton
kernels.
"""


def markdown(results: dict, command: str, skipped: dict | None = None) -> str:
    """The section of this run (a level-2 heading, then one table per model and dtype); ``skipped``:
    ``{model: {dtype: {variant: why}}}`` for the variants that could not be measured."""
    lines = [f"## {SECTION_TITLES.get(section_key(), section_key())}", "",
             f"- Command: `{command}`",
             f"- Date: {datetime.date.today().isoformat()}; machine: {machine()}.",
             f"- Decode: greedy `generate` of 64 tokens after a 10-token prompt, best of {ROUNDS}. Prefill: one 512-token "
             f"forward, best of {ROUNDS}. The variants of a model and dtype are loaded together and timed in "
             "interleaved rounds (each round times every variant once), so drifts of the machine hit all alike. "
             "Resident: bytes of the loaded model's parameters and buffers (the dequantized cache's dense copies are not among them). Disk: weight files.",
             "- Every variant is a checkpoint saved and loaded back (EvoPress checkpoints with `import optimum_evo`); "
             "ratios are against the dense model in the same dtype, in the same run. The weights are "
             "round-to-nearest: speed depends on the storage format only.", ""]
    for model, by_dtype in results.items():
        for dtype, rows in by_dtype.items():
            dense = rows["dense"]
            lines += [f"### {model}, {dtype}", "",
                      "| variant | decode tok/s | vs dense | prefill 512 (s) | vs dense | resident MB | disk MB |",
                      "|---|---|---|---|---|---|---|"]
            for name, r in rows.items():
                lines.append(f"| {name} | {r['decode_tokens_per_s']:.1f} | "
                             f"{r['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f}x | "
                             f"{r['prefill_512_s']:.2f} | {r['prefill_512_s'] / dense['prefill_512_s']:.2f}x | "
                             f"{r['resident_bytes'] / 1e6:.0f} | {r['disk_bytes'] / 1e6:.0f} |")
            for name, why in ((skipped or {}).get(model, {}).get(dtype, {})).items():
                lines += ["", f"Not measured: {name} ({why})."]
            lines.append("")
    return "\n".join(lines)


def write_doc(doc: Path, text: str) -> None:
    """Put this run's section into ``doc``, keeping the other machines' sections."""
    if not doc.exists() or "<!-- " not in doc.read_text():
        doc.write_text(DOC_HEADER)
    write_section(doc, section_key(), text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,gemma3")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--variants", default=";".join(VARIANTS), help=("';'-separated, from: " + "; ".join(VARIANTS)).replace("%", "%%"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the variants run: cpu, or cuda (the Triton kernels; "
                   "the GPTQ export row is CPU-only and skipped)")
    p.add_argument("--output", default="outputs/inference-speed", help="results.json and the checkpoints' folder")
    p.add_argument("--doc", default="docs/benchmarks/inference-speed.md", help="markdown table to write; '' = none")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    global DEVICE
    DEVICE = torch.device(ns.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    kernels.load()
    out = Path(ns.output)
    out.mkdir(parents=True, exist_ok=True)
    variants = [v.strip() for v in ns.variants.split(";") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if variants[0] != "dense":
        variants = ["dense", *[v for v in variants if v != "dense"]]
    results: dict = {}
    skipped: dict = {}
    for model in ns.models.split(","):
        path = resolve_model(model)
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            folders = {}
            for variant in variants:
                source = "quantization 3.0 bits" if "cache" in variant else variant  # same checkpoint
                folders[variant] = Path(tmp) / "".join(c if c.isalnum() else "_" for c in source)
                if not folders[variant].exists():
                    build(source, path, folders[variant])
            for dtype in ns.dtypes.split(","):
                rows = results.setdefault(model, {}).setdefault(dtype, {})
                timed = {v: Timed(load(folders[v], getattr(torch, dtype), "cache" in v), folders[v])
                         for v in variants if v != GPTQ}
                for r in range(ROUNDS):
                    for v, t in timed.items():
                        t.round()
                    print(model, dtype, f"round {r + 1}/{ROUNDS}", flush=True)
                for v in variants:
                    if v == GPTQ:
                        if DEVICE.type != "cpu":
                            continue
                        try:
                            rows[v] = measure_in_gptqmodel(folders[v], getattr(torch, dtype))
                        except RuntimeError as e:
                            print(f"{v} skipped: {e}", flush=True)
                            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                            skipped.setdefault(model, {}).setdefault(dtype, {})[v] = why.replace("`", "")
                            continue
                    else:
                        rows[v] = timed[v].row()
                    print(model, dtype, v, {k: round(x, 2) for k, x in rows[v].items()}, flush=True)
                del timed
                gc.collect()
                (out / "results.json").write_text(json.dumps(results, indent=1))
    command = command_line(__file__, argv)
    text = markdown(results, command, skipped)
    print(text)
    if ns.doc:
        write_doc(Path(ns.doc), text)


if __name__ == "__main__":
    main()
