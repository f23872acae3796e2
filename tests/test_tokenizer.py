"""jaxgpt.tokenizer: the lecture's character tokenizer, GPT-2's BPE through tiktoken (offline
with a byte-level stand-in, and GPT-2's real ranks where a copy is beside the checkout), the
JSON a workdir keeps, and clear errors."""

import json
from pathlib import Path

import pytest

from jaxgpt import tokenizer
from jaxgpt.errors import UserError

REAL_BPE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiktoken"  # r50k_base
# the 65 characters of tiny Shakespeare, as the lecture prints them
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


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


def test_the_lectures_encode_and_decode():
    """The lecture: print(encode("hii there")) on Shakespeare's characters, and back."""
    tok = tokenizer.CharTokenizer.from_text(SHAKESPEARE_CHARS[::-1])  # any order: sorted
    assert tok.vocab_size == 65
    assert tok.encode("hii there") == [46, 47, 47, 1, 58, 46, 43, 56, 43]
    assert tok.decode([46, 47, 47, 1, 58, 46, 43, 56, 43]) == "hii there"


@pytest.mark.skipif(not REAL_BPE.is_dir(), reason="GPT-2's BPE ranks are not beside the checkout")
def test_gpt2s_own_ids_offline(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(REAL_BPE))
    tok = tokenizer.BPETokenizer(tiktoken.get_encoding("r50k_base"))
    assert (tok.vocab_size, tok.eot_token) == (50257, 50256)
    assert tok.encode("Hello world<|endoftext|>") == [15496, 995, 50256]  # GPT-2's ids
    assert tok.decode(tok.encode("Hello world, ça va?")) == "Hello world, ça va?"


def test_a_workdirs_tokenizer_file_that_cannot_be_used_says_why(tmp_path):
    with pytest.raises(UserError, match="no tokenizer at"):
        tokenizer.load(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text('{"kind": "char", "chars": ["a"')
    with pytest.raises(UserError, match="not valid JSON"):
        tokenizer.load(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match="unknown tokenizer kind 'words'"):
        tokenizer.from_dict({"kind": "words"})
    gone = {"kind": "gpt2", "directory": str(tmp_path / "moved"), "vocab_size": 300}
    with pytest.raises(UserError, match="no longer in .*moved: put them back"):
        tokenizer.from_dict(gone)
