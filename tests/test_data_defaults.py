"""Built-in text names work anywhere: shipped texts without a local copy, WikiText-2 / C4 /
FineWeb-Edu through ``datasets`` (the Hub call intercepted), local copies first, a clear error
offline."""

import hashlib
import json
import lzma
import types

import datasets
import pytest

from optimum_evo import data
from optimum_evo.data import BUILTIN_TEXTS, TextUnavailableError, builtin_text_path, load_texts

SHA256 = {"brown": "ea3c8521d1d0127e77c89d36f76b6d47a36f46a80447af728c39d369fd76fae2",
          "sotu": "911d112e92845dca4100fdb59836ca5e2ba8eed666ee3e9a510c779702aa7bcc",
          "tinyshakespeare": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"}
#: How the Hub serves WikiText-2 raw: one row per line, "\n" at the end, blank rows between paragraphs.
HUB_WIKITEXT = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English film , television and theatre "
                "actor . \n", " \n", " = = Career = = \n"]


@pytest.fixture
def no_local_data(monkeypatch, tmp_path):
    """No local copy of any text (as after `pip install optimum-evo`), an empty download cache, and
    every Hub call recorded (and answered by `hub_rows`, or failing like an offline machine)."""
    monkeypatch.setattr(data, "data_dirs", lambda: [tmp_path / "nowhere"])
    monkeypatch.setenv("OPTIMUM_EVO_CACHE", str(tmp_path / "cache"))
    calls = types.SimpleNamespace(args=[], rows=None)

    def load_dataset(*args, **kwargs):
        calls.args.append((args, kwargs))
        if calls.rows is None:
            raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")
        return datasets.IterableDataset.from_generator(lambda: ({"text": t} for t in calls.rows)) \
            if kwargs.get("streaming") else datasets.Dataset.from_dict({"text": list(calls.rows)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("name", ["brown", "sotu", "tinyshakespeare"])
def test_shipped_texts_are_the_local_texts(name, no_local_data):
    path = builtin_text_path(name)
    assert path.parent == data.PACKAGED_DIR and path.suffix == ".xz"
    assert hashlib.sha256(lzma.decompress(path.read_bytes())).hexdigest() == SHA256[name]
    texts = load_texts(name)
    assert len(texts) > 1000 and no_local_data.args == []  # no network for a shipped text


def test_a_local_copy_wins_over_the_shipped_one(monkeypatch, tmp_path):
    (tmp_path / "sotu").mkdir()
    (tmp_path / "sotu" / "sotu.txt").write_text("a local address\nsecond line\n")
    monkeypatch.setattr(data, "data_dirs", lambda: [tmp_path])
    assert builtin_text_path("sotu") == tmp_path / "sotu" / "sotu.txt"
    assert load_texts("sotu") == ["a local address", "second line"]


def test_wikitext2_comes_from_the_hub_then_from_the_cache(no_local_data, tmp_path):
    no_local_data.rows = HUB_WIKITEXT
    texts = load_texts("wikitext2", purpose="evaluation")
    assert no_local_data.args == [((), {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"})]
    # the local copy's convention: no trailing newline, no blank rows
    assert texts == [" = Robert Boulter = ", " Robert Boulter is an English film , television and theatre actor . ",
                     " = = Career = = "]
    assert load_texts("wikitext2", purpose="evaluation") == texts and len(no_local_data.args) == 1  # cached
    cached = tmp_path / "cache" / "texts" / "wikitext2.jsonl"
    assert [json.loads(line)["text"] for line in cached.read_text().splitlines()] == texts
    with pytest.raises(ValueError, match="evaluation text"):
        load_texts("wikitext2", purpose="calibration")


def test_the_local_wikitext_copy_matches_the_hub_convention():
    """The same rows as the Hub's after normalisation: the shared copy's first lines."""
    try:
        local = load_texts("wikitext2", purpose="evaluation")
    except TextUnavailableError:
        pytest.skip("no local WikiText-2 copy on this machine")
    assert local[0] == " = Robert Boulter = " and all(t.strip() and not t.endswith("\n") for t in local[:200])


def test_offline_without_a_local_copy_fails_with_the_ways_out(no_local_data):
    with pytest.raises(TextUnavailableError) as err:
        load_texts("wikitext2", purpose="evaluation")
    message = str(err.value)
    for part in ("datasets.load_dataset('wikitext', 'wikitext-2-raw-v1', split='test')", "ConnectionError",
                 "CC BY-SA 3.0", "$OPTIMUM_EVO_DATA/wikitext-2-raw/wiki.test.lf.txt", "eval_windows=0"):
        assert part in message, part
    assert isinstance(err.value, FileNotFoundError)  # the command line reports it as a one-line error


@pytest.mark.parametrize("name, path, documents", [("c4", "allenai/c4", 5000),
                                                  ("fineweb-edu", "HuggingFaceFW/fineweb-edu", 3000)])
def test_hub_calibration_sets_are_streamed_and_capped(no_local_data, name, path, documents):
    no_local_data.rows = [f"document {i} with some words." for i in range(documents + 50)]
    texts = load_texts(name)
    ((args, kwargs),) = no_local_data.args
    assert kwargs["path"] == path and kwargs["streaming"] is True and kwargs["split"] == "train"
    assert texts == no_local_data.rows[:documents]
    assert BUILTIN_TEXTS[name].license == "ODC-BY"


def test_builtin_names_in_the_settings_help():
    from optimum_evo.settings import SearchArguments

    help_text = SearchArguments.__dataclass_fields__["dataset"].metadata["help"]
    assert all(name in help_text for name in ("brown", "sotu", "tinyshakespeare", "c4", "fineweb-edu"))
    assert "wikitext2" not in help_text
    with pytest.raises(ValueError, match="evaluation text"):
        SearchArguments(dataset="wikitext2")
