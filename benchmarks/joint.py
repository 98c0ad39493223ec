"""Joint search benchmark: depth + bit widths under one size or speed budget vs the single kinds.

For each budget, in one run of this script:

* ``Bbits`` (a size budget): the stored size of the EvoPress quantization model at ``B`` average bits
  (its checkpoint's tensor bytes), or of the uniform ``B``-bit model when that is larger (packing
  makes bytes not quite linear in bits), so both fit. Runs quantization-only EvoPress at ``B`` bits
  (with its uniform, DP and random baselines), then joint depth + quantization EvoPress at that size
  (with uniform levels, DP, ShortGPT drops + uniform levels and random joint candidates as
  baselines), the joint search seeded with the quantization-only result (``init_from``), and, as
  its control at equal search work, the quantization-only search continued from its own result for
  the same generations. Depth-only and sparsity-only cannot reach such sizes; the page says what
  they would need.
* ``Xx`` (a speed budget): decode ``X`` times faster than dense on this machine (latency table).
  Runs joint depth + quantization EvoPress, quantization-only EvoPress under the same speed budget,
  and depth-only EvoPress at the fewest sub-blocks that the latency table says reach ``X``; then
  the joint search seeded with the better of the single-kind results and, as its control at equal
  search work, that single-kind search continued from its own result for the same generations;
  then times one decode step of every saved model and of the dense one side by side.

Every search uses the same calibration, fitness, preset and generations; the size-budget
quantization-only searches give every linear its own width (``fused_groups=False``), as the joint
search does; the speed-budget one keeps the default, one width per fused group (q/k/v, gate/up),
which only narrows its own space. ``--no-controls`` skips the seeded searches and their controls.
``--kinds`` names the kinds of the size budgets' joint searches (e.g. adding ``sparse-quantization``);
the depth + quantization joint search then joins the table. Writes
``docs/benchmarks/joint.md`` (a section per model; finished runs are reused when the script runs
again with the same output folder).

Usage::

    python benchmarks/joint.py --model smollm2 --budgets 2.5bits 3bits 1.5x --generations 40 \\
        --num-samples 64 --threads 2 --output outputs/bench-joint
"""

from __future__ import annotations

import argparse
import importlib
import datetime
import json
import math
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from depth_smollm2 import machine  # noqa: E402
from doc_sections import command_line  # noqa: E402

from optimum_evo.pipeline import SearchArguments, run_search  # noqa: E402

MARK_START, MARK_END = "<!-- tables:start -->", "<!-- tables:end -->"


def tensor_bytes(path: Path) -> int:
    """Bytes of the tensors of a safetensors file (without its header)."""
    total = 0
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            total += t.numel() * t.element_size()
    return total


def uniform_bytes(model: str, quant: dict, bits: int) -> int:
    """Stored bytes of the model whose every searched linear is at ``bits`` (the joint search's
    accounting, on the quantization-only run's database)."""
    from optimum_evo.compressors.database import LevelDatabase
    from optimum_evo.loading import load_model
    from optimum_evo.methods.joint import CostModel

    db = LevelDatabase.open(quant["database"]["path"], verify=False)
    costs = CostModel(load_model(model, torch.float32), ["quantization"], {"quantization": db}, ("bytes", 0))
    return costs.fixed_bytes + sum(b[[lv for _, lv in o].index(bits)] for o, b in zip(costs.options, costs.option_bytes))


def size_notes(model: str, size: int, label: str) -> str:
    """What depth-only and sparsity-only models of ``size`` bytes would need."""
    from optimum_evo.decoder import find_decoder_layout
    from optimum_evo.loading import load_model
    from optimum_evo.methods.joint import stored_bytes

    m = load_model(model, torch.float32)
    layout = find_decoder_layout(m)
    dense = stored_bytes(list(m.state_dict().values()))
    blocks = sum(stored_bytes(list(layer.state_dict().values())) for layer in layout.layers)
    linears = [mod for layer in layout.layers for mod in layer.modules() if isinstance(mod, torch.nn.Linear)]
    numel = sum(x.weight.numel() for x in linears)
    linear_bytes = sum(x.weight.numel() * 4 for x in linears)
    room = size - (dense - blocks)  # what the decoder blocks may take
    depth = 1 - room / blocks
    per_weight = (room - (blocks - linear_bytes)) / numel  # bytes per linear weight: a 1/8 mask + 4-byte values
    sparsity = 1 - (per_weight - 1 / 8) / 4
    return (f"At {label}, a depth-only model would drop {depth:.0%} of the decoder blocks' bytes and a "
            f"sparsity-only one would prune {sparsity:.0%} of every linear (a stored 1-bit mask plus the kept "
            "float32 values): neither is a useful model, so neither is searched.")


def search(ns, name: str, **settings) -> dict:
    """One search (reused when its result.json exists) in ``OUTPUT/<model>/<name>``."""
    out = Path(ns.output) / Path(ns.model).name / name
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    args = SearchArguments(model=ns.model, preset=ns.preset, generations=ns.generations, num_samples=ns.num_samples,
                           seq_len=ns.seq_len, eval_windows=ns.eval_windows, output_dir=str(out),
                           compare_baselines=True, random_candidates=ns.random_candidates,
                           structure_moves=ns.structure_moves, **settings)
    print(f"== {name}", flush=True)
    return run_search(args)


def try_search(ns, name: str, **settings):
    """`search`, or the reason the budget cannot be met (``str``)."""
    try:
        return search(ns, name, **settings)
    except ValueError as e:
        print(f"== {name}: {e}", flush=True)
        return str(e)


def depth_fraction_for(report: dict, speedup: float) -> float:
    """The fewest dropped sub-blocks (as many attention as MLP) that the joint run's latency table
    predicts reach ``speedup``: dropping both sub-blocks of a layer saves everything the table
    charges per layer (its overheads, attention over the cache and dense linears), as in the joint
    search's own cost model."""
    table = json.loads(Path(report["latency_table"]).read_text())
    n = report["num_layers"]
    dense = report["latency"]["predicted_dense_ms"] * 1e6
    pair = (dense - table["fixed_ns"]) / n
    k = math.ceil((dense - dense / speedup) / pair)
    return min(0.99, k / n)


def decode_speeds(folders: dict, model: str, threads: int | None) -> dict:
    """Median decode-step time of every saved model and of the dense one, measured in one process in
    interleaved rounds (a load that comes and goes hits every model alike)."""
    importlib.import_module("optimum_evo")  # registers the EvoPress quantizer with transformers
    from transformers import AutoModelForCausalLM

    from optimum_evo.loading import load_model
    from optimum_evo.methods.joint import _decode_ns_each

    models = {"dense": (load_model(model, torch.float32), None)}
    models.update({name: (AutoModelForCausalLM.from_pretrained(folder), None) for name, folder in folders.items()})
    times = _decode_ns_each(models, 128, repeats=7)
    return {k: {"ms": v / 1e6, "speedup": times["dense"] / v} for k, v in times.items()}


def rows(report: dict, label: str, size: bool) -> list:
    out = []
    for name, r in report["results"].items():
        if name == "dense":
            continue
        budget = f"{r['size_bytes'] / 1e6:.2f} MB" if "size_bytes" in r else (
            f"{r['average_bits']:.2f} bits" if "average_bits" in r else f"{r.get('dropped_sub_blocks', 0)} dropped")
        if not size and "predicted_speedup" in r:
            budget = f"{r['predicted_speedup']:.2f}x predicted"
        out.append((label, name, r["perplexity"], r.get("kl", 0.0), budget))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--budgets", nargs="*", default=["2.5bits", "3bits", "1.5x"])
    p.add_argument("--levels", default="2,3,4,5,6,8")
    p.add_argument("--preset", default="fast")
    p.add_argument("--generations", type=int, default=40)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--random-candidates", type=int, default=8)
    p.add_argument("--output", default="outputs/bench-joint")
    p.add_argument("--doc", default="docs/benchmarks/joint.md")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 when other jobs share the cores)")
    p.add_argument("--structure-moves", choices=("uniform", "adaptive"), default="uniform",
                   help="how the joint searches draw structural moves (the setting of the same name)")
    p.add_argument("--kinds", default="depth,quantization",
                   help="the kinds of the joint searches of the size budgets, comma-separated (e.g. "
                        "depth,quantization,sparse-quantization); other than the default, the table also shows the "
                        "default joint search (depth + quantization) and the section is named after the kinds")
    p.add_argument("--no-plain", dest="plain", action="store_false",
                   help="with --kinds: skip the depth + quantization joint search in the table")
    p.add_argument("--no-controls", dest="controls", action="store_false",
                   help="skip the seeded joint search and its control (the single-kind search continued)")
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    command = command_line(__file__, argv)
    levels = [int(x) for x in ns.levels.split(",")]
    kinds = [k.strip() for k in ns.kinds.split(",") if k.strip()]
    default_kinds = kinds == ["depth", "quantization"]
    tag = "" if default_kinds else "+".join(kinds) + "-"
    table, notes, speed_folders = [], [], {}
    dense_ppl = None
    for budget in ns.budgets:
        if budget.endswith("bits"):
            bits = float(budget[:-4])
            # per-linear widths, as in the joint search (whose linears are units of their own)
            quant = search(ns, f"quantization-{bits}", compression="quantization", target=bits, levels=levels,
                           fused_groups=False)
            quant_dir = str(Path(quant["saved_model"]["path"]).parent)
            # the larger of the quantization-only result's stored bytes and the uniform model's: both fit
            size = max(tensor_bytes(Path(quant["saved_model"]["path"]) / "model.safetensors"),
                       uniform_bytes(ns.model, quant, bits) if bits in levels else 0)
            joint = search(ns, f"joint-{tag}{bits}bits", compression=kinds, target_size=size, levels=levels)
            plain = None if default_kinds or not ns.plain else search(
                ns, f"joint-{bits}bits", compression=["depth", "quantization"], target_size=size, levels=levels)
            if ns.controls:
                seeded = search(ns, f"joint-{tag}{bits}bits-seeded", compression=kinds, target_size=size,
                                levels=levels, init_from=quant_dir)
                continued = search(ns, f"quantization-{bits}-continued", compression="quantization", target=bits,
                                   levels=levels, fused_groups=False, init_from=quant_dir)
            dense_ppl = quant["results"]["dense"]["perplexity"]
            label = f"{bits:g} bits = {size / 1e6:.2f} MB"
            table += rows(joint, label, True)
            if plain is not None:
                table += [(label, f"depth+quantization {n}", ppl, kl, b) for _, n, ppl, kl, b in rows(plain, label, True)
                          if n == "evopress"]
            if ns.controls:
                table += [(label, f"seeded {n}", ppl, kl, b) for _, n, ppl, kl, b in rows(seeded, label, True)
                          if n in ("evopress", "init_from")]
            table += [(label, f"quantization-only {n}", ppl, kl, b) for _, n, ppl, kl, b in rows(quant, label, True)]
            if ns.controls:
                table += [(label, "quantization-only evopress, continued", ppl, kl, b)
                          for _, n, ppl, kl, b in rows(continued, label, True) if n == "evopress"]
            notes.append(size_notes(ns.model, size, label))
        elif budget.endswith("x"):
            speedup = float(budget[:-1])
            joint = search(ns, f"joint-{speedup}x", compression=["depth", "quantization"], target_speedup=speedup,
                           levels=levels)
            quant = try_search(ns, f"quantization-{speedup}x", compression="quantization", target_speedup=speedup,
                               levels=levels)
            fraction = depth_fraction_for(joint, speedup)
            depth = search(ns, f"depth-{speedup}x", compression="depth", target=fraction)
            dense_ppl = joint["results"]["dense"]["perplexity"]
            label = f"{speedup:g}x decode"
            table += rows(joint, label, False)
            table += [(label, f"depth-only {n}", ppl, kl, b) for _, n, ppl, kl, b in rows(depth, label, False)]
            speed_folders.update({f"{label}: joint": joint["saved_model"]["path"],
                                  f"{label}: depth-only ({fraction:.0%} of sub-blocks)": depth["saved_model"]["path"]})
            if isinstance(quant, str):
                notes.append(f"At {label}, quantization alone cannot meet the budget: {quant}")
            else:
                table += [(label, f"quantization-only {n}", ppl, kl, b) for _, n, ppl, kl, b in
                          rows(quant, label, False)]
                speed_folders[f"{label}: quantization-only"] = quant["saved_model"]["path"]
            if not ns.controls:
                continue
            # equal search work: the joint search seeded with the best single-kind result, against
            # that single-kind search continued from its own result for the same generations
            singles = {"depth": (depth, {"target": fraction})}
            if not isinstance(quant, str):
                singles["quantization"] = (quant, {"target_speedup": speedup, "levels": levels})
            kind = min(singles, key=lambda k: singles[k][0]["results"]["evopress"]["perplexity"])
            best, settings = singles[kind]
            best_dir = str(Path(best["saved_model"]["path"]).parent)
            seeded = search(ns, f"joint-{speedup}x-seeded", compression=["depth", "quantization"],
                            target_speedup=speedup, levels=levels, init_from=best_dir)
            continued = search(ns, f"{kind}-{speedup}x-continued", compression=kind, init_from=best_dir, **settings)
            table += [(label, f"seeded {n}", ppl, kl, b) for _, n, ppl, kl, b in rows(seeded, label, False)
                      if n in ("evopress", "init_from")]
            table += [(label, f"{kind}-only evopress, continued", ppl, kl, b)
                      for _, n, ppl, kl, b in rows(continued, label, False) if n == "evopress"]
            speed_folders[f"{label}: seeded joint"] = seeded["saved_model"]["path"]
    speeds = decode_speeds(speed_folders, ns.model, ns.threads) if speed_folders else {}
    write_doc(Path(ns.doc), ns, command, table, speeds, dense_ppl, notes)
    return 0


def write_doc(doc: Path, ns, command: str, table: list, speeds: dict, dense_ppl, notes: list) -> None:
    """Write this run's sections of ``doc``: ``## MODEL`` for the size budgets and ``## MODEL, speed
    budgets`` for the speed budgets. Sections of other models, or of the budget kind this run did
    not measure, are kept as they are."""
    name = Path(ns.model).name
    head_lines = [f"- Command: `{command}`; {datetime.date.today().isoformat()}; {machine()}; torch threads "
                  f"{ns.threads or 'default'}.",
                  f"- Calibration {ns.num_samples} x {ns.seq_len} tokens of `brown`; preset `{ns.preset}` with "
                  f"{ns.generations} generations for every search; WikiText-2 test, {ns.eval_windows} windows of "
                  f"512 tokens (dense perplexity {dense_ppl:.2f}).", ""]
    best = {}
    for label, model, ppl, kl, b in table:
        best[label] = min(best.get(label, math.inf), ppl)
    written = {}
    kinds = "" if ns.kinds == "depth,quantization" else ", " + " + ".join(ns.kinds.split(","))
    for title, is_speed in ((f"## {name}{kinds}", False), (f"## {name}, speed budgets", True)):
        part = [row for row in table if row[0].endswith(" decode") == is_speed]
        if not part:
            continue
        lines = [title, "", *head_lines, "| budget | model | WikiText-2 ppl | KL | size / speed |",
                 "|---|---|---|---|---|"]
        for label, model, ppl, kl, b in part:
            text = f"**{ppl:.2f}**" if ppl == best[label] else f"{ppl:.2f}"
            lines.append(f"| {label} | {model} | {text} | {kl:.4f} | {b} |")
        if is_speed and speeds:
            lines += ["", "Measured decode step (one token after 128, median of 7 x 8 steps, float32, in one "
                      "process, the models sampled in interleaved rounds):", "", "| model | ms per token | vs dense |", "|---|---|---|"]
            lines += [f"| {k} | {v['ms']:.1f} | {v['speedup']:.2f}x |" for k, v in speeds.items()]
        mine = [n for n in notes if (" decode" in n.split(",")[0]) == is_speed]
        lines += [""] + [f"- {n}" for n in mine] + ([""] if mine else [])
        written[title] = lines
    text = doc.read_text() if doc.exists() else f"# Joint search benchmark\n\n{MARK_START}\n{MARK_END}\n"
    head, _, rest = text.partition(MARK_START)
    tables, _, tail = rest.partition(MARK_END)
    sections = {}
    current = None
    for line in tables.strip("\n").splitlines():
        if line.startswith("## "):
            current = line
            sections[current] = []
        if current is not None:
            sections[current].append(line)
    sections.update(written)
    body = "\n".join("\n".join(v).rstrip() + "\n" for _, v in sorted(sections.items()))
    doc.write_text(f"{head}{MARK_START}\n\n{body}\n{MARK_END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
