"""GGUF exports run by llama.cpp: perplexity of the same WikiText-2 windows in llama.cpp and in our
evaluation, for a mixed-bit and a depth-pruned SmolLM2-135M.

Models (made directly, without a search, so the script takes minutes):

* ``mixed``: every decoder linear packed on a GGUF grid (symmetric, group 32) at 4, 5 or 8 bits,
  drawn per fused group (q/k/v and gate/up share one width), so the file holds ``Q4_0``, ``Q5_0``
  and ``Q8_0`` tensors whose values are exactly ours;
* ``depth``: the dense model with 3 whole blocks removed (the ones ShortGPT's angular distance
  rates least important on the calibration text), written in ``F16``;
* ``halves``: the attention of those 3 blocks and the MLP of the next 3 dropped (attention-only and
  MLP-only drops), written in ``F16`` for llama.cpp's ``deci`` graph (per-layer head counts and FFN
  widths; transformers cannot read such a file, so "ours" is the model in memory).

Rows named after a llama.cpp file type (``Q2_K``, ``Q3_K_M``, ``Q4_K_M``, ...) are llama.cpp's own
quantization of the dense export (``llama_model_quantize``, no importance matrix, as
``llama-quantize model.gguf out.gguf Q4_K_M`` makes it): the reference a llama.cpp user compares a
mixed export with at the same file size. "Ours" is then our evaluation of the same file loaded by
transformers (``gguf_file=``, which dequantizes every type).

Rows ``evopress@TYPE`` are the EvoPress answer to such a file: a quantization search on the grids
llama.cpp runs exactly (symmetric, group 32, levels 4 / 5 / 8 = ``Q4_0`` / ``Q5_0`` / ``Q8_0``) at the
average bits whose export, with the embeddings in ``Q8_0``, is as large as TYPE's file (these types
store ``bits + 0.5`` bits per weight, so the size fixes the bits), then exported and run the same way.
q/k/v and gate/up share a width (the default fused groups), so the bits are met to the nearest
step of a switch group: the file can come out slightly smaller than TYPE's.

Rows ``gguf@TYPE`` go further: a ``compression="gguf"`` search whose levels are GGUF types
(``Q2_K`` ... ``Q8_0`` and ``IQ4_NL``, each made by GPTQ on the type's own grid, K-quant super-block
scales included) under the size budget of TYPE's file, exported with the embeddings in ``Q8_0``:
the file holds exactly the bytes the search scored.

Rows ``TYPE+imatrix`` are llama.cpp's file type made with an importance matrix computed by
``llama-imatrix`` on the text of the same calibration windows (``--llama-cpp-bin``: the folder of
llama.cpp's ``llama-imatrix`` and ``llama-quantize``, built from its sources). Build them portable,
as ``make setup`` builds llama-cpp-python: on CPUs with AMX (Intel Sapphire Rapids and later) the
default native build enables ggml's AMX backend, whose matrix product crashes::

    cmake -B build -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF
    cmake --build build --target llama-imatrix llama-quantize -j 2

Each is exported with ``export(model, dir, "gguf", dense_type="F32")``, loaded by llama-cpp-python
(``Llama(model_path, n_ctx=512, logits_all=True)``), and every window is evaluated token by token
from its first token: the ids of our evaluation, BOS first where the tokenizer adds it. Results:
``OUTPUT/gguf.jsonl`` and a table in ``--doc`` between markers.

Usage::

    pip install llama-cpp-python          # builds llama.cpp (several minutes on 2 cores)
    python benchmarks/gguf_llamacpp.py --windows 10 --threads 2 --doc docs/benchmarks/gguf.md
    python benchmarks/gguf_llamacpp.py --rows dense,depth,halves,Q4_K_M --speed --threads 1 --doc docs/benchmarks/gguf.md

``--speed`` adds llama.cpp's decode step of every row's file against the dense model in ``F16``,
timed in the same process (a ratio; run it on a quiet machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import torch

from doc_sections import command_line


def llamacpp_perplexity(path: Path, windows: torch.Tensor, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=windows.shape[1], logits_all=True, n_threads=threads,
                n_batch=windows.shape[1], verbose=False)
    nll, count = 0.0, 0
    for ids in windows.tolist():
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return {"perplexity": math.exp(nll / count), "tokens": count}


def llamacpp_decode_ms(path: Path, threads: int, context: int = 128, steps: int = 16, repeats: int = 5) -> float:
    """llama.cpp's time for one decode step after ``context`` tokens (ms; median over ``repeats`` runs
    of ``steps`` single-token evaluations)."""
    import statistics

    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=context + steps + 8, n_threads=threads, n_batch=context, verbose=False)
    prompt = [(7 * i) % 1000 + 10 for i in range(context)]
    times = []
    for _ in range(repeats):
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for i in range(steps):
            llm.eval([prompt[i]])
        times.append((time.perf_counter() - start) / steps * 1e3)
    llm.close()
    return statistics.median(times)


def tokenizer_agrees(path: Path, tok, text: str) -> bool:
    """Whether llama.cpp's tokenizer of the file gives transformers' ids for ``text`` (BOS as the
    tokenizer adds it, special tokens parsed)."""
    from llama_cpp import Llama

    from optimum_evo.data import tokenizer_adds_bos

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    same = llm.tokenize(text.encode(), add_bos=tokenizer_adds_bos(tok), special=True) == tok(text).input_ids
    llm.close()
    return same


def llamacpp_quantize(source: Path, target: Path, ftype: str, threads: int) -> None:
    """llama.cpp's own quantization of ``source`` into file type ``ftype`` (e.g. ``Q4_K_M``)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    target.parent.mkdir(parents=True, exist_ok=True)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize({source} -> {ftype}) failed.")


def llamacpp_imatrix_quantize(ns, dense_file: Path, target: Path, ftype: str, tok) -> Path:
    """llama.cpp's ``ftype`` made with an importance matrix: ``llama-imatrix`` on the text of the
    calibration windows the EvoPress rows calibrate on (``--num-samples`` x 512 Brown tokens), then
    ``llama-quantize --imatrix``. Both tools come from ``--llama-cpp-bin`` (built from llama.cpp's
    sources; llama-cpp-python ships neither)."""
    import subprocess

    from optimum_evo.data import calibration_windows

    tools = Path(ns.llama_cpp_bin or "")
    if not (tools / "llama-imatrix").exists() or not (tools / "llama-quantize").exists():
        raise SystemExit(f"{ftype}+imatrix needs llama.cpp's llama-imatrix and llama-quantize in --llama-cpp-bin "
                         "(in a llama.cpp checkout: cmake -B build -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON "
                         "-DGGML_F16C=ON, then cmake --build build --target llama-imatrix llama-quantize; the folder is "
                         "build/bin. GGML_NATIVE=OFF: on AMX CPUs the native build's AMX matrix product crashes).")
    matrix = dense_file.parent.parent / f"imatrix-{ns.num_samples}.gguf"
    if not matrix.exists():
        windows = calibration_windows("brown", tok, ns.num_samples, 512, 0)
        text = matrix.with_suffix(".txt")
        text.write_text("\n\n".join(tok.decode(w, skip_special_tokens=True) for w in windows.tolist()))
        subprocess.run([str(tools / "llama-imatrix"), "-m", str(dense_file), "-f", str(text), "-o", str(matrix),
                        "-c", "512", "-t", str(ns.threads), "--chunks", str(ns.num_samples)], check=True,
                       capture_output=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(tools / "llama-quantize"), "--imatrix", str(matrix), str(dense_file), str(target), ftype,
                    str(ns.threads)], check=True, capture_output=True)
    return matrix


def gguf_types(path: Path) -> dict:
    """Number of tensors of every GGUF type in a file."""
    import gguf

    counts: dict = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def mixed_model(model, seed: int = 0, choices: tuple = (4, 5, 8)):
    from optimum_evo.compressors.packed_linear import EvoPressQuantLinear
    from optimum_evo.decoder import find_decoder_layout, shared_input_groups

    layout = find_decoder_layout(model)
    names = [f"{layout.path}.{i}.{n}" for i, layer in enumerate(layout.layers)
             for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    rng = random.Random(seed)
    bits = {}
    for group in shared_input_groups(model, names):  # index lists into names
        b = rng.choice(choices)
        for i in group:
            bits[names[i]] = b
    for n in names:
        parent, _, child = n.rpartition(".")
        layer = EvoPressQuantLinear.from_linear(model.get_submodule(n), bits=bits[n], group_size=32, sym=True)
        setattr(model.get_submodule(parent), child, layer)
    return model


def depth_model(model, calib: torch.Tensor, drop: int = 3, rank: bool = False):
    """The model with the ``drop`` blocks whose output is most similar to their input removed, and
    their indices (``rank=True``: the model unchanged and every block, most similar first)."""
    from optimum_evo.compressors.calibrate import walk_blocks
    from optimum_evo.methods.depth import DepthSpace

    scores = []
    with torch.no_grad():
        for block in walk_blocks(model, calib, progress=False):
            out = block.dense_outputs()
            cos = [torch.nn.functional.cosine_similarity(x[0], y[0], dim=-1).clamp(-1, 1).mean()
                   for x, y in zip(block.inputs, out)]
            scores.append(float(torch.stack(cos).mean()))
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])  # most similar in and out first
    if rank:
        return model, ranked
    least = ranked[:drop]
    space = DepthSpace(model, drop / len(scores), "block")
    space.compress(model, space.candidate(blocks=least))
    return model, sorted(least)


def halves_model(model, calib: torch.Tensor, drop: int = 3):
    """``drop`` attention-only and ``drop`` MLP-only drops: the attention of the blocks whose output
    is most similar to their input (as `depth_model` rates them) and the MLP of the next ``drop``."""
    from optimum_evo.methods.depth import DepthSpace

    n = len(model.model.layers)
    _, ranked = depth_model(model, calib, drop=0, rank=True)
    attention, mlp = sorted(ranked[:drop]), sorted(ranked[drop:2 * drop])
    space = DepthSpace(model, drop / n, "separate")
    space.compress(model, space.candidate(attention=attention, mlp=mlp))
    return model, attention, mlp


def evopress_at_size(ns, path, ftype: str, out: Path):
    """EvoPress on GGUF's exact grids (symmetric, group 32, 4 / 5 / 8 bits = Q4_0 / Q5_0 / Q8_0) at the
    average bits whose GGUF file (embeddings in Q8_0) is as large as llama.cpp's ``ftype`` file, and
    the search's report. These types store ``bits + 0.5`` bits per weight, so the file grows by
    ``numel / 8`` bytes per average bit above the all-Q4_0 file."""
    from transformers import AutoModelForCausalLM

    from optimum_evo.exporters import export
    from optimum_evo.loading import load_model
    from optimum_evo.pipeline import SearchArguments, run_search

    reference = out / ftype / "model.gguf"
    if not reference.exists():
        raise SystemExit(f"evopress@{ftype} needs the {ftype} row first (--rows {ftype},evopress@{ftype}).")
    base = out / "all-Q4_0"
    if not (base / "model.gguf").exists():
        model = load_model(path, torch.float32)
        mixed_model(model, choices=(4,))
        export(model, base, "gguf", tokenizer=path, dense_type="Q8_0")
    numel = sum(m.weight.numel() for n, m in load_model(path, torch.float32).named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in n)
    floor = (base / "model.gguf").stat().st_size
    bits = 4 + 8 * (reference.stat().st_size - floor) / numel
    if not 4 <= bits <= 8:
        raise SystemExit(f"{ftype}'s file ({reference.stat().st_size / 1e6:.1f} MB) is outside what Q4_0 .. Q8_0 "
                         f"linears with Q8_0 embeddings can match (all-Q4_0: {floor / 1e6:.1f} MB).")
    folder = out / f"evopress@{ftype}"
    result = folder / "search" / "result.json"
    if result.exists():
        report = json.loads(result.read_text())
    else:
        report = run_search(SearchArguments(
            model=str(path), compression="quantization", target=round(bits, 4), levels=[4, 5, 8], group_size=32,
            sym=True, generations=ns.generations, num_samples=ns.num_samples, eval_windows=0,
            output_dir=str(folder / "search"), progress=False))
    model = AutoModelForCausalLM.from_pretrained(report["saved_model"]["path"], dtype=torch.float32).eval()
    return model, report, bits


def gguf_types_at_size(ns, path, ftype: str, out: Path):
    """EvoPress over GGUF types (``compression="gguf"``: GPTQ on every type's own grid, the search
    choosing a type per linear) at the size budget whose GGUF file (embeddings in Q8_0) is as large as
    llama.cpp's ``ftype`` file, and the search's report. The linears may take the file's bytes less
    what the rest of the file holds (measured on the all-Q4_0 file); the search's budget counts the
    rest as the checkpoint stores it (float32 embeddings and norms)."""
    from transformers import AutoModelForCausalLM

    from optimum_evo.compressors.ggml_types import type_bytes
    from optimum_evo.exporters import export
    from optimum_evo.loading import load_model
    from optimum_evo.pipeline import SearchArguments, run_search

    reference = out / ftype / "model.gguf"
    if not reference.exists():
        raise SystemExit(f"gguf@{ftype} needs the {ftype} row first (--rows {ftype},gguf@{ftype}).")
    dense = load_model(path, torch.float32)
    base = out / "all-Q4_0"
    if not (base / "model.gguf").exists():
        export(mixed_model(load_model(path, torch.float32), choices=(4,)), base, "gguf", tokenizer=path,
               dense_type="Q8_0")
    linears = [m for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    rest_in_file = (base / "model.gguf").stat().st_size - sum(type_bytes("Q4_0", m.weight.shape) for m in linears)
    rest_in_checkpoint = sum(t.numel() * t.element_size() for t in dense.state_dict().values()) \
        - sum(m.weight.numel() * 4 for m in linears)
    if getattr(dense.config, "tie_word_embeddings", False):
        rest_in_checkpoint -= dense.lm_head.weight.numel() * 4  # stored once
    size = reference.stat().st_size - rest_in_file + rest_in_checkpoint
    folder = out / f"gguf@{ftype}"
    result = folder / "search" / "result.json"
    if result.exists():
        report = json.loads(result.read_text())
    else:
        report = run_search(SearchArguments(
            model=str(path), compression="gguf", target_size=str(int(size)), generations=ns.generations,
            num_samples=ns.num_samples, eval_windows=0, output_dir=str(folder / "search"), progress=False))
    model = AutoModelForCausalLM.from_pretrained(report["saved_model"]["path"], dtype=torch.float32).eval()
    bits = 8 * (reference.stat().st_size - rest_in_file) / sum(m.weight.numel() for m in linears)
    return model, report, bits


def earlier_rows(text: str, start: str, end: str, measured: set) -> tuple:
    """The table rows of ``text`` between ``start`` and ``end`` for models not in ``measured`` (rows
    of earlier runs, kept as they are when another output folder adds rows), with their commands and
    dates."""
    if start not in text:
        return [], set(), set()
    block = text.split(start, 1)[1].split(end, 1)[0]
    kept, commands, dates = [], set(), set()
    for line in block.splitlines():
        if line.startswith("- Command"):
            commands |= set(re.findall(r"`([^`]+)`", line))
        elif line.startswith("- Machine:") and "dates " in line:
            dates |= {d.strip().rstrip(".") for d in line.split("dates ", 1)[1].split(",")}
        elif line.startswith("| ") and not line.startswith(("| model |", "|---")):
            model = line[2:].split(" | ", 1)[0].split(" (", 1)[0]
            if model not in measured:
                kept.append(line if line.count(" | ") >= 7 else line + " - |")  # tables before the decode column
    if not kept:
        return [], set(), set()
    return kept, commands, dates


def markers(model: str) -> tuple:
    """The markers of a model's table in the page (SmolLM2's table is the page's first)."""
    name = Path(model).name
    tag = "gguf" if name in ("smollm2", "smollm2-135m") else f"gguf:{name}"
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="outputs/bench-gguf")
    p.add_argument("--doc", default=None)
    p.add_argument("--rows", default="dense,mixed,depth,halves",
                   help="models, comma-separated: dense, mixed, depth, halves, a llama.cpp file type such as Q4_K_M (Q4_K_M+imatrix: "
                        "with an importance matrix), or "
                        "evopress@TYPE (EvoPress on the Q4_0/Q5_0/Q8_0 grids at the file size of TYPE's row), "
                        "gguf@TYPE (EvoPress over GGUF types, K-quants included, at that size)")
    p.add_argument("--llama-cpp-bin", default=os.environ.get("LLAMA_CPP_BIN"),
                   help="folder of llama.cpp's llama-imatrix and llama-quantize (rows TYPE+imatrix)")
    p.add_argument("--generations", type=int, default=15, help="evopress@TYPE / gguf@TYPE rows: search generations")
    p.add_argument("--num-samples", type=int, default=32, help="evopress@TYPE / gguf@TYPE rows: calibration windows")
    p.add_argument("--speed", action="store_true",
                   help="also time llama.cpp's decode step of every row's file against the dense model in F16, in "
                        "this process (run it on a quiet machine)")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    from optimum_evo.data import calibration_windows, evaluation_windows, join_corpus, load_texts, window_bos
    from optimum_evo.embedded_models import resolve_model
    from optimum_evo.exporters import export
    from optimum_evo.fitness import evaluate
    from optimum_evo.loading import load_model, load_tokenizer

    path = resolve_model(ns.model)
    tok = load_tokenizer(path)
    windows = evaluation_windows("wikitext2", tok, 512, ns.windows)
    sample = join_corpus(load_texts("wikitext2", "evaluation"))[:20000]  # the tokenizer check's text
    out = Path(ns.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    command = command_line(__file__, argv)

    def record(label: str, note: str, model, file: Path, types: dict, start: float) -> None:
        """One row: ``model`` evaluated by us and its GGUF ``file`` by llama.cpp, on the same windows;
        printed and appended to OUTPUT/gguf.jsonl."""
        ours = evaluate(model, windows, progress=False)["perplexity"]
        theirs = llamacpp_perplexity(file, windows, ns.threads)["perplexity"]
        speed = {"decode_speedup": reference_ms / llamacpp_decode_ms(file, ns.threads)} if ns.speed else {}
        row = {**speed, "model": label, "note": note, "types": types, "gguf_mb": file.stat().st_size / 1e6,
               "same_tokens": tokenizer_agrees(file, tok, sample), "ours": ours, "llama_cpp": theirs,
               "ratio": theirs / ours, "seconds": time.perf_counter() - start, "command": command,
               "date": datetime.date.today().isoformat()}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out / "gguf.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    reference_ms = None
    if ns.speed:  # the reference of the decode column: the dense model in F16, as llama.cpp users run it
        reference = out / "dense-f16" / "model.gguf"
        if not reference.exists():
            export(load_model(path, torch.float32), reference.parent, "gguf", tokenizer=path, dense_type="F16")
        reference_ms = llamacpp_decode_ms(reference, ns.threads)
    for name in [n for n in ns.rows.split(",") if n]:  # --rows "": only the table, from OUTPUT/gguf.jsonl
        if name.upper().startswith("Q") and "_K" in name.upper():  # llama.cpp's own quantization of the dense file
            from transformers import AutoModelForCausalLM

            ftype, _, imatrix = name.upper().partition("+")
            start = time.perf_counter()
            dense_file = out / "dense" / "model.gguf"
            if not dense_file.exists():
                export(load_model(path, torch.float32), out / "dense", "gguf", tokenizer=path, dense_type="F32")
            target = out / name.upper() / "model.gguf"
            if imatrix:
                llamacpp_imatrix_quantize(ns, dense_file, target, ftype, tok)
            else:
                llamacpp_quantize(dense_file, target, ftype, ns.threads)
            model = AutoModelForCausalLM.from_pretrained(target.parent, gguf_file=target.name, dtype=torch.float32).eval()
            how = (f"llama-quantize with an imatrix of {ns.num_samples} x 512 Brown calibration tokens" if imatrix
                   else "llama_model_quantize of the dense file, no imatrix")
            record(f"llama.cpp {name.upper()}", how, model, target, gguf_types(target), start)
            continue
        note = ""
        if name.startswith("gguf@"):
            model, report, bits = gguf_types_at_size(ns, path, name.split("@", 1)[1].upper(), out)
            counts = {}
            for t in report["saved_model"]["types"].values():
                counts[t] = counts.get(t, 0) + 1
            note = (f"searched at {bits:.3f} bits per linear weight ({', '.join(f'{v} {k}' for k, v in counts.items())}"
                    f"), {ns.num_samples} x 512 calibration tokens, {ns.generations} generations")
        elif name.startswith("evopress@"):
            model, report, bits = evopress_at_size(ns, path, name.split("@", 1)[1].upper(), out)
            levels = report["profile"]["bits"]
            note = (f"searched at {bits:.3f} average bits ({', '.join(f'{v} at {k}' for k, v in levels.items())}), "
                    f"{ns.num_samples} x 512 calibration tokens, {ns.generations} generations")
        else:
            model = load_model(path, torch.float32)
        if name == "mixed":
            model = mixed_model(model)
        elif name == "depth":
            model, removed = depth_model(model, calibration_windows("brown", tok, 16, 512, 0))
            note = f"blocks {removed} removed"
        elif name == "halves":
            model, attention, mlp = halves_model(model, calibration_windows("brown", tok, 16, 512, 0))
            note = f"attention of blocks {attention} and MLP of blocks {mlp} dropped; llama.cpp's deci graph"
        start = time.perf_counter()
        dense_type = "Q8_0" if name.startswith(("evopress@", "gguf@")) else ("F16" if name in ("depth", "halves") else "F32")
        summary = export(model, out / name, "gguf", tokenizer=path, dense_type=dense_type)
        record(name, note, model, out / name / summary["file"], summary["types"], start)
    if ns.doc:
        import llama_cpp

        latest = {}  # the newest row of every model in OUTPUT/gguf.jsonl (a run may redo some rows)
        for line in (out / "gguf.jsonl").read_text().splitlines():
            r = json.loads(line)
            latest[r["model"]] = r
        rows = list(latest.values())
        start, end = markers(ns.model)
        doc = Path(ns.doc)
        text = doc.read_text() if doc.exists() else "# GGUF in llama.cpp\n"
        kept, old_commands, old_dates = earlier_rows(text, start, end, set(latest))

        commands = sorted({r.get("command", command) for r in rows} | old_commands)
        lines = [start, "", "- Command" + ("s" if len(commands) > 1 else "") + ": "
                 + "; ".join(f"`{c}`" for c in commands),
                 f"- Machine: {os.cpu_count()} cores, torch {torch.__version__}, llama-cpp-python "
                 f"{llama_cpp.__version__}; dates {', '.join(sorted({r.get('date') or '-' for r in rows} | old_dates))}.",
                 f"- WikiText-2 test, first {ns.windows} x 512-token windows, "
                 + ("each after BOS." if window_bos(tok) is not None else "no BOS (the tokenizer adds none)."), "",
                 "- Tokens: whether llama.cpp's tokenizer of the file gives transformers' ids on the first 20,000 "
                 "characters of the test text (- where not checked).", "",
                 "- Decode: llama.cpp's decode step after 128 tokens against the dense model's in `F16`, timed in the "
                 "same run on one thread (- where not timed).", "",
                 "| model | GGUF tensor types | file (MB) | ppl, ours | ppl, llama.cpp | llama.cpp / ours | tokens | "
                 "decode vs F16 |",
                 "|---|---|---|---|---|---|---|---|", *kept]
        for r in rows:
            types = ", ".join(f"{k} {v}" for k, v in r["types"].items())
            label = r["model"] + (f" ({r['note']})" if r["note"] else "")
            same = {True: "same", False: "differ"}.get(r.get("same_tokens"), "-")
            decode = f"{r['decode_speedup']:.2f}x" if "decode_speedup" in r else "-"
            lines.append(f"| {label} | {types} | {r['gguf_mb']:.1f} | {r['ours']:.3f} | {r['llama_cpp']:.3f} | "
                         f"{r['ratio']:.4f} | {same} | {decode} |")
        lines += ["", end]
        if start not in text:  # a model's first table: a section of its own at the end
            text = text.rstrip("\n") + f"\n\n## {Path(ns.model).name}\n\n{start}\n{end}\n"
        head, rest = text.split(start, 1)
        doc.write_text(head + "\n".join(lines) + rest.split(end, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
