"""Whether a CPU sparse kernel makes an unstructured-sparse linear faster than the dense one.

For the linear shapes of SmolLM2-135M and Gemma-3-270M at 50, 60 and 70% unstructured sparsity
(magnitude pruning of random weights: only the pattern's density matters for speed), times in one
run, interleaved, best of ``--rounds``:

* dense: ``torch.nn.functional.linear`` on the weight holding zeros (what a sparse EvoPress
  checkpoint runs today);
* CSR: the weight as ``torch.sparse_csr_tensor`` (PyTorch's CPU sparse kernels, MKL where the build
  has it), ``torch.sparse.mm(W, x.T).T`` (COO, measured once, was 4-25x slower than CSR at every
  shape here, so it is not timed).

for one token (decode) and 512 tokens (prefill), float32 (PyTorch's CPU sparse kernels take no
bfloat16 CSR product for every op). Writes a table into ``--doc`` between markers.

Usage::

    python benchmarks/sparse_kernels.py --threads 1 --doc docs/benchmarks/sparse-kernels.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_sections import write_section  # noqa: E402

from optimum_evo.compressors.obs import magnitude_prune  # noqa: E402
from optimum_evo.latency import time_call  # noqa: E402

#: (model, linear, out_features, in_features)
SHAPES = [("smollm2", "q_proj / o_proj", 576, 576), ("smollm2", "gate_proj / up_proj", 1536, 576),
          ("smollm2", "down_proj", 576, 1536), ("gemma3", "q_proj", 1024, 640),
          ("gemma3", "gate_proj / up_proj", 2048, 640), ("gemma3", "down_proj", 640, 2048)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", default="0.5,0.6,0.7")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--doc", default="docs/benchmarks/sparse-kernels.md")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    rows = []
    with torch.inference_mode():
        for model, name, out_f, in_f in SHAPES:
            for sparsity in (float(s) for s in ns.sparsities.split(",")):
                w = magnitude_prune(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)),
                                    sparsity)
                csr = w.to_sparse_csr()
                for tokens in (1, 512):
                    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1))
                    exact = F.linear(x, w)
                    assert torch.allclose(torch.sparse.mm(csr, x.t()).t(), exact, rtol=1e-4, atol=1e-4)
                    fns = {"dense": lambda: F.linear(x, w), "csr": lambda: torch.sparse.mm(csr, x.t()).t()}
                    t = {k: math.inf for k in fns}
                    for _ in range(ns.rounds):  # interleaved: drifts of the machine hit all alike
                        for k, fn in fns.items():
                            t[k] = min(t[k], time_call(fn, min_seconds=0.02, repeats=1) / 1e9)
                    rows.append((model, name, out_f, in_f, sparsity, tokens, t))
                    print(model, name, sparsity, tokens, {k: f"{v * 1e6:.0f} us" for k, v in t.items()}, flush=True)
    lines = [f"- Command: `python benchmarks/sparse_kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- Date {datetime.date.today().isoformat()}; torch {torch.__version__}, {ns.threads} thread(s), "
             f"MKL {'yes' if torch.backends.mkl.is_available() else 'no'}; float32; best of {ns.rounds} interleaved "
             "rounds.", "",
             "| model | linear | shape | sparsity | tokens | dense (us) | CSR (us) | CSR vs dense |",
             "|---|---|---|---|---|---|---|---|"]
    for model, name, out_f, in_f, sparsity, tokens, t in rows:
        lines.append(f"| {model} | {name} | {out_f} x {in_f} | {sparsity:.0%} | {tokens} | {t['dense'] * 1e6:.0f} | "
                     f"{t['csr'] * 1e6:.0f} | {t['dense'] / t['csr']:.2f}x |")
    faster = [r for r in rows if r[6]["csr"] < r[6]["dense"]]
    lines += ["", f"CSR faster than dense in {len(faster)} of {len(rows)} cases"
              + (": " + ", ".join(f"{r[1]} {r[4]:.0%} x {r[5]} tokens ({r[6]['dense'] / r[6]['csr']:.2f}x)"
                                  for r in faster) if faster else "") + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if ns.doc:
        write_section(Path(ns.doc), "sparse-kernels", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
