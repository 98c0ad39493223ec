"""Command line: ``optimum-evo search ...`` and ``optimum-evo model-path NAME``.

Examples::

    optimum-evo search --model smollm2 --compression depth --target 0.25 --output out/depth
    optimum-evo model-path gemma3
    python -m optimum_evo search --model ./my-model --target 0.2 --preset paper --output out
"""

from __future__ import annotations

import argparse
import logging
import sys

from .data import BUILTIN_TEXTS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-evo", description="EvoPress evolutionary dynamic compression.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="search per-unit compression levels, compress, evaluate and save")
    add_search_arguments(s)

    p = sub.add_parser("model-path", help="print the local folder of an embedded model (converted on first use)")
    p.add_argument("name", nargs="?", default="smollm2", help="smollm2 (default) or gemma3")
    return parser


def add_search_arguments(s: argparse.ArgumentParser) -> None:
    """Options shared by ``optimum-evo search`` and ``optimum-cli evopress``."""
    s.add_argument("--model", default="smollm2", help="embedded name (smollm2, gemma3), local folder or Hub id")
    s.add_argument("--compression", default="depth", help="depth, sparsity or quantization")
    s.add_argument("--target", type=float, default=0.25,
                   help="depth: fraction of sub-blocks to drop; sparsity: fraction of weights; quantization: average bits")
    s.add_argument("--output", "--output-dir", dest="output_dir", required=True, help="output folder")
    s.add_argument("--mode", default="separate", choices=["separate", "block"], help="depth units")
    s.add_argument("--preset", default="fast", help="fast (CPU), paper or superfast")
    s.add_argument("--generations", type=int, default=None, help="override the preset's generations")
    s.add_argument("--offspring", type=int, default=None, help="override the preset's offspring")
    s.add_argument("--confirm-tokens", type=int, default=None,
                   help="re-score a child that beat the parent on this many fresh tokens before accepting it")
    s.add_argument("--calibration", default="brown",
                   help=f"built-in text ({', '.join(k for k in BUILTIN_TEXTS if k != 'wikitext2')}), text file or dataset")
    s.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    s.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    s.add_argument("--fitness", default="topk", choices=["topk", "full"], help="teacher cache mode")
    s.add_argument("--top-k", type=int, default=512, help="K of the top-K KL")
    s.add_argument("--evaluation", default="wikitext2", help="evaluation text")
    s.add_argument("--eval-windows", type=int, default=40, help="evaluation windows (0 = whole text)")
    s.add_argument("--eval-seq-len", type=int, default=512)
    s.add_argument("--init", default="baselines", choices=["baselines", "random"], help="initial parent")
    s.add_argument("--random-candidates", type=int, default=16)
    s.add_argument("--compare-baselines", action="store_true", help="also evaluate the baselines")
    s.add_argument("--search-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    s.add_argument("--eval-dtype", default="float32", choices=["float32", "bfloat16"])
    s.add_argument("--no-prefix-reuse", dest="reuse_prefix", action="store_false")
    s.add_argument("--levels", default=None, help="quantization bit widths, comma-separated (default 2,3,4,5,6,8)")
    s.add_argument("--group-size", type=int, default=128, help="GPTQ group size (0 = per row)")
    s.add_argument("--sparsity-step", type=float, default=0.05,
                   help="sparsity level spacing, as a fraction of the median linear's weights")
    s.add_argument("--max-offset", type=int, default=5, help="sparsity levels either side of the target")
    s.add_argument("--database-dir", default=None, help="level database folder (default: a shared cache)")
    s.add_argument("--no-save-model", dest="save_model", action="store_false")
    s.add_argument("--lora-correction", type=int, default=0, metavar="RANK",
                   help="after a sparsity/quantization search, add LoRA error-correction adapters of this rank "
                        "(saved in OUTPUT/model/lora-correction; 0 = none)")
    s.add_argument("--lora-method", default="eora", choices=["eora", "svd"], help="closed-form correction method")
    s.add_argument("--lora-inputs", default="dense", choices=["dense", "compressed", "auto"],
                   help="activation statistics of the dense or the compressed model, or auto: both, keep the one "
                        "with the lower KL on held-out calibration windows")
    s.add_argument("--lora-train-steps", type=int, default=0,
                   help="KL-distillation steps after the closed form (0 = closed form only)")
    s.add_argument("--lora-learning-rate", type=float, default=5e-4)
    s.add_argument("--lora-param-budget", type=int, default=None, metavar="N",
                   help="total adapter parameters, allocated where they remove the most error (ranks <= RANK)")
    s.add_argument("--export", action="append", default=[], choices=["dense", "gptq", "compressed-tensors"],
                   help="also write the result in a format that loads without optimum-evo, in OUTPUT/export-FORMAT "
                        "(repeatable; gptq / compressed-tensors need --compression quantization)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def arguments_from_namespace(ns: argparse.Namespace):
    from .pipeline import SearchArguments

    return SearchArguments(
        model=ns.model, compression=ns.compression, target=ns.target, output_dir=ns.output_dir, mode=ns.mode,
        preset=ns.preset, generations=ns.generations, offspring=ns.offspring, confirm_tokens=ns.confirm_tokens, calibration=ns.calibration,
        num_samples=ns.num_samples, seq_len=ns.seq_len, fitness=ns.fitness, top_k=ns.top_k,
        evaluation=ns.evaluation, eval_windows=ns.eval_windows or None, eval_seq_len=ns.eval_seq_len,
        init=ns.init, random_candidates=ns.random_candidates, compare_baselines=ns.compare_baselines,
        search_dtype=ns.search_dtype, eval_dtype=ns.eval_dtype, reuse_prefix=ns.reuse_prefix,
        levels=_int_list(ns.levels), group_size=ns.group_size, sparsity_step=ns.sparsity_step,
        max_offset=ns.max_offset, database_dir=ns.database_dir,
        save_model=ns.save_model, seed=ns.seed, progress=not ns.quiet,
        lora_correction=ns.lora_correction, lora_method=ns.lora_method, lora_inputs=ns.lora_inputs,
        lora_train_steps=ns.lora_train_steps, lora_learning_rate=ns.lora_learning_rate,
        lora_param_budget=ns.lora_param_budget,
    )


def _int_list(text):
    if text is None:
        return None
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError as e:
        raise ValueError(f"--levels must be comma-separated integers such as 2,3,4, got {text!r}.") from e


def run_search_command(ns: argparse.Namespace) -> int:
    from .pipeline import format_table, run_search

    args = arguments_from_namespace(ns)
    exports = list(dict.fromkeys(getattr(ns, "export", None) or []))
    if args.compression != "quantization" and set(exports) - {"dense"}:
        raise ValueError(f"--export {' / '.join(sorted(set(exports) - {'dense'}))} needs --compression quantization; "
                         f"export {args.compression} results with --export dense.")
    report = run_search(args)
    print(format_table(report))
    print(f"\nWrote {args.output_dir}/result.json, profile.png, fitness.png"
          + (f" and the compressed model in {args.output_dir}/model" if args.save_model else ""))
    if exports:
        from pathlib import Path

        from .integrations.exporters import export
        from .integrations.exporters.from_result import compressed_model_from_result

        model, tokenizer = compressed_model_from_result(report)
        for fmt in exports:
            summary = export(model, Path(args.output_dir) / f"export-{fmt}", fmt, tokenizer=tokenizer)
            print(f"Exported {fmt} to {summary['path']}")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "model-path":
            from .models import embedded_model_path

            print(embedded_model_path(ns.name))
            return 0
        return run_search_command(ns)
    except (ValueError, FileNotFoundError, NotImplementedError, KeyError, ImportError) as e:
        print(f"optimum-evo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
