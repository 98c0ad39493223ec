"""Calibration and evaluation text, tokenized into fixed-length windows.

Sources accepted everywhere a dataset is asked for:

* a built-in name: ``"brown"``, ``"sotu"``, ``"tinyshakespeare"`` (calibration) or ``"wikitext2"``
  (WikiText-2 test, **evaluation only**), found in ``$OPTIMUM_EVO_DATA`` or the ``shared/data``
  folder beside the repository;
* a path to a local text file;
* a list of strings;
* a `datasets.Dataset` with a ``"text"`` column;
* a dataset name on the Hub, ``"name"`` or ``"name:config:split"`` (needs network).

Examples:
    >>> from transformers import AutoTokenizer
    >>> tok = AutoTokenizer.from_pretrained(path)                         # doctest: +SKIP
    >>> calib = calibration_windows("brown", tok, num_samples=128, seq_len=512, seed=0)  # doctest: +SKIP
    >>> calib.shape                                                       # doctest: +SKIP
    torch.Size([128, 512])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

BUILTIN_TEXTS = {
    "brown": "brown/brown_plain.txt",
    "sotu": "sotu/sotu.txt",
    "tinyshakespeare": "tinyshakespeare/input.txt",
    "wikitext2": "wikitext-2-raw/wiki.test.lf.txt",
}
EVALUATION_ONLY = {"wikitext2"}


def data_dirs() -> list:
    """Folders searched for the built-in texts, in order."""
    dirs = []
    if os.environ.get("OPTIMUM_EVO_DATA"):
        dirs.append(Path(os.environ["OPTIMUM_EVO_DATA"]))
    repo = Path(__file__).resolve().parent.parent
    dirs += [repo.parent / "shared" / "data", repo / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return dirs


def builtin_text_path(name: str) -> Path:
    """Path of a built-in text, or a ``FileNotFoundError`` that says where it was looked for."""
    rel = BUILTIN_TEXTS[name]
    for d in data_dirs():
        if (d / rel).is_file():
            return d / rel
    raise FileNotFoundError(
        f"Built-in text {name!r} ({rel}) was not found in {[str(d) for d in data_dirs()]}. "
        "Set OPTIMUM_EVO_DATA to the folder holding it, or pass a text file / list of strings / datasets.Dataset."
    )


def load_texts(source, purpose: str = "calibration") -> list:
    """Return the documents of ``source`` as a list of strings (see the module docstring).

    ``purpose="calibration"`` refuses the evaluation-only texts, so a model is never calibrated on
    the text it is evaluated on.
    """
    if isinstance(source, str) and source in BUILTIN_TEXTS:
        if purpose == "calibration" and source in EVALUATION_ONLY:
            raise ValueError(
                f"{source!r} is the evaluation text (WikiText-2 test); calibrating on it would leak the test set. "
                "Use 'brown', 'sotu' or your own text for calibration."
            )
        return builtin_text_path(source).read_text(encoding="utf-8").splitlines()
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        import datasets

        ds = datasets.load_dataset("text", data_files=str(source), split="train")
        return list(ds["text"])
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise TypeError("A list calibration source must contain only strings.")
        return list(source)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(source, datasets.Dataset):
        if "text" not in source.column_names:
            raise ValueError(f"The datasets.Dataset needs a 'text' column; it has {source.column_names}.")
        return list(source["text"])
    if isinstance(source, str):
        if os.sep in source and not Path(source).exists() or source.endswith(".txt"):
            raise FileNotFoundError(f"Calibration text file {source!r} does not exist.")
        name, config, split = (source.split(":") + [None, None])[:3]
        try:
            ds = datasets.load_dataset(name, config, split=split or "train")
        except Exception as e:
            raise ValueError(
                f"Could not load dataset {source!r} ({type(e).__name__}: {e}). Offline, use a built-in name "
                f"{sorted(set(BUILTIN_TEXTS) - EVALUATION_ONLY)}, a local text file, a list of strings or a datasets.Dataset."
            ) from e
        column = "text" if "text" in ds.column_names else ds.column_names[0]
        return list(ds[column])
    raise TypeError(f"Unsupported text source of type {type(source).__name__}.")


def join_corpus(texts: Sequence[str], separator: str = "\n\n") -> str:
    """The non-empty documents joined with ``separator`` (the text `tokenize_corpus` tokenizes)."""
    return separator.join(t for t in texts if t and t.strip())


def tokenize_corpus(texts: Sequence[str], tokenizer, separator: str = "\n\n") -> torch.Tensor:
    """Join non-empty documents with ``separator`` and tokenize once into a 1-D id tensor."""
    joined = join_corpus(texts, separator)
    if not joined.strip():
        raise ValueError("The text source is empty: give at least one non-empty document.")
    ids = tokenizer(joined, return_tensors="pt", add_special_tokens=True)["input_ids"][0]
    return ids


def calibration_windows(source, tokenizer, num_samples: int = 128, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """``num_samples`` random windows of ``seq_len`` tokens from ``source`` (seeded), shape ``[N, T]``."""
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"num_samples must be >= 1 and seq_len >= 2 (got {num_samples}, {seq_len}).")
    ids = tokenize_corpus(load_texts(source, "calibration"), tokenizer)
    if ids.numel() < seq_len + 1:
        raise ValueError(
            f"The calibration text has only {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "give more text or lower seq_len."
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def evaluation_windows(source, tokenizer, seq_len: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """Standard perplexity protocol: lines joined by ``"\\n\\n"``, tokenized once, cut into
    non-overlapping windows of ``seq_len`` (the tail shorter than a window is dropped)."""
    ids = tokenize_corpus(load_texts(source, "evaluation"), tokenizer)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"The evaluation text has fewer than {seq_len} tokens.")
    return ids[: n * seq_len].view(n, seq_len)
