"""mkdocs hook: pages that say ``<!-- optimum-evo: search --help -->`` get the live ``--help`` of
``optimum-evo search`` (generated from ``optimum_evo.SearchArguments``), so the command-line
reference can never drift from the code."""

MARKER = "<!-- optimum-evo: search --help -->"


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    import os

    from optimum_evo.cli import build_parser

    os.environ.setdefault("COLUMNS", "110")
    parser = build_parser()
    search = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("search"))
    return markdown.replace(MARKER, "```text\n" + search.format_help() + "```")
