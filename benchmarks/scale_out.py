"""Scale-out on one machine: the same search in 1 process x 2 threads and in 2 processes x 1 thread
(torchrun, gloo), side by side in one run, and the fitness throughput against a raw forward.

For each kind it runs ``python -m optimum_evo search ...`` twice with the same seed and settings:

* ``1 x 2``: one process, two threads;
* ``2 x 1``: ``torchrun --nproc-per-node 2``, one thread per process (each generation's candidates
  are dealt out, the level database's linears too; `optimum_evo.distributed`).

and records whether the two found the same profile (they must), the search's candidate-tokens per
second (calibration tokens scored, summed over candidates, over the search's wall time) and, for
layer-wise kinds, the level database's build time (each run builds its own).

**Fitness throughput.** A third process times the dense model's forward on the same calibration
windows in the same dtype with two threads (tokens per second); the search's candidate-tokens per
second over it is the fitness throughput, above 1x where the prefix reuse skips more layers than
the KL and the level switches cost.

Results: ``OUTPUT/scale-out.jsonl``; a table in ``--doc`` between markers.

Usage::

    python benchmarks/scale_out.py --kinds depth,quantization --doc docs/benchmarks/scale-out.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from doc_sections import command_line, write_section  # noqa: E402

KIND_ARGS = {
    "depth": ["--compression", "depth", "--target", "0.25"],
    "sparsity": ["--compression", "sparsity", "--target", "0.5"],
    "quantization": ["--compression", "quantization", "--target", "3", "--levels", "2,3,4,8"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def search(ns, kind: str, out: Path, processes: int) -> dict:
    threads = 2 // processes
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = ["search", "--model", ns.model, *KIND_ARGS[kind], "--output", str(out), "--database-dir",
            str(out.parent / f"db-{out.name}"), "--generations", str(ns.generations), "--num-samples",
            str(ns.num_samples), "--seq-len", str(ns.seq_len), "--eval-windows", "0", "--search-dtype", "float32",
            "--no-save-model", "--quiet"]
    if processes == 1:
        command = [sys.executable, "-m", "optimum_evo"]
    else:
        command = [str(Path(sys.executable).parent / "torchrun"), f"--nproc-per-node={processes}",
                   f"--master-port={free_port()}", "-m", "optimum_evo"]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f"db-{out.name}", ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run([*command, *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} with {processes} process(es) failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "result.json").read_text())
    search_seconds = report["timings"]["search_seconds"]
    return {"processes": processes, "threads": threads, "wall_seconds": round(time.perf_counter() - start, 1),
            "search_seconds": search_seconds, "database_seconds": report["timings"].get("database_seconds"),
            "tokens": report["search"]["tokens"], "candidate_tokens_per_second": report["search"]["tokens"] / search_seconds,
            "candidate": report["candidate"], "work": report["search"]["work"]}


def dense_forward(ns) -> dict:
    """Tokens per second of the dense model's forward on the calibration windows (a child process
    with two threads, float32, batch 1 as the fitness runs)."""
    code = f"""
import json, time, torch
torch.set_num_threads(2)
from optimum_evo.data import calibration_windows
from optimum_evo.loading import load_model, load_tokenizer
model = load_model({ns.model!r})
windows = calibration_windows("brown", load_tokenizer({ns.model!r}), {ns.num_samples}, {ns.seq_len})
with torch.inference_mode():
    model(windows[:1])
    start = time.perf_counter()
    for w in windows:
        model(w[None]).logits.float().log_softmax(-1)
    seconds = time.perf_counter() - start
print("RESULT " + json.dumps({{"tokens": windows.numel(), "seconds": seconds}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the dense forward failed:\n{proc.stderr[-3000:]}")
    row = json.loads(line[len("RESULT "):])
    return {**row, "tokens_per_second": row["tokens"] / row["seconds"]}


def table(rows: list, dense: dict, meta: dict) -> str:
    lines = [f"- Command: `{meta['command']}`", f"- Machine: {meta['machine']}; date {meta['date']}.",
             f"- {meta['model']}, {meta['num_samples']} x {meta['seq_len']} calibration tokens, {meta['generations']} "
             f"generations, float32; dense forward {dense['tokens_per_second']:.0f} tokens/s (2 threads).", "",
             "| kind | processes x threads | same profile | database build (s) | search (s) | candidate-tokens/s "
             "| 2 x 1 over 1 x 2 | fitness over dense forward |", "|---|---|---|---|---|---|---|---|"]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        one, two = (next(r for r in rows if r["kind"] == kind and r["processes"] == p) for p in (1, 2))
        same = "yes" if one["candidate"] == two["candidate"] else "NO"
        for r in (one, two):
            db = f"{r['database_seconds']:.0f}" if r.get("database_seconds") else "-"
            speed = f"{two['candidate_tokens_per_second'] / one['candidate_tokens_per_second']:.2f}x" if r is two else ""
            lines.append(f"| {kind} | {r['processes']} x {r['threads']} | {same} | {db} | {r['search_seconds']:.0f} | "
                         f"{r['candidate_tokens_per_second']:.0f} | {speed} | "
                         f"{r['candidate_tokens_per_second'] / dense['tokens_per_second']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--kinds", default="depth,quantization")
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--output", default="outputs/bench-scale-out")
    p.add_argument("--doc", default=None)
    ns = p.parse_args(argv)
    out = Path(ns.output)
    out.mkdir(parents=True, exist_ok=True)
    dense = dense_forward(ns)
    print(f"dense forward: {dense['tokens_per_second']:.0f} tokens/s", flush=True)
    rows = []
    for kind in ns.kinds.split(","):
        for processes in (1, 2):
            row = {"kind": kind, **search(ns, kind, out / f"{kind}-{processes}", processes)}
            rows.append(row)
            print(f"{kind} {processes} process(es): {row['search_seconds']:.0f} s search, "
                  f"{row['candidate_tokens_per_second']:.0f} candidate-tokens/s", flush=True)
    import torch

    meta = {"command": command_line(__file__, argv),
            "machine": f"{os.cpu_count()} cores, torch {torch.__version__}", "date": datetime.date.today().isoformat(),
            "model": ns.model, "num_samples": ns.num_samples, "seq_len": ns.seq_len, "generations": ns.generations}
    with open(out / "scale-out.jsonl", "a") as f:
        f.write(json.dumps({**meta, "dense": dense, "rows": rows}) + "\n")
    text = table(rows, dense, meta)
    print(text)
    if ns.doc:
        write_section(Path(ns.doc), f"scale-out:{ns.model}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
