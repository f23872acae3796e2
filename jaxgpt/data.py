"""Datasets: text -> tokens -> train/val arrays, and the lecture's random-window batch sampler.

`shakespeare_char` reads `config.data_path` if set, else downloads tiny Shakespeare once into
`config.data_dir` (default ~/.cache/jaxgpt). `char` is any local UTF-8 text file, char-level.
"""

import dataclasses
import os
import urllib.request
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import tokenizer as tokenizers
from jaxgpt.errors import UserError

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
TRAIN_FRACTION = 0.9  # first 90 % train, rest val (the lecture)


@dataclasses.dataclass
class Dataset:
    train: np.ndarray  # (N_train,) token ids
    val: np.ndarray  # (N_val,) token ids
    tokenizer: object


def cache_dir(config) -> Path:
    return Path(config.data_dir or os.environ.get("JAXGPT_DATA_DIR") or
                Path.home() / ".cache" / "jaxgpt")


def read_text(config) -> str:
    """The dataset's text: the local `data_path`, else the cached or downloaded file."""
    if config.data_path:
        path = Path(config.data_path).expanduser()
        if not path.is_file():
            raise UserError(f"config.data_path={config.data_path}: no such file; point "
                            "--config.data_path at a UTF-8 text file")
        return _read_utf8(path)
    if config.dataset != "shakespeare_char":
        raise UserError(f"dataset {config.dataset!r} has no download: set "
                        "--config.data_path=/path/to/text.txt")
    path = cache_dir(config) / "shakespeare_char" / "input.txt"
    if not path.is_file():
        _download(SHAKESPEARE_URL, path)
    return _read_utf8(path)


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _download(url: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            tmp.write_bytes(r.read())
    except OSError as e:
        raise UserError(f"could not download {url} ({e}); offline? pass a local copy with "
                        "--config.data_path=/path/to/input.txt") from None
    tmp.replace(path)  # never leave a half-written file where a good one is expected


def load_dataset(config) -> Dataset:
    """Tokenize the text and split it 90/10; every char-level dataset goes through here."""
    if config.dataset not in ("shakespeare_char", "char"):
        raise UserError(f"config.dataset={config.dataset!r}: must be shakespeare_char or char")
    text = read_text(config)
    tok = tokenizers.CharTokenizer.from_text(text)
    data = np.array(tok.encode(text), dtype=np.int32)
    n = int(TRAIN_FRACTION * len(data))
    train, val = data[:n], data[n:]
    for name, split in (("train", train), ("val", val)):
        if len(split) <= config.block_size + 1:
            raise UserError(f"the {name} split has {len(split)} tokens, fewer than block_size+2="
                            f"{config.block_size + 2}: use more text or a smaller block_size")
    return Dataset(train=train, val=val, tokenizer=tok)


def get_batch(data: jax.Array, key: jax.Array, batch_size: int, block_size: int):
    """B random windows of T+1 tokens: x = w[:, :-1], y = w[:, 1:] (the lecture's get_batch).

    Pure and jittable, so the batch can be drawn inside the compiled train step.
    """
    ix = jax.random.randint(key, (batch_size,), 0, data.shape[0] - block_size)  # (B,)
    window = jax.vmap(lambda i: jax.lax.dynamic_slice(data, (i,), (block_size + 1,)))(ix)
    window = window.astype(jnp.int32)  # (B, T+1)
    return window[:, :-1], window[:, 1:]  # (B, T), (B, T)


def synthetic_text(n_chars: int = 5000, seed: int = 0) -> str:
    """A small learnable text for tests: short words from a fixed vocabulary, with newlines."""
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    out, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(words, size=rng.integers(3, 8))) + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:n_chars]
