"""Peak host memory of a level database build with the model in memory and with its decoder blocks
left on disk (sequential onloading, `optimum_evo.compressors.offload`), side by side in one run.

Each mode runs in its own fresh process (peak resident set size, ``ru_maxrss``, is per process):

* ``baseline``: imports, the model's code (built once on the meta device) and the calibration
  windows (tokenized once by the parent process): what every mode pays before it touches the
  weights;
* ``memory``: ``load_model`` (the whole model in host memory), then ``LevelDatabase.build``;
* ``disk``: ``offloaded_model`` (embeddings, final norm and head loaded; the blocks' weights stay in
  the safetensors checkpoint), then ``LevelDatabase.build(..., weights=checkpoint)``: one block is
  read from the memory-mapped checkpoint at a time and dropped afterwards.

The two databases are compared file by file (sha256 of every module's levels): disk offloading
must not change a single bit. Results: ``OUTPUT/offload.jsonl``; a table in ``--doc`` between
markers.

Usage::

    python benchmarks/offload_memory.py --model smollm2 --num-samples 32 --doc docs/benchmarks/offload.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from doc_sections import command_line, write_section  # noqa: E402

MODES = ("baseline", "memory", "disk")


def checkpoint(model: str, folder: Path) -> Path:
    """The model as a float32 safetensors checkpoint in ``folder`` (written once)."""
    if (folder / "config.json").exists():
        return folder
    from optimum_evo.loading import load_model, load_tokenizer

    load_model(model).save_pretrained(folder)
    load_tokenizer(model).save_pretrained(folder)
    return folder


class MemorySampler:
    """Peaks of the process's resident memory (``VmRSS``) and of its anonymous part (``RssAnon``:
    what it allocated, without pages of mapped files, which the kernel can drop), sampled every
    20 ms from ``/proc/self/status`` on a background thread."""

    def __init__(self):
        import threading

        self.peaks = {"VmRSS": 0, "RssAnon": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in self.peaks:
                    self.peaks[key] = max(self.peaks[key], int(line.split()[1]) * 1024)

    def _run(self):
        while not self._stop.wait(0.02):
            self.sample()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peaks


def child(ns) -> None:
    """One mode in this process; prints one JSON line."""
    sampler = MemorySampler()
    import torch

    torch.set_num_threads(ns.threads)
    from optimum_evo.compressors.database import LevelDatabase
    from optimum_evo.compressors.offload import offloaded_model, resident_bytes
    from safetensors.torch import load_file

    from optimum_evo.loading import load_model

    path = Path(ns.checkpoint)
    windows = load_file(str(Path(ns.output) / "windows.safetensors"))["windows"]
    # The model's code (transformers imports its modules lazily: +130 MB for SmolLM2's) is paid
    # by every mode: the baseline builds the model on the meta device once.
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    row = {"mode": ns.child}
    if ns.child != "baseline":
        start = time.perf_counter()
        model = load_model(path) if ns.child == "memory" else offloaded_model(path)
        row["resident_weight_bytes"] = resident_bytes(model)
        row["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        db = LevelDatabase.build(model, windows, "quantization", ns.levels, Path(ns.output) / f"db-{ns.child}",
                                 settings={"group_size": 128}, progress=False,
                                 weights=path if ns.child == "disk" else None)
        row["seconds"] = round(time.perf_counter() - start, 1)
        row["modules"] = {name: e["sha256"] for name, e in db.manifest["modules"].items()}
    peaks = sampler.stop()
    row["peak_rss_bytes"] = peaks["VmRSS"]  # not ru_maxrss: it keeps the forking parent's peak across exec
    row["peak_anon_bytes"] = peaks["RssAnon"]
    print("RESULT " + json.dumps(row), flush=True)


def table(rows: list, meta: dict) -> str:
    baseline = next(r for r in rows if r["mode"] == "baseline")
    base, base_anon = baseline["peak_rss_bytes"], baseline["peak_anon_bytes"]
    mem = next(r for r in rows if r["mode"] == "memory")
    disk = next(r for r in rows if r["mode"] == "disk")
    same = mem["modules"] == disk["modules"]
    mb = 1 / 2**20
    lines = [f"- Command: `{meta['command']}`",
             f"- Machine: {meta['machine']}; date {meta['date']}.",
             f"- Model {meta['model']} ({mem['model_bytes'] * mb:.0f} MB of float32 weights), quantization levels "
             f"{meta['levels']} (GPTQ, group 128, attention-aware values), {meta['num_samples']} x "
             f"{meta['seq_len']} calibration tokens, {meta['threads']} thread(s) per process.",
             f"- Databases identical (sha256 of all {len(mem['modules'])} modules' levels): "
             f"{'yes' if same else 'NO'}.",
             "",
             "| weights of the decoder blocks | weights resident after loading (MB) | peak RSS (MB) "
             "| peak RSS above the baseline (MB) | peak anonymous memory above the baseline (MB) | build (s) |",
             "|---|---|---|---|---|---|",
             f"| - (baseline: imports, model code, windows) | 0 | {base * mb:.0f} | 0 | 0 | |"]
    for r, label in ((mem, "in host memory (`load_model`)"), (disk, "on disk (`offloaded_model`, one block onloaded)")):
        lines.append(f"| {label} | {r['resident_weight_bytes'] * mb:.0f} | {r['peak_rss_bytes'] * mb:.0f} | "
                     f"{(r['peak_rss_bytes'] - base) * mb:.0f} | {(r['peak_anon_bytes'] - base_anon) * mb:.0f} | "
                     f"{r['seconds']:.0f} |")
    ratio = (disk["peak_rss_bytes"] - base) / max(mem["peak_rss_bytes"] - base, 1)
    lines += ["", f"Peak resident memory of the build above the baseline, disk over memory: **{ratio:.2f}x**."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--levels", default="2,3,4", type=lambda s: [int(b) for b in s.split(",")])
    p.add_argument("--dataset", default="brown")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default="outputs/bench-offload")
    p.add_argument("--doc", default=None)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.child:
        child(ns)
        return 0
    out = Path(ns.output)
    out.mkdir(parents=True, exist_ok=True)
    path = checkpoint(ns.model, out / "checkpoint")
    # Tokenizing the corpus takes more memory than the build: done here, once, for every mode.
    from safetensors.torch import save_file

    from optimum_evo.data import calibration_windows
    from optimum_evo.loading import load_tokenizer

    windows = calibration_windows(ns.dataset, load_tokenizer(path), ns.num_samples, ns.seq_len)
    save_file({"windows": windows.contiguous()}, str(out / "windows.safetensors"))
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode, "--checkpoint", str(path), "--model", ns.model,
               "--num-samples", str(ns.num_samples), "--seq-len", str(ns.seq_len), "--levels",
               ",".join(map(str, ns.levels)), "--dataset", ns.dataset, "--threads", str(ns.threads),
               "--output", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(ns.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"mode {mode} failed (exit {proc.returncode})")
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"{mode}: peak RSS {rows[-1]['peak_rss_bytes'] / 2**20:.0f} MB", flush=True)
    import torch

    meta = {"command": command_line(__file__, argv),
            "machine": f"{os.cpu_count()} cores, torch {torch.__version__}",
            "date": datetime.date.today().isoformat(), "model": ns.model, "levels": ns.levels,
            "num_samples": ns.num_samples, "seq_len": ns.seq_len, "threads": ns.threads}
    with open(out / "offload.jsonl", "a") as f:
        f.write(json.dumps({**meta, "rows": rows}) + "\n")
    text = table(rows, meta)
    print(text)
    if ns.doc:
        write_section(Path(ns.doc), f"offload:{ns.model}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
