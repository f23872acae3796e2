"""Data: the 90/10 split, and clear errors for missing, unreachable or too short text.
The tokenizers: test_tokenizer.py; the batch sampler: test_batches.py."""

import pytest

from jaxgpt import data, datasets
from jaxgpt.errors import UserError
from tests.conftest import tiny


def test_split_is_90_10_in_order(text_file):
    ds = datasets.load(tiny(text_file))
    text = text_file.read_text()
    n = int(0.9 * len(text))
    assert ds.tokenizer.decode(ds.train) == text[:n]
    assert ds.tokenizer.decode(ds.val) == text[n:]


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
