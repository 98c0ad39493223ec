"""The repository speaks of the product: its prose (docs, README, docstrings and comments, examples,
benchmarks, tests) never narrates how the project was built or refers to the task tracker."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCOPES = ("README.md", "docs", "optimum_evo", "examples", "benchmarks", "tests", "Makefile", "mkdocs.yml", ".ci")

#: (pattern, what it betrays). Case-insensitive.
NARRATIVE = [
    (r"\bsessions?\b", "a working session"),
    (r"\b(the|this|that|our|an?|its) issues?\b(?!\s+(tracker\s+)?(#|of\s+\w+-\w+))", "the task tracker"),
    (r"\bissue'?s\b", "the task tracker"),
    (r"\btask tracker\b|\bthe tracker\b", "the task tracker"),
    (r"\b(stop|closing) notes?\b", "the task tracker"),
    (r"\bthe bar\b", "a target set by the task tracker"),
    (r"\bthe filer\b", "the task tracker"),
    (r"\b(first|second|third|fourth|fifth|earlier|later|previous|last) (session|attempt|try)\b", "build history"),
    (r"\bwe (tried|found|first|then|had|decided)\b", "build history"),
    (r"\bfound while writing\b|\bwhile writing this\b", "build history"),
    (r"\bnot committed\b", "build history"),
    (r"(?<![\w.-])/tmp/[\w./-]+\.py\b", "a script outside the repository"),
]
# a reference to another project's tracker ("llm-compressor issue #1618", "vllm#45051") is a fact, not a diary
ALLOWED = [re.compile(r"[\w.-]+ (issue|PR|pull request) #\d+", re.I), re.compile(r"\b[\w.-]+#\d+\b")]


def prose_files():
    for scope in SCOPES:
        path = ROOT / scope
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            if f.suffix in (".py", ".md", ".yml", ".yaml", ".txt", ".toml", "") and "__pycache__" not in f.parts:
                yield f


def findings(text: str) -> list:
    out = []
    for line_no, line in enumerate(text.splitlines(), 1):
        cleaned = line
        for allowed in ALLOWED:
            cleaned = allowed.sub("", cleaned)
        for pattern, what in NARRATIVE:
            if re.search(pattern, cleaned, flags=re.I):
                out.append((line_no, what, line.strip()))
    return out


def test_the_check_catches_narrative_and_spares_facts():
    assert findings("Measured in the third session, see the issue note.")
    assert findings("This was found while writing the exporter.")
    assert findings("python /tmp/depth/neighbors.py (not committed)")
    assert not findings("transformers 5.24 cannot load them yet (llm-compressor issue #1618); vllm#45051 asks for it.")
    assert not findings("A search resumes from its checkpoint after a crash.")


def test_repository_prose_is_a_manual_not_a_diary():
    this = Path(__file__).resolve()
    hits = []
    for f in prose_files():
        if f.resolve() == this:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{f.relative_to(ROOT)}:{n}: [{what}] {line}" for n, what, line in findings(text)]
    assert hits == [], "\n".join(hits)
