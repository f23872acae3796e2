"""Tokenizers: the lecture's character-level one, and GPT-2's BPE through tiktoken.

Both encode str -> list[int] and decode list[int] -> str, and serialise to a small JSON dict so a
workdir carries what sample.py needs to turn tokens back into text.
"""

import functools
import json

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

    def __init__(self, encoding=None, *, lazy: bool = False):
        """`encoding`: a tiktoken Encoding to use instead of GPT-2's (tests, custom vocabularies).
        `lazy`: load GPT-2's tables on the first encode/decode, so training on prepared token
        files (which needs only the vocabulary size) works offline."""
        if encoding is not None or not lazy:
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
        return {"kind": self.kind}


def _gpt2_encoding():
    try:
        import tiktoken
    except ImportError as e:
        raise UserError("GPT-2 BPE needs tiktoken: pip install 'jaxgpt[bpe]'") from e
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken fetches its vocabulary files once, then caches them
        raise UserError(f"could not load GPT-2's BPE vocabulary ({type(e).__name__}); offline? "
                        "copy tiktoken's cache to this machine and set TIKTOKEN_CACHE_DIR") from None


def from_dict(d: dict):
    if d.get("kind") == "char":
        return CharTokenizer(d["chars"])
    if d.get("kind") == "gpt2":
        return BPETokenizer()
    raise UserError(f"unknown tokenizer kind {d.get('kind')!r} in tokenizer JSON")


def load(path):
    try:
        return from_dict(json.loads(epath.Path(path).read_text()))
    except FileNotFoundError:
        raise UserError(f"no tokenizer at {path}: is this a jaxgpt workdir?") from None
    except json.JSONDecodeError as e:
        raise UserError(f"tokenizer file {path} is not valid JSON ({e})") from None
