"""Calibration and evaluation data."""

import datasets
import pytest
import torch

from transformers import BatchEncoding

from optimum_evo.data import (
    TextUnavailableError, builtin_text_path, calibration_windows, evaluation_windows, load_texts, tokenize_corpus,
    window_bos,
)


class CharTokenizer:
    """Minimal tokenizer: one id per character (enough to test windowing)."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        return {"input_ids": torch.tensor([[ord(c) % 256 for c in text]])}


class BosCharTokenizer(CharTokenizer):
    """One id per character, after BOS (id 1) unless ``add_special_tokens=False``, like Gemma's."""

    bos_token_id = 1

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = super().__call__(text)["input_ids"]
        if add_special_tokens:
            ids = torch.cat([torch.tensor([[self.bos_token_id]]), ids], dim=1)
        return BatchEncoding({"input_ids": ids if return_tensors else ids[0].tolist()})


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


def test_windows_of_a_tokenizer_that_adds_bos_each_begin_with_it():
    tok = BosCharTokenizer()
    assert window_bos(tok) == 1 and window_bos(CharTokenizer()) is None
    lines = ["line one", "line two", "line three"] * 30
    text = tokenize_corpus(lines, tok)
    assert text[0].item() != 1  # the text alone: the windows carry the BOS, not the stream
    w = evaluation_windows(lines, tok, seq_len=16)
    assert w.shape == (text.numel() // 15, 16)
    assert (w[:, 0] == 1).all()  # every window, not only the first, starts where the model expects
    assert torch.equal(w[:, 1:].flatten(), text[: w.shape[0] * 15])  # each text token is scored exactly once
    calib = calibration_windows(TEXT, tok, 8, 32, seed=1)
    ids = tokenize_corpus(TEXT, tok)
    assert calib.shape == (8, 32) and (calib[:, 0] == 1).all()
    for row in calib[:, 1:]:
        assert any(torch.equal(ids[s:s + 31], row) for s in range(ids.numel() - 30))


def test_windows_of_a_tokenizer_without_bos_are_plain_slices_of_the_text():
    tok = CharTokenizer()
    ids = tokenize_corpus(TEXT, tok)
    for row in calibration_windows(TEXT, tok, 8, 32, seed=1):
        assert any(torch.equal(ids[s:s + 32], row) for s in range(ids.numel() - 31))
