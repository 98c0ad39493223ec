"""The GPU check: CUDA tests, searches on the GPU and their throughput against the CPU, in one call.

Made to finish in about 10 minutes on one H200 (run through ``benchmarks/gpu_check.sh``, which
installs the carried wheels first). What it does:

1. ``pytest`` on the tests that need a GPU (skipped on a CPU-only machine: the level database
   built on the GPU from a model in host memory, one block at a time) and on the device-map tests;
2. for model shapes of SmolLM2-135M and Gemma-3-270M (their configs and tokenizers, prepared here
   with ``--prepare``; the weights are random, which is what throughput needs), a search of each
   kind on load, ``from_pretrained(..., quantization_config=EvoPressConfig(...), device_map=DEVICE)``,
   timed on the GPU and, for the first shape, on the CPU of the same machine;
3. writes ``OUT/gpu-check.json`` and a markdown table ``OUT/gpu-check.md`` (seconds per search,
   candidate tokens per second, GPU over CPU);
4. inference speed on the GPU (``benchmarks/inference_speed.py --device cuda``, bfloat16, both
   shapes): decode tokens/s and 512-token prefill of the packed 3-bit and 2.5-bit checkpoints (the
   Triton kernels), the dequantized cache and depth 25% against the dense model, into
   ``OUT/inference-speed-gpu.md``.

Usage::

    python benchmarks/gpu_check.py --prepare outputs/gpu-shapes      # here: configs + tokenizers
    python benchmarks/gpu_check.py --shapes outputs/gpu-shapes --out $OUT  # on the GPU machine
    python benchmarks/gpu_check.py --shapes outputs/gpu-shapes --device cpu --layers 2 --out /tmp/g  # a dry run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = {"depth": dict(target=0.25), "sparsity": dict(target=0.5, max_offset=2),
         "quantization": dict(target=3.0, levels=[2, 3, 4, 8])}


def prepare(folder: Path) -> None:
    """Config and tokenizer files of the embedded models (no weights), into ``folder/NAME``."""
    from transformers import AutoConfig, AutoTokenizer

    from optimum_evo.embedded_models import resolve_model

    for name in ("smollm2", "gemma3"):
        path = resolve_model(name)
        out = folder / name
        AutoConfig.from_pretrained(path).save_pretrained(out)
        AutoTokenizer.from_pretrained(path).save_pretrained(out)
        print(f"prepared {out}")


def random_model(shape: Path, work: Path, layers: int | None) -> Path:
    """A checkpoint of ``shape``'s config with random weights (and its tokenizer) in ``work``."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(shape)
    if layers:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out = work / shape.name
    model.save_pretrained(out)
    for f in shape.iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def search(path: Path, kind: str, device: str) -> dict:
    """One search on load; seconds and the search's own work counters."""
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_evo  # noqa: F401  (registers the quantizer)
    from optimum_evo import EvoPressConfig

    cfg = EvoPressConfig(compression=kind, generations=4, offspring=4, num_samples=16, seq_len=256,
                         eval_windows=0, progress=False, **KINDS[kind])
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map=device,
                                                 dtype=torch.bfloat16)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    metrics = model.config.quantization_config.metrics or {}
    del model
    return {"seconds": seconds, "metrics": metrics}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", type=Path, help="write the shapes (configs + tokenizers) here and stop")
    p.add_argument("--shapes", type=Path, default=ROOT / "outputs" / "gpu-shapes")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu-check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (dry runs)")
    p.add_argument("--no-tests", action="store_true")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU reference searches")
    ns = p.parse_args(argv)
    if ns.prepare:
        prepare(ns.prepare)
        return 0
    import torch

    ns.out.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
              "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if not ns.no_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_hf_quantizer.py",
                                "tests/test_offload.py", "tests/test_triton_kernels.py", "-k",
                                "cuda or device_map or gpu or chosen_by_device"], cwd=ROOT, capture_output=True,
                               text=True)
        report["tests"] = {"returncode": tests.returncode, "tail": tests.stdout[-3000:]}
        print(tests.stdout[-3000:], flush=True)
    rows, paths = [], []
    shapes = sorted((d for d in ns.shapes.iterdir() if d.is_dir()), key=lambda d: (d.name != "smollm2", d.name))
    for i, shape in enumerate(shapes):  # the CPU reference on the first (smallest) shape only
        path = random_model(shape, ns.out / "models", ns.layers)
        paths.append(path)
        for kind in KINDS:
            devices = [ns.device] + (["cpu"] if i == 0 and ns.device != "cpu" and not ns.no_cpu else [])
            for device in devices:
                try:
                    r = search(path, kind, device)
                except Exception as e:  # one failing row must not hide the others
                    r = {"error": f"{type(e).__name__}: {e}"[:2000]}
                rows.append({"model": shape.name, "kind": kind, "device": device, **r})
                print(json.dumps(rows[-1], default=str)[:600], flush=True)
                (ns.out / "gpu-check.json").write_text(json.dumps({**report, "rows": rows}, indent=1, default=str))
    lines = ["| model shape | kind | device | search on load (s) | vs CPU |", "|---|---|---|---|---|"]
    cpu = {(r["model"], r["kind"]): r.get("seconds") for r in rows if r["device"] == "cpu"}
    for r in rows:
        ref = cpu.get((r["model"], r["kind"]))
        ratio = f"{ref / r['seconds']:.1f}x faster" if ref and r.get("seconds") and r["device"] != "cpu" else ""
        lines.append(f"| {r['model']} | {r['kind']} | {r['device']} | "
                     f"{r.get('seconds', float('nan')):.1f} | {ratio or r.get('error', '')[:80]} |")
    (ns.out / "gpu-check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    speed = subprocess.run([sys.executable, "benchmarks/inference_speed.py", "--models", ",".join(map(str, paths)),
                            "--dtypes", "bfloat16", "--device", ns.device, "--threads", "8", "--variants",
                            "dense;quantization 3.0 bits;quantization 2.5 bits;3.0 bits + dequantized cache;depth 25%",
                            "--output", str(ns.out / "inference-speed"), "--doc",
                            str(ns.out / "inference-speed-gpu.md")], cwd=ROOT, capture_output=True, text=True)
    report["inference_speed"] = {"returncode": speed.returncode, "tail": (speed.stdout + speed.stderr)[-3000:]}
    print(report["inference_speed"]["tail"], flush=True)
    (ns.out / "gpu-check.json").write_text(json.dumps({**report, "rows": rows}, indent=1, default=str))
    ok = all("error" not in r for r in rows) and speed.returncode == 0
    return 0 if ok and report.get("tests", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
