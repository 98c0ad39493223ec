"""Calibration and evaluation text, tokenized into fixed-length windows.

Sources accepted everywhere a dataset is asked for:

* a built-in name (`BUILTIN_TEXTS`):

  | name | text | where it comes from |
  |---|---|---|
  | ``brown`` | Brown corpus (calibration, the default) | shipped with the package |
  | ``sotu`` | State of the Union addresses (calibration) | shipped with the package |
  | ``tinyshakespeare`` | Shakespeare plays (calibration) | shipped with the package |
  | ``c4`` | the first 5,000 documents of C4 (English train shard 0, the usual GPTQ calibration set) | the Hub, through ``datasets`` |
  | ``fineweb-edu`` | the first 3,000 documents of FineWeb-Edu (``sample-10BT``) | the Hub, through ``datasets`` |
  | ``wikitext2`` | WikiText-2 raw test set, **evaluation only** | the Hub, through ``datasets`` (``wikitext`` / ``wikitext-2-raw-v1`` / ``test``) |

  A local copy always wins: ``$OPTIMUM_EVO_DATA`` (or a ``shared/data`` folder beside the
  repository) holding ``brown/brown_plain.txt``, ``sotu/sotu.txt``,
  ``tinyshakespeare/input.txt`` or ``wikitext-2-raw/wiki.test.lf.txt``. Texts downloaded from
  the Hub are kept in ``$OPTIMUM_EVO_CACHE/texts`` (default ``~/.cache/optimum_evo/texts``), so a
  later run needs no network. WikiText-2 is not shipped because its licence (CC BY-SA 3.0) is not
  the package's; offline and without a local copy, asking for it fails with a message naming the
  ways out;
* a path to a local text file;
* a list of strings;
* a `datasets.Dataset` with a ``"text"`` column;
* a dataset name on the Hub, ``"name"`` or ``"name:config:split"`` (needs network).

Every window begins with BOS when the tokenizer puts one before a text (`window_bos`), then
``seq_len - 1`` text tokens; otherwise it is ``seq_len`` text tokens.

Examples:
    >>> from transformers import AutoTokenizer
    >>> tok = AutoTokenizer.from_pretrained(path)                         # doctest: +SKIP
    >>> calib = calibration_windows("brown", tok, num_samples=128, seq_len=512, seed=0)  # doctest: +SKIP
    >>> calib.shape                                                       # doctest: +SKIP
    torch.Size([128, 512])
"""

from __future__ import annotations

import itertools
import json
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["BUILTIN_TEXTS", "EVALUATION_ONLY", "BuiltinText", "TextUnavailableError", "builtin_text_path",
           "builtin_texts", "calibration_windows", "cut_windows", "data_dirs", "evaluation_windows", "join_corpus",
           "load_texts", "text_cache_dir", "tokenize_corpus", "tokenizer_adds_bos", "window_bos", "window_span"]

PACKAGED_DIR = Path(__file__).resolve().parent / "texts"


@dataclass(frozen=True)
class BuiltinText:
    """A text known by name.

    Attributes:
        name: the name users pass (``dataset="brown"``).
        description: one line for help texts and model cards.
        license: the text's licence.
        local: path of a local copy inside a data folder (`data_dirs`).
        packaged: file shipped in ``optimum_evo/texts`` (xz-compressed), when the licence allows it.
        hub: ``datasets.load_dataset`` keyword arguments of the Hub copy.
        column: the text column of the Hub copy.
        max_documents: how many documents of the Hub copy are used (the first ones).
        evaluation_only: never calibrate on it (it is the held-out evaluation text).
    """

    name: str
    description: str
    license: str
    local: Optional[str] = None
    packaged: Optional[str] = None
    hub: Optional[dict] = field(default=None, hash=False)
    column: str = "text"
    max_documents: Optional[int] = None
    evaluation_only: bool = False

    @property
    def hub_call(self) -> str:
        """The ``datasets.load_dataset(...)`` call that fetches the Hub copy, as text."""
        if not self.hub:
            return ""
        kwargs = dict(self.hub)
        args = [repr(kwargs.pop("path"))] + ([repr(kwargs.pop("name"))] if "name" in kwargs else [])
        return f"datasets.load_dataset({', '.join(args + [f'{k}={v!r}' for k, v in kwargs.items()])})"


#: Every built-in text, by name (calibration texts first, in the order of the help texts).
BUILTIN_TEXTS = {t.name: t for t in (
    BuiltinText("brown", "Brown corpus (500 documents of edited American English, 1961)",
                "distributed with the permission of the copyright holder, redistribution permitted",
                local="brown/brown_plain.txt", packaged="brown.txt.xz"),
    BuiltinText("sotu", "US State of the Union addresses", "public domain", local="sotu/sotu.txt",
                packaged="sotu.txt.xz"),
    BuiltinText("tinyshakespeare", "Shakespeare plays (Tiny Shakespeare)", "public domain",
                local="tinyshakespeare/input.txt", packaged="tinyshakespeare.txt.xz"),
    BuiltinText("c4", "C4 English, first 5,000 documents of train shard 0 (allenai/c4)", "ODC-BY",
                hub={"path": "allenai/c4", "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
                     "split": "train", "streaming": True}, max_documents=5000),
    BuiltinText("fineweb-edu", "FineWeb-Edu, first 3,000 documents of sample-10BT (HuggingFaceFW/fineweb-edu)",
                "ODC-BY", hub={"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train",
                               "streaming": True}, max_documents=3000),
    BuiltinText("wikitext2", "WikiText-2 (raw), test split", "CC BY-SA 3.0 / GFDL",
                local="wikitext-2-raw/wiki.test.lf.txt",
                hub={"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}, evaluation_only=True),
)}
EVALUATION_ONLY = {name for name, t in BUILTIN_TEXTS.items() if t.evaluation_only}


class TextUnavailableError(FileNotFoundError):
    """A built-in text has no local copy, is not shipped, and could not be downloaded."""


def data_dirs() -> list:
    """Folders searched for local copies of the built-in texts, in order."""
    dirs = []
    if os.environ.get("OPTIMUM_EVO_DATA"):
        dirs.append(Path(os.environ["OPTIMUM_EVO_DATA"]))
    repo = Path(__file__).resolve().parent.parent
    dirs += [repo.parent / "shared" / "data", repo / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return list(dict.fromkeys(dirs))


def text_cache_dir() -> Path:
    """Where texts downloaded from the Hub are kept: ``$OPTIMUM_EVO_CACHE/texts`` (default
    ``~/.cache/optimum_evo/texts``)."""
    root = os.environ.get("OPTIMUM_EVO_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "optimum_evo") / "texts"


def _local_copy(text: BuiltinText) -> Optional[Path]:
    if text.local:
        for d in data_dirs():
            if (d / text.local).is_file():
                return d / text.local
    return None


def builtin_text_path(name: str) -> Path:
    """The file a built-in text is read from: a local copy (`data_dirs`), else the copy
    downloaded earlier (`text_cache_dir`), else the shipped, xz-compressed one. A text that is
    only on the Hub and not downloaded yet raises `TextUnavailableError`."""
    text = BUILTIN_TEXTS[name]
    found = _local_copy(text)
    if found is None and text.hub and (text_cache_dir() / f"{name}.jsonl").is_file():
        found = text_cache_dir() / f"{name}.jsonl"
    if found is None and text.packaged and (PACKAGED_DIR / text.packaged).is_file():
        found = PACKAGED_DIR / text.packaged
    if found is None:
        raise TextUnavailableError(f"Built-in text {name!r} has no local copy ({text.local or 'none'} in "
                                   f"{[str(d) for d in data_dirs()]}) and was not downloaded yet.")
    return found


def _read_file(path: Path) -> list:
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes()).decode("utf-8").splitlines()
    return path.read_text(encoding="utf-8").splitlines()


def _download(text: BuiltinText) -> list:
    """The documents of a Hub text (through ``datasets``), kept in `text_cache_dir` afterwards."""
    try:
        import datasets

        ds = datasets.load_dataset(**text.hub)
        rows = itertools.islice(iter(ds), text.max_documents) if text.max_documents else iter(ds)
        docs = [row[text.column] for row in rows]
    except Exception as e:
        where = f"a local copy at $OPTIMUM_EVO_DATA/{text.local}, " if text.local else ""
        skip = " or eval_windows=0 (--eval-windows 0) to skip the evaluation" if text.evaluation_only else ""
        shipped = " It is not shipped with optimum-evo: its licence (" + text.license + ") is not the package's." \
            if text.evaluation_only else ""
        raise TextUnavailableError(
            f"Built-in text {text.name!r} ({text.description}) could not be downloaded from the Hugging Face Hub "
            f"with {text.hub_call} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).{shipped} "
            f"Offline, give {where}a text file, a list of strings or a datasets.Dataset{skip}.") from e
    # the Hub's WikiText rows end with "\n" and include blank rows: the local copy has neither
    docs = [d.rstrip("\n") for d in docs if isinstance(d, str)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise TextUnavailableError(f"The Hub copy of {text.name!r} ({text.hub_call}) has no text.")
    cache = text_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{text.name}.jsonl.{os.getpid()}"
        tmp.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        os.replace(tmp, cache / f"{text.name}.jsonl")
    except OSError:  # a read-only cache only costs a download next time
        pass
    return docs


def builtin_texts(name: str) -> list:
    """The documents of the built-in text ``name`` (see the module docstring for where they come from)."""
    text = BUILTIN_TEXTS[name]
    try:
        return _read_file(builtin_text_path(name))
    except TextUnavailableError:
        if not text.hub:
            raise
    return _download(text)


def load_texts(source, purpose: str = "calibration") -> list:
    """Return the documents of ``source`` as a list of strings (see the module docstring).

    ``purpose="calibration"`` refuses the evaluation-only texts, so a model is never calibrated on
    the text it is evaluated on.
    """
    if isinstance(source, str) and source in BUILTIN_TEXTS:
        if purpose == "calibration" and source in EVALUATION_ONLY:
            raise ValueError(
                f"{source!r} is the evaluation text (WikiText-2 test); calibrating on it would leak the test set. "
                f"Use {', '.join(repr(n) for n in BUILTIN_TEXTS if n not in EVALUATION_ONLY)} or your own text "
                "for calibration."
            )
        return builtin_texts(source)
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
                f"Could not load dataset {source!r} ({type(e).__name__}: {e}). Offline, use a shipped text "
                f"{[n for n, t in BUILTIN_TEXTS.items() if t.packaged]}, a local text file, a list of strings or a "
                "datasets.Dataset."
            ) from e
        column = "text" if "text" in ds.column_names else ds.column_names[0]
        return list(ds[column])
    raise TypeError(f"Unsupported text source of type {type(source).__name__}.")


def join_corpus(texts: Sequence[str], separator: str = "\n\n") -> str:
    """The non-empty documents joined with ``separator`` (the text `tokenize_corpus` tokenizes)."""
    return separator.join(t for t in texts if t and t.strip())


def tokenize_corpus(texts: Sequence[str], tokenizer, separator: str = "\n\n") -> torch.Tensor:
    """Join non-empty documents with ``separator`` and tokenize once into a 1-D id tensor of the text
    alone (no BOS or other special tokens: `cut_windows` gives each window its own, `window_bos`)."""
    joined = join_corpus(texts, separator)
    if not joined.strip():
        raise ValueError("The text source is empty: give at least one non-empty document.")
    ids = tokenizer(joined, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts BOS before a text: what it does, whatever its attributes say (a
    post-processor may add it); its ``add_bos_token`` when it cannot encode."""
    bos = getattr(tokenizer, "bos_token_id", None)
    try:
        return bool(bos is not None and tokenizer("a").input_ids[:1] == [bos])
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode: fall back to its attribute
        return bool(getattr(tokenizer, "add_bos_token", False))


def window_bos(tokenizer) -> Optional[int]:
    """The token every window begins with: BOS for a tokenizer that puts it before a text (Gemma,
    Llama 2 / 3, OPT), as the model saw in training and as ``tokenizer(text)`` gives; None for one
    that does not (SmolLM2, GPT-2, Qwen). Without it such a model loses the first position its
    attention rests on: Gemma-3-270M's WikiText-2 perplexity is 69.5 on windows without BOS and
    26.4 with it."""
    return int(tokenizer.bos_token_id) if tokenizer_adds_bos(tokenizer) else None


def window_span(tokenizer, seq_len: int) -> tuple:
    """``(bos, span)`` of a window of ``seq_len`` tokens: the BOS it begins with (`window_bos`, or
    None) and how many text tokens follow it."""
    bos = window_bos(tokenizer)
    return bos, seq_len - (bos is not None)


def cut_windows(ids: torch.Tensor, starts: Sequence[int], span: int, bos: Optional[int]) -> torch.Tensor:
    """``[len(starts), span (+1)]``: the text slices ``ids[s : s + span]``, each after ``bos`` when given."""
    rows = torch.stack([ids[s : s + span] for s in starts])
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype, device=rows.device), rows], dim=1)


def calibration_windows(source, tokenizer, num_samples: int = 128, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """``num_samples`` random windows of ``seq_len`` tokens from ``source`` (seeded), shape ``[N, T]``;
    each begins with BOS when the tokenizer adds one (`window_bos`), then ``seq_len - 1`` text tokens."""
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"num_samples must be >= 1 and seq_len >= 2 (got {num_samples}, {seq_len}).")
    ids = tokenize_corpus(load_texts(source, "calibration"), tokenizer)
    bos, span = window_span(tokenizer, seq_len)
    if ids.numel() < span + 1:
        raise ValueError(
            f"The calibration text has only {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "give more text or lower seq_len."
        )
    return cut_windows(ids, calibration_window_starts(ids.numel(), num_samples, span, seed), span, bos)


def calibration_window_starts(num_tokens: int, num_samples: int, span: int, seed: int = 0) -> list:
    """Where `calibration_windows` starts its windows' ``span`` text tokens in a text of
    ``num_tokens`` tokens (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_tokens - span, (num_samples,), generator=g).tolist()


def evaluation_windows(source, tokenizer, seq_len: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """Standard perplexity protocol: lines joined by ``"\\n\\n"``, tokenized once, cut into
    non-overlapping windows of ``seq_len`` (the tail shorter than a window is dropped). For a tokenizer
    that adds BOS each window is BOS and the next ``seq_len - 1`` text tokens (as llama.cpp's
    ``perplexity`` does), so every text token is scored once and with the context the model expects."""
    ids = tokenize_corpus(load_texts(source, "evaluation"), tokenizer)
    bos, span = window_span(tokenizer, seq_len)
    n = ids.numel() // span
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"The evaluation text has fewer than {seq_len} tokens.")
    return cut_windows(ids, range(0, n * span, span), span, bos)
