"""Peer benchmark: EvoPress against what users would pick instead, at equal effective bits.

One command makes every row of ``docs/benchmarks/peers.md`` for one model: round-to-nearest,
AutoRound (SignRound) uniform W2/W3/W4 g128 and its RTN mode, AutoRound's AutoScheme at the same
effective bits with the options of our levels, GPTQModel's GPTQ, our uniform levels, EvoPress, and
the two layer-importance heuristics of "Layer-Wise Quantization: A Pragmatic and Effective Method
for Quantizing LLMs Beyond Integer Bit-Levels" (LIM: how much a decoder layer changes its input,
``1 - cos(input, output)``; ZD: the fraction of a layer's weights with z-score above 1; the most
important layers get the higher of two bit widths). Every peer runs through its own package in a
subprocess (auto-round 0.16.1 and gptqmodel 7.7.0, pinned, next to the CPU torch: never a CUDA
torch); its quantized weights come back dequantized and are evaluated by *our* evaluation code
(`optimum_evo.fitness.evaluate`) on the same windows as every other row. Before a row is
evaluated, the number of distinct values in every quantization group of every linear is checked
against ``2**bits`` (a silently dense export fails the row).

Rows are cached in ``OUTPUT/<model>/rows/*.json``: an interrupted run resumes where it stopped.

Usage::

    python benchmarks/peers.py --setup                      # the pinned peers (auto-round, py-cpuinfo)
    python benchmarks/peers.py --model smollm2 --targets 2.5 3 4 --iters 50 --builder signround \\
        --threads 1 --output outputs/bench-peers --doc docs/benchmarks/peers.md

``--full-eval`` adds the perplexity on the whole WikiText-2 test set (every row; about an hour per
row for SmolLM2-135M on one core). ``--rows`` restricts the rows (comma-separated kinds: rtn,
autoround, autoround-rtn, autoscheme, gptqmodel, uniform, evopress, retune, lim, zd).

``--builder-stream`` chooses the calibration stream our levels are tuned on (``level``: one per
level; a bit width such as ``3``: one stream shared by every level; `optimum_evo.compressors.builders`);
row keys name it. ``retune`` re-makes the EvoPress row's chosen levels in one sequential pass on the
chosen model's own activations (`optimum_evo.compressors.retune`; ``--retune-source`` names
another EvoPress row to start from).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from doc_sections import command_line

REPO = Path(__file__).resolve().parents[1]
AUTOROUND_DIR = REPO / ".venv" / "peers-autoround"
GPTQMODEL_DIR = REPO / ".venv" / "gptqmodel-cpu"
AUTOROUND_PINS = ("auto-round==0.16.1", "py-cpuinfo==9.0.0")
ROW_KINDS = ("rtn", "autoround-rtn", "autoround", "autoscheme", "gptqmodel", "uniform", "lim", "zd", "evopress",
             "retune")


def setup() -> None:
    """Install the pinned peers without their dependencies (they would pull a CUDA torch): auto-round
    into .venv/peers-autoround; gptqmodel is installed by ``make setup`` into .venv/gptqmodel-cpu."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(AUTOROUND_DIR),
                    *AUTOROUND_PINS], check=True)
    if not (GPTQMODEL_DIR / "gptqmodel").is_dir():
        raise SystemExit(f"gptqmodel is missing from {GPTQMODEL_DIR}: run `make setup`.")


# ============================================================================ workers (peer packages)
def _block_linears(model) -> dict:
    from optimum_evo.decoder import find_decoder_layout

    layout = find_decoder_layout(model)
    return {f"{layout.path}.{i}.{n}": m for i, layer in enumerate(layout.layers)
            for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def _save_weights(model, out: Path, levels: dict, extra: dict) -> None:
    from safetensors.torch import save_file

    linears = _block_linears(model)
    save_file({n: m.weight.detach().float().contiguous() for n, m in linears.items() if n in levels}, str(out))
    out.with_suffix(".json").write_text(json.dumps({"levels": levels, **extra}, indent=1))


def _loader(windows: torch.Tensor, batch_size: int = 1) -> list:
    return [{"input_ids": windows[i:i + batch_size], "attention_mask": torch.ones_like(windows[i:i + batch_size])}
            for i in range(0, windows.shape[0], batch_size)]


def worker_autoround(a) -> None:
    """AutoRound uniform (``--bits``; ``--iters 0``: its RTN mode) or AutoScheme (``--avg-bits``)."""
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model_path)
    windows = torch.load(a.calib)
    n, t = windows.shape
    kw = dict(dataset=_loader(windows), nsamples=n, seqlen=t, batch_size=8, device_map="cpu", iters=a.iters,
              enable_torch_compile=False)
    start = time.perf_counter()
    if a.avg_bits:
        import auto_round.auto_scheme.delta_loss as delta_loss
        import auto_round.calib_dataset as calib_dataset
        from auto_round import AutoScheme

        def local(tokenizer, seqlen=t, dataset_name=None, seed=42, bs=8, nsamples=n, **_):
            return _loader(windows[:nsamples], bs)

        calib_dataset.get_dataloader = local  # AutoScheme asks for a dataset *name*; offline: our windows
        delta_loss.get_dataloader = local
        kw["dataset"] = "local"  # AutoScheme's generator takes AutoRound's dataset and refuses a non-name
        options = tuple(f"W{b}A16" for b in a.options.split(","))
        scheme = AutoScheme(avg_bits=a.avg_bits, options=options, dataset="local", nsamples=n, seqlen=t,
                            device_map="cpu", enable_torch_compile=False)
        ar = AutoRound(model, tok, scheme=scheme, **kw)
    else:
        ar = AutoRound(model, tok, scheme=f"W{a.bits}A16", group_size=a.group_size, sym=False, **kw)
    out = ar.quantize()
    model = out[0] if isinstance(out, tuple) else out
    levels = {}
    for name, m in _block_linears(model).items():
        bits = int(getattr(m, "bits", 16))
        if bits < 16:
            levels[name] = [bits, int(getattr(m, "group_size", a.group_size))]
    _save_weights(model, Path(a.out), levels, {"seconds": time.perf_counter() - start})


def worker_gptqmodel(a) -> None:
    """GPTQModel's GPTQ (uniform ``--bits``, asymmetric, group ``--group-size``), saved, then read back
    and dequantized from its GPTQ checkpoint."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # its model-loader pool needs 2 workers
    from gptqmodel import GPTQModel, QuantizeConfig
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from optimum_evo.compressors.packing import unpack_int32

    torch.set_num_threads(a.threads)
    windows = torch.load(a.calib)
    start = time.perf_counter()
    qcfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=False, desc_act=False)
    model = GPTQModel.load(a.model_path, qcfg, device="cpu", dtype=torch.float32)
    model.quantize(_loader(windows), batch_size=1)
    saved = Path(a.out).with_suffix(".gptq")
    model.save(str(saved))
    seconds = time.perf_counter() - start
    config = json.loads((saved / "quantize_config.json").read_text())
    offset = 1 if config.get("checkpoint_format", config.get("format", "gptq")) == "gptq" else 0
    dense = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32)
    linears = _block_linears(dense)
    tensors = {}
    for f in sorted(saved.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    levels = {}
    with torch.no_grad():
        for name, m in linears.items():
            if f"{name}.qweight" not in tensors:
                continue
            bits, rows, cols = a.bits, m.out_features, m.in_features
            # GPTQ layout: qweight [in * bits / 32, out] packed along the input, qzeros [groups, out * bits / 32]
            codes = unpack_int32(tensors[f"{name}.qweight"].t().contiguous(), bits, cols)  # [out, in]
            scales = tensors[f"{name}.scales"].float()  # [groups, out]
            groups = scales.shape[0]
            zeros = unpack_int32(tensors[f"{name}.qzeros"], bits, rows) + offset  # [groups, out]
            g = tensors[f"{name}.g_idx"].long()
            m.weight.copy_(scales[g].t() * (codes.float() - zeros[g].t().float()))
            levels[name] = [bits, cols // groups if cols % groups == 0 else a.group_size]
    _save_weights(dense, Path(a.out), levels, {"seconds": seconds, "checkpoint_format": config.get("checkpoint_format")})


def run_worker(kind: str, env_path: Path, args: list, log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(env_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        # run in the log's folder: the peers write their own logs into the working directory
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind, *args], env=env,
                              stdout=f, stderr=subprocess.STDOUT, cwd=log.parent)
    if proc.returncode:
        raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}); see {log}:\n"
                           + log.read_text()[-3000:])


# ============================================================================ the benchmark
def distinct_ok(w: torch.Tensor, bits: int, group_size: int) -> int:
    """Largest number of distinct values in one quantization group of ``w`` (input-column groups)."""
    rows, cols = w.shape
    gs = cols if not group_size or group_size <= 0 else group_size
    worst = 0
    for s in range(0, cols, gs):
        v = w[:, s:s + gs].sort(dim=1).values
        worst = max(worst, int((1 + (v[:, 1:] != v[:, :-1]).sum(1)).max()))
    return worst


class Bench:
    def __init__(self, ns):
        from optimum_evo.data import calibration_windows, evaluation_windows
        from optimum_evo.embedded_models import resolve_model
        from optimum_evo.fitness import TeacherCache
        from optimum_evo.loading import load_model, load_tokenizer

        self.ns = ns
        self.path = resolve_model(ns.model)
        self.tokenizer = load_tokenizer(self.path)
        self.model = load_model(self.path, torch.float32)
        self.root = Path(ns.output) / ns.model
        (self.root / "rows").mkdir(parents=True, exist_ok=True)
        (self.root / "work").mkdir(parents=True, exist_ok=True)
        self.calib = calibration_windows("brown", self.tokenizer, ns.num_samples, ns.seq_len, 0)
        self.calib_file = self.root / "work" / "calibration.pt"
        torch.save(self.calib, self.calib_file)
        self.windows = {"40": evaluation_windows("wikitext2", self.tokenizer, 512, 40)}
        if ns.full_eval:
            self.windows["full"] = evaluation_windows("wikitext2", self.tokenizer, 512, None)
        self.teachers = {k: TeacherCache.build(self.model, w, "topk", 512, progress=False)
                         for k, w in self.windows.items()}
        self.linears = _block_linears(self.model)
        self.dense = {n: m.weight.detach().clone() for n, m in self.linears.items()}

    # ------------------------------------------------------------------ evaluation of one row
    def row_file(self, key: str) -> Path:
        return self.root / "rows" / f"{key}.json"

    def done(self, key: str) -> bool:
        f = self.row_file(key)
        return f.exists() and ("full" in json.loads(f.read_text()).get("perplexity", {}) or not self.ns.full_eval)

    @torch.no_grad()
    def evaluate(self, key: str, weights: dict, levels: dict, meta: dict) -> dict:
        from optimum_evo.compressors.codecs import stored_bits
        from optimum_evo.fitness import evaluate

        missing = set(self.linears) - set(levels)
        if missing:
            raise RuntimeError(f"{key}: {len(missing)} linears were not quantized, e.g. {sorted(missing)[:3]}.")
        stored = numel = 0
        worst = {}
        for name, (bits, gs) in levels.items():
            w = weights[name].float()
            distinct = distinct_ok(w, bits, gs)
            if distinct > 2 ** bits:
                raise RuntimeError(f"{key}: {name} has {distinct} distinct values in one group of {gs} at {bits} "
                                   "bits: the weights are not quantized (a silently dense export?).")
            worst[bits] = max(worst.get(bits, 0), distinct)
            stored += stored_bits(bits, gs, tuple(w.shape))
            numel += w.numel()
            self.linears[name].weight.copy_(w.to(self.linears[name].weight.dtype))
        try:
            res = {k: evaluate(self.model, w, self.teachers[k], progress=False) for k, w in self.windows.items()}
        finally:
            for name, m in self.linears.items():
                m.weight.copy_(self.dense[name])
        counts: dict = {}
        for bits, gs in levels.values():
            counts[f"{bits}g{gs}"] = counts.get(f"{bits}g{gs}", 0) + 1
        row = {"key": key, **meta, "effective_bits": stored / numel,
               "average_bits": sum(b * weights[n].numel() for n, (b, _) in levels.items()) / numel,
               "levels": dict(sorted(counts.items())), "max_distinct_per_group": worst,
               "perplexity": {k: r["perplexity"] for k, r in res.items()}, "kl": {k: r["kl"] for k, r in res.items()}}
        self.row_file(key).write_text(json.dumps(row, indent=1))
        print(json.dumps({k: row[k] for k in ("key", "effective_bits", "perplexity", "kl")}), flush=True)
        return row

    def from_worker(self, key: str, kind: str, env: Path, args: list, meta: dict) -> None:
        from safetensors.torch import load_file

        out = self.root / "work" / f"{key}.safetensors"
        if not out.exists():
            run_worker(kind, env, ["--model-path", str(self.path), "--calib", str(self.calib_file.resolve()), "--out", str(out.resolve()),
                                   "--threads", str(self.ns.threads), *args], self.root / "work" / f"{key}.log")
        info = json.loads(out.with_suffix(".json").read_text())
        self.evaluate(key, load_file(str(out)), {n: tuple(v) for n, v in info["levels"].items()},
                      {**meta, "seconds": info.get("seconds")})

    # ------------------------------------------------------------------ rows
    def rtn(self, bits: int) -> None:
        from optimum_evo.compressors.grid import dequantize_codes, find_params, quantize_codes

        key = f"rtn-w{bits}"
        if self.done(key):
            return
        start = time.perf_counter()
        weights = {}
        for name, m in self.linears.items():
            w = m.weight.detach().float()
            out = torch.empty_like(w)
            for s in range(0, w.shape[1], 128):
                sc, z = find_params(w[:, s:s + 128], bits)
                out[:, s:s + 128] = dequantize_codes(quantize_codes(w[:, s:s + 128], sc, z, bits), sc, z)
            weights[name] = out
        self.evaluate(key, weights, {n: (bits, 128) for n in weights},
                      {"method": "round-to-nearest", "config": f"W{bits} g128 asym", "seconds":
                       time.perf_counter() - start})

    def autoround(self, bits: int, iters: int) -> None:
        key = f"autoround-w{bits}-i{iters}" if iters else f"autoround-rtn-w{bits}"
        if self.done(key):
            return
        self.from_worker(key, "autoround", AUTOROUND_DIR, ["--bits", str(bits), "--iters", str(iters)],
                         {"method": "AutoRound 0.16.1" + (" (RTN mode)" if not iters else ""),
                          "config": f"W{bits} g128 asym, iters={iters}"})

    def autoscheme(self, target: float, iters: int) -> None:
        eff = self.reference_bits(target)
        key = f"autoscheme-{target}-i{iters}"
        if self.done(key):
            return
        options = ",".join(str(b) for b in self.ns.levels)
        self.from_worker(key, "autoround", AUTOROUND_DIR, ["--avg-bits", f"{eff:.6f}", "--options", options,
                                                           "--iters", str(iters)],
                         {"method": "AutoRound 0.16.1 AutoScheme", "config": f"avg_bits={eff:.4f} over "
                          f"W{'/W'.join(options.split(','))} g128, iters={iters}", "target": target})

    def gptqmodel(self, bits: int) -> None:
        key = f"gptqmodel-w{bits}"
        if self.done(key):
            return
        self.from_worker(key, "gptqmodel", GPTQMODEL_DIR, ["--bits", str(bits)],
                         {"method": "GPTQModel 7.7.0 GPTQ", "config": f"W{bits} g128 asym, damp 0.01 (its defaults)"})

    def reference_bits(self, target: float) -> float:
        """Effective bits of our uniform ``target``-bit model at group size 128 (the budget of a row)."""
        from optimum_evo.compressors.codecs import stored_bits

        lo, hi = math.floor(target), math.ceil(target)
        numel = sum(m.weight.numel() for m in self.linears.values())
        frac = target - lo
        return sum((1 - frac) * stored_bits(lo, 128, tuple(m.weight.shape)) + frac * stored_bits(
            hi, 128, tuple(m.weight.shape)) for m in self.linears.values()) / numel

    # ------------------------------------------------------------------ our rows
    @property
    def levels_tag(self) -> str:
        """Names our rows by what made their levels (builder, and the stream when it is not per level)."""
        stream = self.ns.builder_stream
        return self.ns.builder + ("" if stream in (None, "level") else f"-stream{stream}")

    def levels_label(self) -> str:
        stream = self.ns.builder_stream
        return self.ns.builder + ("" if stream in (None, "level") else f", shared {stream}-bit stream"
                                  if str(stream).isdigit() else f", {stream} stream")

    def search_args(self, target: float, **kw):
        from optimum_evo.settings import SearchArguments

        ns = self.ns
        return SearchArguments(model=ns.model, compression="quantization", target=float(target), levels=ns.levels,
                               builder=ns.builder, builder_iters=ns.builder_iters,
                               builder_stream=ns.builder_stream, group_sizes=kw.pop("group_sizes", None),
                               num_samples=ns.num_samples, seq_len=ns.seq_len, preset=ns.preset,
                               generations=ns.generations, eval_windows=0, progress=False, save_model=False,
                               search_dtype="float32", **kw)

    def database(self, args):
        from optimum_evo.methods import get_method
        from optimum_evo.pipeline import stages
        from optimum_evo.pipeline.context import RunContext

        ctx = RunContext(args=args, method=get_method("quantization"), path=args.model, model=self.model,
                         tokenizer=self.tokenizer)
        stages.load(ctx)
        stages.calibrate(ctx)
        ctx.search_model, ctx.search_dtype = ctx.model, ctx.model.dtype
        start = time.perf_counter()
        ctx.method.prepare(ctx)
        return ctx.database, time.perf_counter() - start

    def evaluate_levels(self, key: str, db, levels: dict, meta: dict) -> None:
        from optimum_evo.compressors.codecs import quant_level

        reference = db.manifest["settings"]["group_size"]
        pairs = {n: quant_level(lv, reference) for n, lv in levels.items()}
        weights = {n: db.weight(n, lv) for n, lv in levels.items()}
        self.evaluate(key, weights, pairs, {**meta, "builder": db.manifest["settings"]["builder"],
                                            "database_seconds": db.manifest.get("build_seconds")})

    def uniform(self, target: float) -> None:
        from optimum_evo.methods.quantization import QuantizationSpace

        key = f"uniform-{target}-{self.levels_tag}"
        if self.done(key):
            return
        db, _ = self.database(self.search_args(target))
        space = QuantizationSpace(self.model, db, target, cache=False)
        self.evaluate_levels(key, db, space.profile(space.uniform()),
                             {"method": f"optimum-evo uniform ({self.levels_label()} levels)", "config": f"{target} bits g128"})

    def heuristic(self, target: float, kind: str) -> None:
        """LIM / ZD: whole decoder layers at the higher of two bit widths, most important first."""
        from optimum_evo.decoder import find_decoder_layout

        key = f"{kind}-{target}-{self.levels_tag}"
        if self.done(key):
            return
        lo, hi = (math.floor(target), math.ceil(target)) if target % 1 else (int(target) - 1, int(target) + 1)
        layout = find_decoder_layout(self.model)
        n = len(layout)
        k = round((target - lo) / (hi - lo) * n)
        scores = self.lim_scores() if kind == "lim" else self.zd_scores()
        important = set(sorted(range(n), key=lambda i: -scores[i])[:k])
        db, _ = self.database(self.search_args(target))
        levels = {name: (hi if int(name[len(layout.path) + 1:].split(".")[0]) in important else lo) for name in db.modules}
        label = {"lim": "LIM (1 - cos of a layer's input and output)", "zd": "ZD (share of weights with z > 1)"}[kind]
        self.evaluate_levels(key, db, levels, {"method": f"layer-wise {label}", "config":
                             f"{k} layers W{hi}, {n - k} W{lo}, g128 ({self.levels_label()} levels)", "target": target,
                             "important_layers": sorted(important)})

    @torch.no_grad()
    def lim_scores(self) -> list:
        from optimum_evo.compressors.calibrate import walk_blocks

        scores = []
        for block in walk_blocks(self.model, self.calib[:32], progress=False):
            outs = block.dense_outputs()
            cos = [torch.nn.functional.cosine_similarity(x[0], y[0], dim=-1).mean() for x, y in zip(block.inputs, outs)]
            scores.append(float(1 - torch.stack(cos).mean()))
        return scores

    def zd_scores(self) -> list:
        from optimum_evo.decoder import find_decoder_layout

        out = []
        for layer in find_decoder_layout(self.model).layers:
            w = torch.cat([m.weight.detach().float().flatten() for m in layer.modules() if isinstance(m, torch.nn.Linear)])
            z = (w - w.mean()) / w.std()
            out.append(float((z > 1).float().mean()))
        return out

    def evopress(self, target: float, group_sizes=None) -> None:
        from optimum_evo.pipeline import run_search

        tag = "" if not group_sizes else "-g" + "-".join(str(g) for g in group_sizes)
        key = f"evopress-{target}-{self.levels_tag}{tag}"
        if self.done(key):
            return
        args = self.search_args(target, group_sizes=group_sizes, output_dir=str(self.root / "work" / key))
        db, _ = self.database(args)
        start = time.perf_counter()
        report = run_search(args)
        self.evaluate_levels(key, db, report["levels"], {
            "method": "optimum-evo EvoPress" + (" + group sizes" if group_sizes else ""),
            "config": f"target {target}, levels W{'/W'.join(str(b) for b in self.ns.levels)} g"
                      f"{'/'.join(str(g) for g in (args.group_sizes or [128]))} ({self.levels_label()}), preset {self.ns.preset}"
                      + (f", {self.ns.generations} generations" if self.ns.generations else ""),
            "target": target, "search_seconds": time.perf_counter() - start,
            "search_generations": report["search"]["generations"]})


    def retune(self, target: float, source: str | None = None) -> None:
        """The EvoPress row's profile, its levels made again on its own stream (`retune`)."""
        from optimum_evo.compressors.retune import retune

        source = source or f"evopress-{target}-{self.levels_tag}"
        key = f"{source}-retuned"
        result = self.root / "work" / source / "result.json"
        if self.done(key):
            return
        if not result.exists():
            raise RuntimeError(f"{key}: run the evopress row first ({result} is missing).")
        report = json.loads(result.read_text())
        manifest = Path(report["database"]["path"]) / "manifest.json"
        settings = json.loads(manifest.read_text())["settings"]  # the builder that made the searched levels
        start = time.perf_counter()
        tuned = retune(self.model, self.calib, report["levels"], settings, progress=False)
        pairs = {n: (q.bits, q.group_size) for n, q in tuned.items()}
        from optimum_evo.compressors.codecs import get_codec

        codec = get_codec("quantization")
        weights = {n: codec.decode(codec.encode(q), tuple(q.codes.shape), f"{q.bits}g{q.group_size}", settings)
                   for n, q in tuned.items()}  # as a checkpoint stores them (float16 scales)
        row = json.loads(self.row_file(source).read_text()) if self.row_file(source).exists() else {}
        self.evaluate(key, weights, pairs, {
            "method": "optimum-evo EvoPress, levels re-tuned on the chosen model",
            "config": (row.get("config", source) + f"; then one {settings.get('builder')} pass on its own stream"),
            "target": target, "seconds": time.perf_counter() - start,
            "search_seconds": row.get("search_seconds")})


# ============================================================================ the page
def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


MARK_START, MARK_END = "<!-- peers:start -->", "<!-- peers:end -->"


def _earlier_sections(tables: str) -> dict:
    """``{model: {"commands": [...], "dates": [...], "head": [lines], "rows": {(method, config): line}}}``
    of the sections already in the doc, so that a run which remakes some rows keeps the others."""
    sections, current = {}, None
    for line in tables.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), {"commands": [], "dates": [], "machine": None, "rows": {}})
        elif current is None:
            continue
        elif line.startswith("- Command: "):
            current["commands"] += [c for c in line[len("- Command: "):].split("`")[1::2]]
        elif line.startswith("- Machine: "):
            machine_part, _, date = line[len("- Machine: "):].rpartition("; date ")
            current["machine"] = machine_part.split(";")[0].strip()
            current["dates"] += [d.strip() for d in date.rstrip(".").replace(" and ", ", ").split(",") if d.strip()]
        elif line.startswith("| ") and not line.startswith("| budget") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            current["rows"][(cells[1], cells[2])] = line
    return sections


def write_doc(doc: Path, output: Path, meta: dict) -> None:
    """The table of every model of ``output`` (rows cached in ``OUTPUT/<model>/rows``), merged with
    the doc's earlier rows: a row this output holds replaces the one with the same method and
    configuration, the others are kept, and the section names every command and date that made it."""
    text = doc.read_text() if doc.exists() else f"# Peer benchmark\n\n{MARK_START}\n{MARK_END}\n"
    head, rest = text.split(MARK_START, 1)
    tables, tail = rest.split(MARK_END, 1)
    earlier = _earlier_sections(tables)
    sections = {}
    for model_dir in sorted(p for p in output.iterdir() if (p / "rows").is_dir()):
        rows = [json.loads(f.read_text()) for f in sorted((model_dir / "rows").glob("*.json"))]
        if not rows:
            continue
        m = json.loads((model_dir / "meta.json").read_text()) if (model_dir / "meta.json").exists() else meta
        old = earlier.pop(model_dir.name, {"commands": [], "dates": [], "machine": None, "rows": {}})
        lines = {}
        for r in rows:
            full = r["perplexity"].get("full")
            secs = r.get("seconds") or r.get("search_seconds") or r.get("database_seconds")
            lines[(r["method"], r["config"])] = (
                f"| {round(r['effective_bits'], 2):.2f} | {r['method']} | {r['config']} | {r['effective_bits']:.3f} | "
                f"{r['perplexity']['40']:.2f} | {'-' if full is None else f'{full:.2f}'} | {r['kl']['40']:.3f} | "
                f"{'-' if secs is None else f'{secs:.0f}'} |")
        kept = {k: v for k, v in old["rows"].items() if k not in lines}
        commands = [c for c in old["commands"] if c != m.get("command")] + [m.get("command")]
        dates = sorted(set(old["dates"]) | {m.get("date")})
        machine_line = m.get("machine")
        if kept and old["machine"] and old["machine"] != machine_line:
            machine_line = f"{old['machine']} (earlier rows) and {machine_line} (this run)"
        machine_line += (f"; {m.get('threads')} torch thread(s)" if len(commands) == 1 else
                         "; torch threads as in each command (`--threads`)")
        sections[model_dir.name] = (commands, dates, machine_line, m, list(kept.values()) + list(lines.values()))
    for name, old in earlier.items():  # models this output does not hold: as they were
        sections[name] = (old["commands"], old["dates"], f"{old['machine']}; torch threads as in each command "
                          "(`--threads`)", None, list(old["rows"].values()))

    def sort_key(line):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        ppl = cells[4].strip("*")
        return float(cells[0]), float(ppl) if ppl.replace(".", "", 1).isdigit() else math.inf

    body = [MARK_START, ""]
    for name, (commands, dates, machine_line, m, lines) in sorted(sections.items()):
        m = m or meta
        body += [f"## {name}", "", "- Command: " + "; ".join(f"`{c}`" for c in commands),
                 f"- Machine: {machine_line}; date {', '.join(dates)}.",
                 f"- Calibration {m.get('num_samples')} x {m.get('seq_len')} Brown tokens (the same windows for every "
                 "row); evaluation WikiText-2 test, float32, KL = top-512 KL(dense || model) per token.", "",
                 "| budget (eff. bits) | method | configuration | eff. bits | ppl, 40 x 512 | ppl, full test | KL (40) |"
                 " time (s) |", "|---|---|---|---|---|---|---|---|"]
        body += sorted(lines, key=sort_key)
        body.append("")
    body.append(MARK_END)
    doc.write_text(head + "\n".join(body) + tail)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true", help="install the pinned peers and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--calib", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--bits", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--avg-bits", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--options", default="2,3,4,8", help=argparse.SUPPRESS)
    p.add_argument("--group-size", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--targets", type=float, nargs="*", default=[2.5, 3.0, 4.0])
    p.add_argument("--iters", type=int, default=200, help="AutoRound / AutoScheme iterations (200: its default)")
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3, 4, 8],
                   help="bit widths of our levels and AutoScheme's options")
    p.add_argument("--builder", default="signround")
    p.add_argument("--builder-iters", type=int, default=None)
    p.add_argument("--builder-stream", default="level",
                   help="calibration stream the levels are tuned on: level, dense, target or a bit width such as 3")
    p.add_argument("--group-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="extra group sizes of an EvoPress row with group size as a level dimension")
    p.add_argument("--retune-source", default=None,
                   help="retune row: the evopress row whose profile is re-tuned (default: this run's)")
    p.add_argument("--preset", default="fast")
    p.add_argument("--generations", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rows", default=",".join(ROW_KINDS))
    p.add_argument("--full-eval", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default="outputs/bench-peers")
    p.add_argument("--doc", default="docs/benchmarks/peers.md")
    ns = p.parse_args(argv)
    if ns.setup:
        setup()
        return 0
    if ns.worker:
        {"autoround": worker_autoround, "gptqmodel": worker_gptqmodel}[ns.worker](ns)
        return 0
    torch.set_num_threads(ns.threads)
    kinds = [k for k in ns.rows.split(",") if k]
    unknown = set(kinds) - set(ROW_KINDS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {ROW_KINDS}")
    bench = Bench(ns)
    meta = {"command": command_line(__file__, argv),
            "machine": machine(), "threads": ns.threads, "date": datetime.date.today().isoformat(),
            "num_samples": ns.num_samples, "seq_len": ns.seq_len}
    (bench.root / "meta.json").write_text(json.dumps(meta, indent=1))
    for target in ns.targets:
        integer = float(target).is_integer()
        steps = {
            "rtn": lambda: integer and bench.rtn(int(target)),
            "autoround-rtn": lambda: integer and bench.autoround(int(target), 0),
            "autoround": lambda: integer and bench.autoround(int(target), ns.iters),
            "autoscheme": lambda: bench.autoscheme(target, ns.iters),
            "gptqmodel": lambda: integer and bench.gptqmodel(int(target)),
            "uniform": lambda: bench.uniform(target),
            "lim": lambda: bench.heuristic(target, "lim"),
            "zd": lambda: bench.heuristic(target, "zd"),
            "evopress": lambda: (bench.evopress(target), ns.group_sizes and bench.evopress(target, ns.group_sizes)),
            "retune": lambda: bench.retune(target, ns.retune_source),
        }
        for kind in kinds:
            try:
                steps[kind]()
            except Exception as e:  # a failed peer is reported, the other rows still run
                print(f"row {kind} at {target} failed: {type(e).__name__}: {e}", flush=True)
            if ns.doc:
                write_doc(Path(ns.doc), Path(ns.output), meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
