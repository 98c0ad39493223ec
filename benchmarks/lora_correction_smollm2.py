"""LoRA error-correction benchmark on SmolLM2-135M: 70% sparsity and 2.5 average bits.

For each compressed model: WikiText-2 perplexity and KL of the dense model, the compressed model,
closed-form corrections (EoRA on dense inputs, EoRA on compressed inputs, plain SVD) and the
KL-distilled correction; the share of the perplexity gap each recovers; adapter size against the
compressed model's deployable size. Writes ``docs/benchmarks/lora-correction.md``.

Inputs:

* sparsity: uniform 70% SparseGPT on the calibration text (cached in ``--output``), or
  ``--sparse-model DIR`` (e.g. an EvoPress result's ``model/``);
* quantization: the level database ``--database`` with the DP (knapsack) 2.5-bit profile, or
  ``--profile FILE`` (JSON ``{module: bits}``, e.g. ``result.json``'s ``levels``).

Usage::

    nice -n 10 python benchmarks/lora_correction_smollm2.py \\
        --database ~/.cache/optimum_evo/databases/quantization-de9858ad40a058d2 --rank 8 --train-steps 150
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from depth_smollm2 import machine  # noqa: E402
from doc_sections import command_line  # noqa: E402

from optimum_evo.compressors.calibrate import walk_blocks  # noqa: E402
from optimum_evo.compressors.obs import sparsegpt  # noqa: E402
from optimum_evo.correction import (  # noqa: E402
    adapter_parameters, allocate_ranks, attach_adapters, closed_form_adapters, save_correction, select_inputs,
)
from optimum_evo.correction.train import distill  # noqa: E402
from optimum_evo.data import calibration_windows, evaluation_windows  # noqa: E402
from optimum_evo.fitness import TeacherCache, evaluate  # noqa: E402
from optimum_evo.embedded_models import resolve_model  # noqa: E402


def sparsify(dense, windows, sparsity: float):
    """Uniform SparseGPT, block by block (each linear of each block at ``sparsity``)."""
    model = copy.deepcopy(dense)
    for block in walk_blocks(model, windows, desc="SparseGPT"):
        hs = block.hessians()
        for name, lin in block.linears().items():
            with torch.no_grad():
                lin.weight.copy_(sparsegpt(lin.weight, hs[name], sparsity))
    return model


@torch.no_grad()
def rtn(weight: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """Round-to-nearest, asymmetric min-max, one scale/zero per group of ``group_size`` inputs."""
    from optimum_evo.compressors.grid import dequantize_codes, find_params, quantize_codes

    W = weight.detach().float()
    out = torch.empty_like(W)
    for g in range(0, W.shape[1], group_size):
        block = W[:, g:g + group_size]
        scale, zero = find_params(block, bits)
        out[:, g:g + group_size] = dequantize_codes(quantize_codes(block, scale, zero, bits), scale, zero)
    return out


def quantize(dense, database: str, bits: float, profile: str | None, quantizer: str = "database"):
    from optimum_evo.compressors.database import LevelDatabase
    from optimum_evo.methods.layerwise import dp_candidate
    from optimum_evo.methods.quantization import QuantizationSpace

    model = copy.deepcopy(dense)
    db = LevelDatabase.open(database, verify=False)
    space = QuantizationSpace(model, db, bits)
    if profile:
        data = json.loads(Path(profile).read_text())
        levels = data.get("levels", data)
        cand = tuple(space.bits.index(int(levels[n])) for n in space.names)
        source = profile
    else:
        cand = dp_candidate(space)
        source = "DP (knapsack) baseline on the database errors"
    if quantizer == "rtn":  # same profile, weights rounded to nearest instead of the database's GPTQ levels
        group = db.manifest["settings"]["group_size"]
        with torch.no_grad():
            for m, i in zip(space.modules, cand):
                m.weight.copy_(rtn(m.weight, space.bits[i], group))
        source += f"; RTN g{group} weights"
    else:
        space.apply(model, cand)
        source += "; GPTQ weights from the database"
    desc = space.describe(cand)
    bpw = db.bytes_per_weight()
    linear_bytes = sum(n * bpw[str(space.bits[i])] for n, i in zip(space.numel, cand))
    return model, desc, linear_bytes, source


def profile_model(dense, kind: str, database: str, result: str):
    """``dense`` with the levels of a search's ``result.json`` applied from its level database."""
    from optimum_evo.compressors.database import LevelDatabase

    if not database:
        raise SystemExit(f"--{kind}-profile needs --{kind}-database (the database the search used).")
    model = copy.deepcopy(dense)
    levels = json.loads(Path(result).read_text())["levels"]
    db = LevelDatabase.open(database, verify=False)
    with torch.no_grad():
        for name, level in levels.items():
            weight = model.get_submodule(name).weight
            weight.copy_(db.weight(name, level, dtype=weight.dtype))
    return model, f"EvoPress profile of {result}"


def deployable_bytes(model, linear_bytes: float) -> float:
    """Compressed linears at ``linear_bytes`` plus every other parameter at 16 bits."""
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and ".layers." in n)
    total = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    return linear_bytes + 2 * (total - linears)


def sparse_linear_bytes(model) -> float:
    """Non-zeros at 16 bits plus a 1-bit mask per weight."""
    b = 0.0
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in n:
            b += 2 * int((m.weight != 0).sum()) + m.weight.numel() / 8
    return b


def write_doc(out: Path, doc: str) -> None:
    """The doc: a common header, then the latest section of every setting run so far (each
    section is kept in ``OUTPUT/section-KIND.md`` with the command and date that produced it)."""
    lines = [
        "# LoRA error correction on SmolLM2-135M", "",
        "- Each section names the command that produced it (`benchmarks/lora_correction_smollm2.py`); the "
        "page is rebuilt from the latest run of each setting.",
        "- Evaluation: WikiText-2 test, first N windows of 512 tokens, float32; KL = mean per-token "
        "KL(dense || model), top-512. Gap recovered = (ppl compressed - ppl corrected) / (ppl compressed - "
        "ppl dense).",
        "- Closed form: calibration windows of Brown (never WikiText-2). Training: KL distillation to the dense "
        "model (top-512 teacher cache), batch 1, AdamW, cosine schedule, only the LoRA factors train.",
        "- Deployable size: sparse linears as 16-bit non-zeros + 1-bit mask; quantized linears at the level "
        "database's bytes per weight (codes + group scales/zeros); embeddings and norms at 16 bits. Adapters in "
        "float16 (`save_correction` default).", "",
    ]
    order = ["section-sparsity", "section-sparsity-evopress", "section-quantization"]

    def key(f):  # a --section run's page follows the main section it extends (longest matching name)
        main = max((o for o in order if f.stem == o or f.stem.startswith(o + "-")), key=len, default=None)
        return (order.index(main) if main else len(order), f.stem != main, f.name)

    for f in [*sorted(out.glob("section-*.md"), key=key), out / "notes.md"]:
        if f.is_file():
            text = f.read_text().rstrip()
            main = key(f)[0] < len(order) and max((o for o in order if f.stem.startswith(o)), key=len)
            if main and f.stem != main and text.startswith("## "):  # name the extra run in its heading
                head, _, rest = text.partition("\n")
                suffix = f.stem.split("-", 2)[2]  # section-KIND-SUFFIX
                text = f"{head}, run `--section {suffix}`\n{rest}"
            lines += [text, ""]
    if doc:
        Path(doc).write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--sparse-model", default=None, help="a saved sparse model instead of uniform SparseGPT")
    p.add_argument("--sparsity-profile", default=None,
                   help="a sparsity search's result.json: its EvoPress levels, read from --sparsity-database")
    p.add_argument("--sparsity-database", default=None, help="the sparsity level database of --sparsity-profile")
    p.add_argument("--bits", type=float, default=2.5)
    p.add_argument("--database", default=str(Path.home() / ".cache/optimum_evo/databases/quantization-de9858ad40a058d2"))
    p.add_argument("--profile", default=None, help="JSON {module: bits} (or a result.json with 'levels')")
    p.add_argument("--quantizer", choices=["database", "rtn"], default="database",
                   help="weights of the profile: the database's GPTQ levels or round-to-nearest")
    p.add_argument("--only", choices=["sparsity", "quantization"], default=None)
    p.add_argument("--rank", type=int, default=32, help="largest rank of any module")
    p.add_argument("--budget", type=float, default=0.045,
                   help="adapter size (float16) as a fraction of the compressed model's deployable size")
    p.add_argument("--rank-pattern", default=None, help='JSON, e.g. {"down_proj": 16}')
    p.add_argument("--calibration", default="brown")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--train-samples", type=int, default=128)
    p.add_argument("--train-seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ablations", default="svd,compressed", help="extra closed-form rows: svd, compressed (uniform rank), compressed-budget (budget-allocated "
                        "ranks), auto (inputs chosen by held-out calibration KL)")
    p.add_argument("--doc-only", action="store_true", help="rebuild --doc from the sections in --output and exit")
    p.add_argument("--section", default="",
                   help="suffix of this run's section file (OUTPUT/section-KIND-SUFFIX.md), so that a run with other "
                        "settings adds a section instead of replacing the setting's main one")
    p.add_argument("--train-from", choices=["dense", "compressed"], default="dense",
                   help="closed form the distillation starts from (and the saved adapter): EoRA on dense or on "
                        "compressed inputs, budget-allocated ranks")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--output", default="outputs/bench-lora")
    p.add_argument("--doc", default="docs/benchmarks/lora-correction.md")
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    command = command_line(__file__, argv)
    out = Path(ns.output)
    if ns.doc_only:
        write_doc(out, ns.doc)
        return 0
    path = resolve_model(ns.model)
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calib = calibration_windows(ns.calibration, tok, ns.calib_samples, ns.calib_seq_len, seed=0)
    train_ids = calibration_windows(ns.calibration, tok, ns.train_samples, ns.train_seq_len, seed=1)
    eval_ids = evaluation_windows("wikitext2", tok, 512, ns.eval_windows)
    eval_teacher = TeacherCache.build(dense, eval_ids, "topk", 512, progress=False)
    rank_pattern = json.loads(ns.rank_pattern) if ns.rank_pattern else None
    ablations = [a for a in ns.ablations.split(",") if a]

    def ev(model, desc):
        model = getattr(model, "get_base_model", lambda: model)()  # LoRA layers live inside the base model
        r = evaluate(model, eval_ids, eval_teacher, desc=desc)
        print(f"{desc}: ppl {r['perplexity']:.2f} kl {r['kl']:.4f}", flush=True)
        return r

    dense_row = ev(dense, "dense")
    out.mkdir(parents=True, exist_ok=True)
    settings = [k for k in ("sparsity", "quantization") if ns.only in (None, k)]
    for kind in settings:
        t0 = time.perf_counter()
        if kind == "sparsity":
            cache = out / f"sparse-{ns.sparsity}" / "model"
            if ns.sparsity_profile:
                comp, source = profile_model(dense, "sparsity", ns.sparsity_database, ns.sparsity_profile)
            elif ns.sparse_model:
                comp = AutoModelForCausalLM.from_pretrained(ns.sparse_model, dtype=torch.float32).eval()
                source = ns.sparse_model
            elif (cache / "config.json").is_file():
                comp = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval()
                source = f"uniform SparseGPT (cached in {cache})"
            else:
                comp = sparsify(dense, calib, ns.sparsity)
                comp.save_pretrained(cache)
                tok.save_pretrained(cache)
                source = "uniform SparseGPT"
            linear_bytes = sparse_linear_bytes(comp)
            label = f"{ns.sparsity:.0%} sparsity ({source})"
        else:
            comp, desc, linear_bytes, source = quantize(dense, ns.database, ns.bits, ns.profile, ns.quantizer)
            label = f"{desc['average_bits']:.2f} average bits ({source}; {desc['bits']} layers per bit width)"
        model_bytes = deployable_bytes(comp, linear_bytes)
        rows = {"dense": dense_row, "compressed": ev(comp, f"{kind} compressed")}
        budget = int(ns.budget * model_bytes / 2)  # float16 adapter parameters
        timing, variants, notes = {}, {}, []
        t = time.perf_counter()
        full = closed_form_adapters(comp, dense, calib, rank=ns.rank, rank_pattern=rank_pattern, method="eora")
        timing["EoRA statistics + SVDs"] = time.perf_counter() - t
        per_rank = sum(a.A.shape[1] + a.B.shape[0] for a in full.values())
        uniform = max(1, min(ns.rank, budget // per_rank))
        variants[f"EoRA, budget-allocated ranks <= {ns.rank}"] = allocate_ranks(full, budget)
        variants[f"EoRA, uniform rank {uniform}"] = {n: a.truncate(uniform) for n, a in full.items()}
        if "svd" in ablations:
            svd = closed_form_adapters(comp, dense, calib, rank=ns.rank, method="svd", progress=False)
            variants[f"plain SVD, budget-allocated ranks <= {ns.rank}"] = allocate_ranks(svd, budget)
        if "compressed" in ablations:
            t = time.perf_counter()
            variants[f"EoRA on compressed inputs, uniform rank {uniform}"] = closed_form_adapters(
                comp, dense, calib, rank=uniform, method="eora", inputs="compressed")
            timing["compressed-inputs walk"] = time.perf_counter() - t
        if "compressed-budget" in ablations or ns.train_from == "compressed":
            t = time.perf_counter()
            variants[f"EoRA on compressed inputs, budget-allocated ranks <= {ns.rank}"] = closed_form_adapters(
                comp, dense, calib, rank=ns.rank, rank_pattern=rank_pattern, method="eora", inputs="compressed",
                param_budget=budget, dense_allocation=variants[f"EoRA, budget-allocated ranks <= {ns.rank}"])
            timing["compressed-inputs walk (budget ranks)"] = time.perf_counter() - t
        if "auto" in ablations:
            t = time.perf_counter()
            chosen, ads, scores = select_inputs(comp, dense, calib, rank=ns.rank, rank_pattern=rank_pattern,
                                                method="eora", param_budget=budget)
            variants[f"EoRA, inputs='auto' (chose {chosen}), budget-allocated ranks <= {ns.rank}"] = ads
            selection = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "held_out_windows")
            notes.append(f"inputs='auto': held-out calibration KL ({scores['held_out_windows']} of "
                         f"{ns.calib_samples} windows) {selection}; chose {chosen}.")
            timing["inputs='auto' selection"] = time.perf_counter() - t
        sizes = {}
        for name, ads in variants.items():
            rows[name] = ev(attach_adapters(copy.deepcopy(comp), ads), f"{kind} {name}")
            sizes[name] = adapter_parameters(ads)
        best_name = f"EoRA{' on compressed inputs' if ns.train_from == 'compressed' else ''}, budget-allocated " \
                    f"ranks <= {ns.rank}"
        best_ads = variants[best_name]
        saved = None
        if ns.train_steps:
            t = time.perf_counter()
            student = attach_adapters(copy.deepcopy(comp), best_ads)
            teacher = TeacherCache.build(dense, train_ids, "topk", 512)
            distill(student, train_ids, teacher, max_steps=ns.train_steps, learning_rate=ns.lr, logging_steps=10)
            timing["training"] = time.perf_counter() - t
            name = f"{best_name} + KL distillation ({ns.train_steps} steps)"
            rows[name] = ev(student, f"{kind} trained")
            sizes[name] = sizes[best_name]
            folder = out / f"{kind}-model"
            comp.save_pretrained(folder)
            tok.save_pretrained(folder)
            saved = save_correction(student, folder, metadata={"benchmark": kind, "rank": ns.rank})
            del teacher
        saved_bytes = json.loads((saved / "evopress_correction.json").read_text())["adapter_bytes"] if saved else None
        gap = rows["compressed"]["perplexity"] - dense_row["perplexity"]
        table = ["| model | WikiText-2 ppl | KL | gap recovered | adapter params | adapter size / model |",
                 "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            rec = "" if name in ("dense", "compressed") else \
                f"{(rows['compressed']['perplexity'] - r['perplexity']) / gap:.1%}"
            size = f"{sizes[name] / 1e6:.2f}M | {2 * sizes[name] / model_bytes:.2%}" if name in sizes else " | "
            table.append(f"| {name} | {r['perplexity']:.2f} | {r['kl']:.4f} | {rec} | {size} |")
        ranks = [a.rank for a in best_ads.values()]
        section = [
            f"## {label}", "",
            f"- Command: `{command}`", f"- Date: {datetime.date.today().isoformat()}; machine: {machine()}; "
            f"{ns.eval_windows} evaluation windows; closed form on {ns.calib_samples} x {ns.calib_seq_len} tokens; "
            f"training {ns.train_steps} steps on {ns.train_samples} x {ns.train_seq_len} tokens, lr {ns.lr}.", "",
            f"Compressed model deployable size {model_bytes / 1e6:.1f} MB (compressed linears {linear_bytes / 1e6:.1f} "
            f"MB, other weights at 16 bits). Adapter budget {ns.budget:.1%} of it = {budget / 1e6:.2f}M float16 "
            f"parameters; budget-allocated ranks: {len(ranks)} of {len(full)} linears corrected, rank min "
            f"{min(ranks)} / median {sorted(ranks)[len(ranks) // 2]} / max {max(ranks)}"
            + (f"; saved adapter file {saved_bytes / 1e6:.2f} MB ({saved})" if saved_bytes else "") + ".", "",
            *table, "", *[f"- {n}" for n in notes], *([""] if notes else []),
            "Times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items())
            + f"; section total {time.perf_counter() - t0:.0f} s.", "",
        ]
        (out / f"section-{kind}{'-' + ns.section if ns.section else ''}.md").write_text("\n".join(section) + "\n")
        write_doc(out, ns.doc)
        print("\n".join(table), flush=True)
        del comp
    write_doc(out, ns.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
