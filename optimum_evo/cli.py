"""Command line: ``optimum-evo search | show | export | eval | model-path``.

| command | does |
|---|---|
| ``search [OUTPUT] [options]`` | search, compress, evaluate and save (``OUTPUT/model``, ``result.json``, plots) |
| ``show DIR`` | what a checkpoint or export holds: method, profile, sizes, metrics, what loads it |
| ``export DIR [OUTPUT] --format F`` | an EvoPress checkpoint -> a registered export format (plugin-free) |
| ``eval DIR [--tasks T,...]`` | perplexity / KL on WikiText-2 windows; lm-eval tasks through the ``evopress`` model |
| ``model-path [NAME]`` | the local folder of an embedded model |

The options of ``search`` (and of ``optimum-cli evopress``) are generated from the fields of
`optimum_evo.SearchArguments`: one option per setting, its help text, its group, its choices; the
compression methods and export formats are read from their registries, and so are the
``--format`` choices of ``export``. The output folder is positional, as in ``optimum-cli export``
(``--output`` / ``--output-dir`` still work). ``--push-to-hub REPO`` (``search``, ``export``) uploads
the result without local paths (`optimum_evo.integrations.hub.upload_folder`).

Examples:

    optimum-evo search out/depth --model smollm2 --compression depth --target 0.25
    optimum-evo search out/q -m ./my-llama --compression quantization --target 3 --sym --export gptq
    optimum-evo show out/q/model
    optimum-evo export out/q/model out/q-ct --format compressed-tensors --push-to-hub me/llama-evopress-ct
    optimum-evo eval out/q/model --tasks hellaswag,arc_easy
    optimum-evo model-path gemma3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
import warnings
from pathlib import Path

from .settings import SearchArguments, option_of, setting_fields

#: Earlier option names that still work (with a warning): setting -> old option.
RENAMED_OPTIONS = {"dataset": "--calibration", "eval_dataset": "--evaluation"}
GROUP_TITLES = {"model": "model and output", "compression": "what to compress", "search": "search",
                "calibration": "calibration and fitness", "evaluation": "evaluation",
                "correction": "LoRA error correction", "output": "what the run writes"}
#: The settings ``eval`` takes (same options, help and defaults as ``search``).
EVAL_SETTINGS = ("eval_dataset", "eval_windows", "eval_seq_len", "top_k")


class CommandError(ValueError):
    """A command cannot run as asked (the message names the fix)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-evo", description="EvoPress evolutionary dynamic compression.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="search per-unit compression levels, compress, evaluate and save")
    add_search_arguments(s)

    show = sub.add_parser("show", help="what an EvoPress checkpoint (or export) holds and what loads it")
    show.add_argument("path", metavar="DIR", help="a checkpoint folder (OUTPUT/model), an export, or a search's OUTPUT")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")

    add_export_arguments(sub.add_parser("export", help="write an EvoPress checkpoint in a format that loads without "
                                                       "the plugin"))
    add_eval_arguments(sub.add_parser("eval", help="evaluate an EvoPress checkpoint: perplexity and KL on held-out "
                                                   "text, and lm-eval tasks"))

    p = sub.add_parser("model-path", help="print the local folder of an embedded model (converted on first use)")
    p.add_argument("name", nargs="?", default="smollm2", help="smollm2 (default) or gemma3")
    return parser


def _base_type(annotation):
    """``int`` for ``Optional[int]``, ``list[int]`` stays ``list[int]``, ``Literal[...]`` -> ``str``."""
    if typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return str
    return annotation


class _Deprecated(argparse.Action):
    """A deprecated option string: stores into the current setting and warns."""

    def __init__(self, option_strings, dest, replacement, convert, **kwargs):
        self.replacement, self.convert = replacement, convert
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is deprecated; use {self.replacement}.", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, self.convert(values))


def _converter(name: str, kind, option):
    parse = option.parse or kind

    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: {e}") from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _add_setting(group, f, hints) -> None:
    """The option of one `SearchArguments` field (its flags, help, default, choices, parser)."""
    from .exporters import available_exporters
    from .methods import available_methods, get_method

    option = option_of(f.name)
    flags = list(option.flags) or [f"--{f.name.replace('_', '-')}"]
    help_text = f.metadata["help"]
    if f.name == "compression":
        help_text += "; one of: " + ", ".join(f"{m} ({get_method(m).target_help})" for m in available_methods())
    if f.name == "export":
        help_text += "; one of: " + ", ".join(available_exporters())
    base = _base_type(hints[f.name])
    if f.default is not None:
        help_text += f" (default: {f.default!r})"
    kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
    if base is bool and f.default is True:
        flag = option.negate or f"--no-{f.name.replace('_', '-')}"
        kwargs["help"] = f"turn off: {f.metadata['help']} (on by default)"
        group.add_argument(flag, action="store_false", **kwargs)
        return
    if base is bool:
        group.add_argument(*flags, action="store_true", **kwargs)
        return
    convert = _converter(f.name, base if base in (int, float, str) else str, option)
    if option.append:
        group.add_argument(*flags, action="append", type=convert, metavar=option.metavar, **kwargs)
        return
    group.add_argument(*flags, type=convert, choices=option.choices, metavar=option.metavar, **kwargs)
    if f.name in RENAMED_OPTIONS:
        group.add_argument(RENAMED_OPTIONS[f.name], action=_Deprecated, dest=f.name, default=argparse.SUPPRESS,
                           replacement=flags[-1], convert=convert, help=f"deprecated name of {flags[-1]}")


def _add_hub_arguments(parser) -> None:
    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument("--push-to-hub", metavar="REPO", default=None,
                     help="upload the result to this Hub repository (created if needed), without local paths")
    hub.add_argument("--private", action="store_true", default=None, help="create the repository private")
    hub.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``optimum-evo search`` and ``optimum-cli evopress``, one per setting of
    `SearchArguments` (defaults are the dataclass's; an option not given keeps it), the positional
    output folder and the Hub options."""
    hints = typing.get_type_hints(SearchArguments)
    parser.add_argument("output_positional", nargs="?", default=None, metavar="OUTPUT",
                        help="output folder (same as --output)")
    groups: dict = {}
    for f in setting_fields():
        option = option_of(f.name)
        if not option.cli:
            continue
        group = groups.get(option.group)
        if group is None:
            group = groups[option.group] = parser.add_argument_group(GROUP_TITLES.get(option.group, option.group))
        _add_setting(group, f, hints)
    _add_hub_arguments(parser)
    parser.epilog = ("The options are the fields of optimum_evo.SearchArguments (same names, same defaults); "
                     "the Hub options upload OUTPUT/model.")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``optimum-evo export`` (formats from the exporter registry)."""
    from .exporters import available_exporters, get_exporter

    parser.add_argument("path", metavar="DIR", help="the EvoPress checkpoint (OUTPUT/model of a search)")
    parser.add_argument("output_positional", nargs="?", default=None, metavar="OUTPUT", help="output folder")
    parser.add_argument("--output", "--output-dir", dest="output_dir", default=None, help="output folder (as OUTPUT)")
    parser.add_argument("--format", "-f", required=True, choices=available_exporters(), dest="format",
                        help="; ".join(f"{name}: {get_exporter(name).description}" for name in available_exporters()))
    _add_hub_arguments(parser)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``optimum-evo eval`` (the evaluation settings are `SearchArguments` fields)."""
    parser.add_argument("path", metavar="DIR", help="the EvoPress checkpoint folder (OUTPUT/model of a search)")
    hints = typing.get_type_hints(SearchArguments)
    text = parser.add_argument_group("perplexity and KL on held-out text")
    fields = {f.name: f for f in setting_fields()}
    for name in EVAL_SETTINGS:
        _add_setting(text, fields[name], hints)
    text.add_argument("--base-model", default=None, metavar="MODEL",
                      help="the dense model for the KL (default: the base model the checkpoint records, when it is "
                           "found here)")
    tasks = parser.add_argument_group("lm-eval tasks (pip install optimum-evo[lm-eval])")
    tasks.add_argument("--tasks", default=None, metavar="T1,T2", help="lm-eval task names, comma-separated")
    tasks.add_argument("--include-path", default=None, metavar="DIR", help="folder of your own lm-eval task YAML files")
    tasks.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task")
    tasks.add_argument("--limit", type=float, default=None, help="examples per task (a number, or a fraction < 1)")
    tasks.add_argument("--batch-size", default=1, help="lm-eval batch size (a number or auto)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: a GPU when there is one)")
    parser.add_argument("--no-lora-correction", dest="lora_correction", action="store_false",
                        help="leave out the checkpoint's LoRA correction (lora-correction/)")
    parser.add_argument("--output", "--output-json", dest="output_json", default=None, metavar="FILE",
                        help="also write the results to this JSON file")


def _output(ns, flag: str = "--output") -> str | None:
    positional, option = getattr(ns, "output_positional", None), getattr(ns, "output_dir", None)
    if positional and option and Path(positional) != Path(option):
        raise CommandError(f"Two output folders: {positional} and {flag} {option}; give one.")
    return positional or option


def arguments_from_namespace(ns: argparse.Namespace) -> SearchArguments:
    """The `SearchArguments` of a parsed ``search`` command line."""
    names = {f.name for f in dataclasses.fields(SearchArguments)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    output = _output(ns)
    if output:
        values["output_dir"] = output
    return SearchArguments(**values)


def _hub_kwargs(ns) -> dict:
    return {"token": getattr(ns, "token", None), "private": getattr(ns, "private", None)}


def run_search_command(ns: argparse.Namespace) -> int:
    from .pipeline import format_table, run

    args = arguments_from_namespace(ns)  # validates everything, the export formats included
    if not args.output_dir:
        raise CommandError("--output is required (or the positional OUTPUT: optimum-evo search OUTPUT ...): the "
                           "folder for the compressed model, result.json and the plots.")
    push = getattr(ns, "push_to_hub", None)
    if push and not args.save_model:
        raise CommandError("--push-to-hub uploads OUTPUT/model: drop --no-save-model.")
    ctx = run(args)
    from .distributed import is_main

    if not is_main():  # another process of a multi-process run: process 0 reports (and pushes)
        return 0
    out = Path(args.output_dir)
    print(format_table(ctx.report))
    plots = [p for p in ("profile.png", "fitness.png") if (out / p).is_file()]
    print(f"\nWrote {out}/result.json" + "".join(f", {p}" for p in plots)
          + (f" and the compressed model in {out}/model" if args.save_model else ""))
    for fmt, summary in (ctx.report.get("exports") or {}).items():
        print(f"Exported {fmt} to {summary['path']}")
    if args.save_model and (out / "model" / "config.json").is_file():
        _finish_checkpoint_card(out / "model", out / "profile.png")
        for fmt, summary in (ctx.report.get("exports") or {}).items():
            _export_card(Path(summary["path"]), out / "model", fmt)
    if push:
        from .integrations.hub import upload_folder

        commit = upload_folder(out / "model", push, **_hub_kwargs(ns))
        url = getattr(commit, "commit_url", None)
        print(f"Pushed {out}/model to {push}" + (f" ({url})" if url else ""))
    return 0


def _record_of(folder: Path) -> dict | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    qc = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    from .record import QUANT_METHOD, upgrade_record

    return upgrade_record(qc) if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


def _finish_checkpoint_card(folder: Path, picture: Path) -> None:
    """Put the search's profile picture beside the checkpoint's card, and show it there."""
    from .card import write_card

    record = _record_of(folder)
    if record is not None and picture.is_file():
        write_card(folder, record, picture_from=picture)


def _export_card(export_dir: Path, checkpoint: Path, fmt: str, repo_id: str | None = None) -> None:
    from .card import write_export_card

    record = _record_of(checkpoint)
    if record is not None and (export_dir / "config.json").is_file():
        picture = checkpoint / "profile.png"
        write_export_card(export_dir, record, fmt, repo_id=repo_id, picture_from=picture if picture.is_file() else None)


# ---------------------------------------------------------------------------- show
def _checkpoint_folder(path: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise CommandError(f"{path} does not exist; give a checkpoint folder (the OUTPUT/model of a search).")
    if not (folder / "config.json").is_file() and (folder / "model" / "config.json").is_file():
        folder = folder / "model"  # a search's OUTPUT
    if not (folder / "config.json").is_file():
        raise CommandError(f"{path} holds no config.json: give a checkpoint folder (the OUTPUT/model of a search, or "
                           "a folder written by save_pretrained).")
    return folder


def _size(folder: Path) -> dict:
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"weights_bytes": weights, "total_bytes": total}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def checkpoint_summary(path) -> dict:
    """What ``path`` holds (`show`): kind, compression method, target, profile summary, sizes,
    metrics and how to load it. Reads only its files (no model is loaded)."""
    from .card import public_model_name, public_text_name, target_text
    from .correction.peft_io import ADAPTER_SUBFOLDER

    folder = _checkpoint_folder(str(path))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    record = _record_of(folder)
    out = {"path": str(folder), "architecture": (config.get("architectures") or ["?"])[0],
           "layers": config.get("num_hidden_layers"), **_size(folder)}
    if record is None:
        qc = config.get("quantization_config") or {}
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        out["kind"] = f"{method} checkpoint" if method else "plain transformers checkpoint"
        out["loads_with"] = ["transformers: AutoModelForCausalLM.from_pretrained (no plugin)"] + \
            (["gptqmodel: GPTQModel.load"] if method == "gptq" else [])
        out["lm_eval"] = f"lm_eval --model hf --model_args pretrained={folder}"
        return out
    from .exporters import available_exporters, get_exporter
    from .methods import get_method

    method = get_method(record["compression"])
    metrics = record.get("metrics") or {}
    adapter = (folder / ADAPTER_SUBFOLDER / "adapter_config.json").is_file()
    out.update({
        "kind": f"EvoPress checkpoint (format {record.get('format_version')})",
        "compression": method.name, "description": method.description,
        "target": target_text(record, method),
        "base_model": public_model_name(metrics.get("model")),
        "calibration": f"{public_text_name(record.get('dataset'))}, {record.get('num_samples')} x "
                       f"{record.get('seq_len')}",
        "profile": {k: v for k, v in method.summary(record.get("profile") or {}).items()},
        "metrics": {k: v for k, v in metrics.items() if k in ("search", "evaluation")},
        "lora_correction": str(folder / ADAPTER_SUBFOLDER) if adapter else None,
        "loads_with": ["transformers with the plugin: import optimum_evo; AutoModelForCausalLM.from_pretrained"]
        + (["peft: PeftModel.from_pretrained(model, DIR, subfolder='lora-correction')"] if adapter else []),
        "lm_eval": f"lm_eval --model evopress --model_args pretrained={folder}",
        "exports": [f for f in available_exporters() if get_exporter(f).refusal(method) is None],
    })
    return out


def _print_summary(summary: dict) -> None:
    print(f"{summary['path']}: {summary['kind']}, {summary['architecture']}, {summary['layers']} layers")
    print(f"size: weights {_mb(summary['weights_bytes'])}, folder {_mb(summary['total_bytes'])}")
    if "compression" in summary:
        print(f"compression: {summary['description']}, target {summary['target']}")
        print(f"base model: {summary['base_model'] or '-'}; calibration: {summary['calibration']}")
        print("profile:")
        for key, value in summary["profile"].items():
            print(f"  {key}: {value}")
        search = summary["metrics"].get("search") or {}
        if search:
            print(f"search: {search.get('generations')} generations, fitness KL {search.get('fitness_kl'):.4f}")
        evaluation = summary["metrics"].get("evaluation")
        if evaluation:
            print(f"evaluation on {evaluation.get('text')} ({evaluation.get('windows')} x {evaluation.get('seq_len')} "
                  "tokens):")
            for row in ("dense", "evopress", "evopress+lora"):
                if row in evaluation:
                    r = evaluation[row]
                    print(f"  {row:<15} perplexity {r.get('perplexity', float('nan')):10.2f}   KL "
                          f"{r.get('kl', float('nan')):.4f}")
        if summary["lora_correction"]:
            print(f"LoRA correction: {summary['lora_correction']}")
    print("loads with:")
    for line in summary["loads_with"]:
        print(f"  {line}")
    print(f"  lm-eval: {summary['lm_eval']}")
    if summary.get("exports"):
        print(f"exports: optimum-evo export {summary['path']} OUTPUT --format {{{','.join(summary['exports'])}}}")


def run_show_command(ns) -> int:
    summary = checkpoint_summary(ns.path)
    if ns.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        _print_summary(summary)
    return 0


# ---------------------------------------------------------------------------- export
def run_export_command(ns) -> int:
    import tempfile

    from .exporters import export

    folder = _checkpoint_folder(ns.path)
    if _record_of(folder) is None:
        raise CommandError(f"{folder} is not an EvoPress checkpoint (its config.json has no 'evopress' "
                           "quantization_config); export the OUTPUT/model of a search.")
    output = _output(ns)
    if not output and not ns.push_to_hub:
        raise CommandError("give the output folder (optimum-evo export DIR OUTPUT --format F), or --push-to-hub REPO.")
    model = _load_checkpoint(folder)
    with tempfile.TemporaryDirectory(prefix="evopress-export-") as tmp:
        target = Path(output) if output else Path(tmp) / ns.format
        summary = export(model, target, ns.format, tokenizer=str(folder) if _has_tokenizer(folder) else None)
        _export_card(target, folder, ns.format, repo_id=ns.push_to_hub)
        print(f"Exported {folder} as {ns.format} to {target}" + (" (a temporary folder)" if not output else ""))
        if (folder / "lora-correction").is_dir():
            print("The LoRA correction (lora-correction/) is not part of the export: ship that PEFT adapter beside it.")
        for key, value in summary.items():
            if key not in ("path", "format"):
                print(f"  {key}: {value}")
        if ns.push_to_hub:
            from .integrations.hub import upload_folder

            upload_folder(target, ns.push_to_hub, **_hub_kwargs(ns))
            print(f"Pushed the {ns.format} export to {ns.push_to_hub}")
    return 0


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _load_checkpoint(folder: Path, dtype=None):
    """The EvoPress checkpoint in ``folder``, loaded with the plugin (and checked)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .checkpoint import check_evopress_model
    from .integrations.transformers import register

    register()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32).eval()
    check_evopress_model(model)
    return model


# ---------------------------------------------------------------------------- eval
def _base_model_of(folder: Path, explicit: str | None):
    from .embedded_models import resolve_model

    record = _record_of(folder) or {}
    reference = explicit or (record.get("metrics") or {}).get("model")
    if not reference:
        return None
    try:
        return resolve_model(reference)
    except (FileNotFoundError, ValueError) as e:
        if explicit:
            raise CommandError(f"--base-model {explicit}: {e}") from None
        return None


def held_out_evaluation(path, eval_dataset="wikitext2", eval_windows=40, eval_seq_len=512, top_k=512,
                        base_model=None, lora_correction=True, device=None) -> dict:
    """Perplexity (and KL to the dense base model, when it is found) of the checkpoint ``path`` on
    ``eval_windows`` windows of ``eval_dataset`` (`optimum_evo.data.evaluation_windows`), with
    its LoRA correction when it has one (unless ``lora_correction=False``)."""
    import torch

    from .correction.peft_io import ADAPTER_SUBFOLDER
    from .data import evaluation_windows
    from .fitness import TeacherCache, evaluate
    from .loading import load_model, load_tokenizer

    folder = _checkpoint_folder(str(path))
    base = _base_model_of(folder, base_model)
    tokenizer = load_tokenizer(str(folder) if _has_tokenizer(folder) else base)
    if tokenizer is None:
        raise CommandError(f"{folder} has no tokenizer and its base model was not found; pass --base-model.")
    windows = evaluation_windows(eval_dataset, tokenizer, eval_seq_len, eval_windows)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows, teacher = {}, None
    if base is not None:
        dense = load_model(base, torch.float32, device=device)
        teacher = TeacherCache.build(dense, windows.to(device), "topk", top_k, progress=False)
        rows["dense"] = evaluate(dense, windows.to(device), teacher, progress=False)
        del dense
    model = _load_checkpoint(folder).to(device)
    rows["evopress"] = evaluate(model, windows.to(device), teacher, progress=False)
    if lora_correction and (folder / ADAPTER_SUBFOLDER / "adapter_config.json").is_file():
        from peft import PeftModel

        # the adapter of this folder on this folder's model (its config may name the Hub repository)
        corrected = PeftModel.from_pretrained(_load_checkpoint(folder), str(folder / ADAPTER_SUBFOLDER))
        corrected = corrected.to(device).eval()
        rows["evopress+lora"] = evaluate(corrected, windows.to(device), teacher, progress=False)
    from .card import public_text_name

    return {"text": public_text_name(eval_dataset) if isinstance(eval_dataset, str) else str(type(eval_dataset)),
            "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
            "base_model": base, "rows": {k: {m: v[m] for m in ("perplexity", "kl") if m in v} for k, v in rows.items()}}


def run_eval_command(ns) -> int:
    defaults = {f.name: f.default for f in setting_fields()}
    settings = {name: getattr(ns, name, defaults[name]) for name in EVAL_SETTINGS}
    SearchArguments(model="unused", **settings)  # the same validation as the search's
    if not ns.tasks and settings["eval_windows"] == 0:
        raise CommandError("Nothing to evaluate: --eval-windows 0 and no --tasks.")
    folder = _checkpoint_folder(ns.path)
    report = {"path": str(folder)}
    if settings["eval_windows"] != 0:
        ev = held_out_evaluation(folder, base_model=ns.base_model, lora_correction=ns.lora_correction,
                                 device=ns.device, **settings)
        report["held_out"] = ev
        print(f"{folder} on {ev['text']} ({ev['windows']} windows of {ev['seq_len']} tokens)"
              + ("" if ev["base_model"] else "; KL needs the dense model: pass --base-model"))
        print(f"{'model':<16} {'perplexity':>11} {'KL to dense':>12}")
        for name, row in ev["rows"].items():
            kl = f"{row['kl']:.4f}" if "kl" in row else "-"
            print(f"{name:<16} {row['perplexity']:>11.2f} {kl:>12}")
    if ns.tasks:
        try:
            from .integrations.lm_eval import evaluate_tasks
        except ImportError as e:
            raise CommandError(f"--tasks needs lm-eval ({e}): pip install optimum-evo[lm-eval].") from None
        from lm_eval.utils import make_table

        batch = ns.batch_size if str(ns.batch_size).startswith("auto") else int(ns.batch_size)
        limit = int(ns.limit) if ns.limit is not None and ns.limit >= 1 else ns.limit
        results = evaluate_tasks(folder, ns.tasks, include_path=ns.include_path, num_fewshot=ns.num_fewshot,
                                 limit=limit, batch_size=batch, device=ns.device, lora_correction=ns.lora_correction)
        print(make_table(results))
        report["lm_eval"] = results.get("results", {})
    if ns.output_json:
        Path(ns.output_json).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "model-path":
            from .embedded_models import embedded_model_path

            print(embedded_model_path(ns.name))
            return 0
        commands = {"search": run_search_command, "show": run_show_command, "export": run_export_command,
                    "eval": run_eval_command}
        return commands[ns.command](ns)
    except (ValueError, FileNotFoundError, NotImplementedError, KeyError, ImportError) as e:
        print(f"optimum-evo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
