"""Command line: ``optimum-evo search ...`` and ``optimum-evo model-path NAME``.

The options of ``search`` (and of ``optimum-cli evopress``) are generated from the fields of
`optimum_evo.SearchArguments`: one option per setting, its help text, its group, its
choices; the compression methods and export formats are read from their registries.

Examples:

    optimum-evo search --model smollm2 --compression depth --target 0.25 --output out/depth
    optimum-evo search -m ./my-llama --compression quantization --target 3 --sym --output out/q --export gptq
    optimum-evo model-path gemma3
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
import warnings

from .settings import SearchArguments, option_of, setting_fields

#: Earlier option names that still work (with a warning): setting -> old option.
RENAMED_OPTIONS = {"dataset": "--calibration", "eval_dataset": "--evaluation"}
GROUP_TITLES = {"model": "model and output", "compression": "what to compress", "search": "search",
                "calibration": "calibration and fitness", "evaluation": "evaluation",
                "correction": "LoRA error correction", "output": "what the run writes"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-evo", description="EvoPress evolutionary dynamic compression.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="search per-unit compression levels, compress, evaluate and save")
    add_search_arguments(s)

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


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``optimum-evo search`` and ``optimum-cli evopress``, one per setting of
    `SearchArguments` (defaults are the dataclass's; an option not given keeps it)."""
    from .exporters import available_exporters
    from .methods import available_methods, get_method

    hints = typing.get_type_hints(SearchArguments)
    groups: dict = {}
    for f in setting_fields():
        option = option_of(f.name)
        if not option.cli:
            continue
        group = groups.get(option.group)
        if group is None:
            group = groups[option.group] = parser.add_argument_group(GROUP_TITLES.get(option.group, option.group))
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
            continue
        if base is bool:
            group.add_argument(*flags, action="store_true", **kwargs)
            continue
        convert = _converter(f.name, base if base in (int, float, str) else str, option)
        if option.append:
            group.add_argument(*flags, action="append", type=convert, metavar=option.metavar, **kwargs)
            continue
        group.add_argument(*flags, type=convert, choices=option.choices, metavar=option.metavar, **kwargs)
        if f.name in RENAMED_OPTIONS:
            group.add_argument(RENAMED_OPTIONS[f.name], action=_Deprecated, dest=f.name, default=argparse.SUPPRESS, replacement=flags[-1],
                               convert=convert, help=f"deprecated name of {flags[-1]}")
    parser.epilog = "The options are the fields of optimum_evo.SearchArguments (same names, same defaults)."


def arguments_from_namespace(ns: argparse.Namespace) -> SearchArguments:
    """The `SearchArguments` of a parsed ``search`` command line."""
    names = {f.name for f in dataclasses.fields(SearchArguments)}
    return SearchArguments(**{k: v for k, v in vars(ns).items() if k in names})


def run_search_command(ns: argparse.Namespace) -> int:
    from .pipeline import format_table, run

    if not getattr(ns, "output_dir", None):
        raise ValueError("--output is required: the folder for the compressed model, result.json and the plots.")
    args = arguments_from_namespace(ns)  # validates everything, the export formats included
    ctx = run(args)
    from .distributed import is_main

    if not is_main():  # another process of a multi-process run: process 0 reports
        return 0
    print(format_table(ctx.report))
    print(f"\nWrote {args.output_dir}/result.json, profile.png, fitness.png"
          + (f" and the compressed model in {args.output_dir}/model" if args.save_model else ""))
    for fmt, summary in (ctx.report.get("exports") or {}).items():
        print(f"Exported {fmt} to {summary['path']}")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "model-path":
            from .embedded_models import embedded_model_path

            print(embedded_model_path(ns.name))
            return 0
        return run_search_command(ns)
    except (ValueError, FileNotFoundError, NotImplementedError, KeyError, ImportError) as e:
        print(f"optimum-evo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
