"""Calibration and evaluation data."""

import datasets
import pytest
import torch

from optimum_evo.data import (
    TextUnavailableError, builtin_text_path, calibration_windows, evaluation_windows, load_texts,
)


class CharTokenizer:
    """Minimal tokenizer: one id per character (enough to test windowing)."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        return {"input_ids": torch.tensor([[ord(c) % 256 for c in text]])}


TEXT = ["The quick brown fox jumps over the lazy dog. " * 20, "", "Another document with words. " * 20]


def test_sources_agree(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("\n".join(TEXT))
    tok = CharTokenizer()
    a = calibration_windows(TEXT, tok, 8, 32, seed=1)
    b = calibration_windows(str(f), tok, 8, 32, seed=1)
    c = calibration_windows(datasets.Dataset.from_dict({"text": TEXT}), tok, 8, 32, seed=1)
    assert a.shape == (8, 32)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(a, calibration_windows(TEXT, tok, 8, 32, seed=1))
    assert not torch.equal(a, calibration_windows(TEXT, tok, 8, 32, seed=2))


def test_builtin_texts_and_leak_guard():
    assert builtin_text_path("brown").is_file()  # a local copy, or the one shipped with the package
    assert len(load_texts("brown")) > 20_000 and len(load_texts("sotu")) > 1000
    with pytest.raises(ValueError, match="evaluation text"):
        load_texts("wikitext2", purpose="calibration")
    try:
        first = load_texts("wikitext2", purpose="evaluation")[0]
    except TextUnavailableError:  # no local copy and no Hub here (tests/test_data_defaults.py covers that)
        return
    assert first.strip() == "= Robert Boulter ="


def test_bad_sources(tmp_path):
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="empty"):
        calibration_windows(["", "   "], tok, 4, 16)
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(["short"], tok, 4, 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))


def test_evaluation_windows_are_contiguous_and_non_overlapping():
    tok = CharTokenizer()
    lines = ["line one", "line two", "line three"] * 30
    w = evaluation_windows(lines, tok, seq_len=16)
    flat = tok("\n\n".join(lines))["input_ids"][0]
    assert w.shape[1] == 16 and w.shape[0] == flat.numel() // 16
    assert torch.equal(w.flatten(), flat[: w.numel()])
    assert evaluation_windows(lines, tok, seq_len=16, max_windows=3).shape == (3, 16)
