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

    def encode_ordinary(self, s: str) -> list[int]:
        """Every character as text, "<|endoftext|>" too (nanoGPT's prepare.py encodes so)."""
        return self._enc.encode_ordinary(s)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def to_dict(self) -> dict:
        if self.directory:  # where the tables are, and their size in case they move
            return {"kind": self.kind, "directory": self.directory, "vocab_size": self.vocab_size}
        return {"kind": self.kind}


HF_BPE_FILES = ("merges.txt", "vocab.json")  # tiktoken's vocab.bpe and encoder.json, renamed


def has_bpe_files(directory) -> bool:
    return all((Path(directory) / f).is_file() for f in HF_BPE_FILES)


# GPT-2's regex for splitting text before BPE (tiktoken's r50k_base / gpt2)
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_decoder() -> dict[str, int]:
    """OpenAI's encoder.py bytes_to_unicode, inverted: vocab.json spells each byte as a
    printable character; this maps those characters back to the bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):  # the others are spelled from chr(256) on
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _bpe_ranks(directory) -> tuple[dict[bytes, int], int]:
    """vocab.json's tokens as bytes -> id (tiktoken's ranks), and <|endoftext|>'s id. tiktoken
    merges the pair of lowest rank first, GPT-2's BPE the earliest line of merges.txt: the two
    agree when the merged tokens' ids rise with the line number, which is checked."""
    vocab = json.loads((Path(directory) / "vocab.json").read_text(encoding="utf-8"))
    lines = (Path(directory) / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [line.split() for line in lines if line and not line.startswith("#version")]
    eot = vocab.pop("<|endoftext|>", None)
    decode = _byte_decoder()
    ranks = {bytes(decode[ch] for ch in token): i for token, i in vocab.items()
             if not (token.startswith("<|") and token.endswith("|>"))}
    if len(ranks) != len(vocab) or sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("vocab.json's ids are not 0..n-1 without gaps")
    merged = [vocab["".join(pair)] for pair in merges]  # KeyError: a merge missing from vocab
    if any(a >= b for a, b in zip(merged, merged[1:])) or any(len(p) != 2 for p in merges):
        raise ValueError("merges.txt's order is not vocab.json's id order")
    return ranks, len(ranks) if eot is None else eot


def gpt2_encoding_from_files(directory):
    """A tiktoken Encoding from a Hugging Face GPT-2 directory's merges.txt + vocab.json (the
    two files tiktoken downloads for GPT-2, vocab.bpe and encoder.json, under Hugging Face's
    names), built through tiktoken's public Encoding from ranks read here."""
    try:
        import tiktoken
    except ImportError as e:
        raise UserError("GPT-2 BPE needs tiktoken: pip install 'jaxgpt[bpe]'") from e
    try:
        ranks, eot = _bpe_ranks(directory)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{directory}: merges.txt and vocab.json do not form a GPT-2 BPE "
                        f"vocabulary ({type(e).__name__}: {str(e)[:80]})") from None
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": eot})


def gpt2_bpe_files(encoding=None) -> dict[str, str]:
    """GPT-2's tables as Hugging Face's vocab.json + merges.txt texts, from tiktoken's ranks.
    Each merge is recovered from its token: BPE over the token's bytes with only the lower
    ranks stops at exactly two parts, the pair merged last."""
    enc = encoding or _gpt2_encoding()
    eot = enc.eot_token
    tokens = [enc.decode_single_token_bytes(i) for i in range(eot)]
    ranks = {t: i for i, t in enumerate(tokens)}
    spell = {b: ch for ch, b in _byte_decoder().items()}

    def text(t: bytes) -> str:
        return "".join(spell[b] for b in t)

    merges = []
    for rank, token in enumerate(tokens[256:], start=256):
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = zip(parts, parts[1:])
            _, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(pairs))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append(f"{text(parts[0])} {text(parts[1])}\n")
    vocab = {text(t): i for i, t in enumerate(tokens)} | {"<|endoftext|>": eot}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(merges)}


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
    except Exception:  # noqa: BLE001  tiktoken fetches its files once, then caches them
        pass
    try:  # the same ranks, pattern and <|endoftext|> from another file, which may be cached
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:  # noqa: BLE001
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
