"""Tokenizer and data: round trips, the 90/10 split, the batch sampler, clear errors."""

import json

import jax
import numpy as np
import pytest

from jaxgpt import batches, data, datasets, tokenizer
from jaxgpt.errors import UserError
from tests.conftest import tiny


def test_char_tokenizer_round_trip(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    tok = tokenizer.CharTokenizer.from_text(text)
    assert tok.chars == sorted(set(text))  # the lecture's vocabulary: sorted unique chars
    assert tok.decode(tok.encode(text)) == text
    (tmp_path / "tok.json").write_text(json.dumps(tok.to_dict()))  # as a workdir holds it
    again = tokenizer.load(tmp_path / "tok.json")
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size


def test_unknown_characters_are_named():
    tok = tokenizer.CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match="'z'.*knows 3 characters"):
        tok.encode("abz")


def _tiny_bpe():
    """A byte-level tiktoken encoding (256 byte tokens + <|endoftext|>): no download needed."""
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.Encoding("bytes", pat_str=r"\S+|\s+",
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


def test_bpe_round_trip_and_json(tmp_path):
    tok = tokenizer.BPETokenizer(_tiny_bpe())
    text = "Hello world, ça va?<|endoftext|>"
    ids = tok.encode(text)
    assert ids[-1] == tok.eot_token == 256 and tok.decode(ids) == text
    assert tok.to_dict() == {"kind": "gpt2"}  # saved by name: the vocabulary is GPT-2's


def test_gpt2_vocabulary_offline_is_a_clear_error(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="TIKTOKEN_CACHE_DIR"):
        tokenizer.BPETokenizer()


def test_split_is_90_10_in_order(text_file):
    ds = datasets.load(tiny(text_file))
    text = text_file.read_text()
    n = int(0.9 * len(text))
    assert ds.tokenizer.decode(ds.train) == text[:n]
    assert ds.tokenizer.decode(ds.val) == text[n:]


def test_get_batch_windows_are_shifted_by_one():
    arr = np.arange(100, dtype=np.int32)
    x, y = jax.jit(batches.get_batch, static_argnums=(2, 3))(arr, jax.random.PRNGKey(0), 6, 10)
    assert x.shape == y.shape == (6, 10)
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_array_equal(y, x + 1)  # y is x shifted one token on
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)  # contiguous windows
    assert x.min() >= 0 and y.max() <= 99


def test_missing_data_path_names_the_flag(tmp_path):
    with pytest.raises(UserError, match="--config.data_path"):
        datasets.load(tiny(tmp_path / "nope.txt"))


def test_no_network_gives_one_line_error(tmp_path, monkeypatch):
    c = tiny()
    c.dataset, c.data_dir = "shakespeare_char", str(tmp_path)
    monkeypatch.setattr(data, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # refused
    with pytest.raises(UserError, match="offline.*--config.data_path"):
        datasets.load(c)
    assert not (tmp_path / "shakespeare_char" / "input.txt").exists()  # no half-written file


def test_text_shorter_than_a_block_is_an_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij" * 3)
    with pytest.raises(UserError, match="smaller block_size"):
        datasets.load(tiny(path))
