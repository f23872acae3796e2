"""Tokenizers: the lecture's character-level one, and GPT-2's BPE through tiktoken.

Both encode str -> list[int] and decode list[int] -> str, and serialise to a small JSON dict so a
workdir carries what sample.py needs to turn tokens back into text.
"""

import functools
import json
import os
import tempfile
from pathlib import Path

from etils import epath

from jaxgpt.errors import UserError


class CharTokenizer:
    """Every distinct character of the text, sorted, is one token (the lecture's stoi / itos)."""

    kind = "char"

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.itos = dict(enumerate(self.chars))

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> list[int]:
        unknown = sorted(set(s) - self.stoi.keys())
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise UserError(f"text has characters outside the vocabulary: {shown} (the model "
                            f"knows {self.vocab_size} characters); remove or replace them")
        return [self.stoi[c] for c in s]

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


GPT2_VOCAB_SIZE = 50257
GPT2_EOT_TOKEN = 50256  # <|endoftext|>


class BPETokenizer:
    """GPT-2's byte-pair encoding (50257 tokens) through tiktoken: any text encodes."""

    kind = "gpt2"

    def __init__(self, encoding=None, *, lazy: bool = False, directory=None):
        """`encoding`: a tiktoken Encoding to use instead of GPT-2's (tests, custom vocabularies).
        `lazy`: load GPT-2's tables on the first encode/decode, so training on prepared token
        files (which needs only the vocabulary size) works offline. `directory`: a Hugging Face
        GPT-2 directory whose merges.txt + vocab.json are the tables (no download)."""
        self.directory = str(Path(directory).absolute()) if directory else None
        if self.directory:
            self._enc = gpt2_encoding_from_files(self.directory)
        elif encoding is not None or not lazy:
            self._enc = encoding or _gpt2_encoding()

    @functools.cached_property
    def _enc(self):
        return _gpt2_encoding()

    @property
    def vocab_size(self) -> int:
        loaded = self.__dict__.get("_enc")
        return loaded.n_vocab if loaded is not None else GPT2_VOCAB_SIZE

    @property
    def eot_token(self) -> int:
        loaded = self.__dict__.get("_enc")
        return loaded.eot_token if loaded is not None else GPT2_EOT_TOKEN

    def encode(self, s: str) -> list[int]:
        return self._enc.encode(s, allowed_special={"<|endoftext|>"})

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def to_dict(self) -> dict:
        if self.directory:  # where the tables are, and their size in case they move
            return {"kind": self.kind, "directory": self.directory, "vocab_size": self.vocab_size}
        return {"kind": self.kind}


HF_BPE_FILES = ("merges.txt", "vocab.json")  # tiktoken's vocab.bpe and encoder.json, renamed


def has_bpe_files(directory) -> bool:
    return all((Path(directory) / f).is_file() for f in HF_BPE_FILES)


def gpt2_encoding_from_files(directory):
    """A tiktoken Encoding from a Hugging Face GPT-2 directory's merges.txt + vocab.json.

    These are the two files tiktoken downloads for GPT-2 (vocab.bpe, encoder.json) under
    Hugging Face's names; <|endoftext|> is the id after the last merge (50256 for GPT-2).
    """
    try:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError as e:
        raise UserError("GPT-2 BPE needs tiktoken: pip install 'jaxgpt[bpe]'") from e
    merges, vocab = (str(Path(directory) / f) for f in HF_BPE_FILES)
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local files as they are, copy nothing
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(merges, vocab)
    except (OSError, ValueError, KeyError, AssertionError) as e:
        raise UserError(f"{directory}: merges.txt and vocab.json do not form a GPT-2 BPE "
                        f"vocabulary ({type(e).__name__}: {str(e)[:80]})") from None
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def tiktoken_cache_dir() -> str:
    """Where tiktoken keeps (and looks for) its downloaded vocabulary files."""
    return os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _gpt2_encoding():
    try:
        import tiktoken
    except ImportError as e:
        raise UserError("GPT-2 BPE needs tiktoken: pip install 'jaxgpt[bpe]'") from e
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001  tiktoken fetches its files once, then caches them
        raise UserError(f"GPT-2's BPE vocabulary is not in tiktoken's cache "
                        f"{tiktoken_cache_dir()} and could not be downloaded "
                        f"({type(e).__name__}); offline? copy that cache from a machine where "
                        "tiktoken.get_encoding('gpt2') ran and set TIKTOKEN_CACHE_DIR to it, or "
                        "start from a GPT-2 directory with merges.txt + vocab.json") from None


def from_dict(d: dict):
    if d.get("kind") == "char":
        return CharTokenizer(d["chars"])
    if d.get("kind") == "gpt2":
        directory = d.get("directory")
        if directory and has_bpe_files(directory):
            return BPETokenizer(directory=directory)
        if d.get("vocab_size", GPT2_VOCAB_SIZE) != GPT2_VOCAB_SIZE:
            raise UserError(f"the BPE vocabulary's files (merges.txt, vocab.json) are no longer "
                            f"in {directory}: put them back there")
        return BPETokenizer()  # GPT-2's own vocabulary, through tiktoken
    raise UserError(f"unknown tokenizer kind {d.get('kind')!r} in tokenizer JSON")


def load(path):
    try:
        return from_dict(json.loads(epath.Path(path).read_text()))
    except FileNotFoundError:
        raise UserError(f"no tokenizer at {path}: is this a jaxgpt workdir?") from None
    except json.JSONDecodeError as e:
        raise UserError(f"tokenizer file {path} is not valid JSON ({e})") from None
