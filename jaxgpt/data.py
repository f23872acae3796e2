"""Datasets: text -> tokens -> train/val arrays, and the lecture's random-window batch sampler.

`shakespeare_char` reads `config.data_path` if set, else downloads tiny Shakespeare once into
`config.data_dir` (default ~/.cache/jaxgpt). `char` is any local UTF-8 text file, char-level.
Any other dataset name (`openwebtext`, ...) is a directory of GPT-2 BPE token files
(`train.bin`/`val.bin`, uint16, nanoGPT's format; `prepare_bpe` or `python -m jaxgpt.data
prepare` writes them), sampled on the host through np.memmap.
"""

import dataclasses
import json
import os
import sys
import threading
import urllib.request
from pathlib import Path
from queue import Full, Queue

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import parallel
from jaxgpt import tokenizer as tokenizers
from jaxgpt.errors import UserError

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
TRAIN_FRACTION = 0.9  # first 90 % train, rest val (the lecture)
CHAR_DATASETS = ("shakespeare_char", "char")  # anything else is a directory of BPE .bin files


@dataclasses.dataclass
class Dataset:
    train: np.ndarray  # (N_train,) token ids
    val: np.ndarray  # (N_val,) token ids
    tokenizer: object
    on_host: bool = False  # np.memmap token files: sampled on the host, not put on the device


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
    """Tokenize the text and split it 90/10 (char-level datasets), or open prepared BPE bins."""
    if config.dataset not in CHAR_DATASETS:
        return load_bins(config)
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


# ---------------------------------------------------------------------------------------------
# GPT-2 BPE token files (nanoGPT's format): train.bin / val.bin, flat uint16, read by np.memmap

BIN_DTYPE = np.uint16  # GPT-2's 50257 ids fit; nanoGPT's data/openwebtext/prepare.py writes this
TEXT_SUFFIXES = (".txt", ".jsonl")


def _text_chunks(path: Path, chunk_bytes: int = 2**24):
    """A text file in pieces of about `chunk_bytes`, cut after a newline (memory stays flat on
    a multi-GB file; BPE may merge differently only across the few cuts)."""
    if path.stat().st_size <= chunk_bytes:
        yield _read_utf8(path)
        return
    with path.open(encoding="utf-8") as f:
        while chunk := "".join(f.readlines(chunk_bytes)):
            yield chunk


def _documents(source: Path):
    """Yield the source's documents, each as a list of text pieces: a .txt file is one, a .jsonl
    file one per line ("text" field, as a Hugging Face dataset exports with `ds.to_json`), a
    directory all of those in it."""
    files = sorted(p for p in source.rglob("*") if p.suffix in TEXT_SUFFIXES) \
        if source.is_dir() else [source]
    if not files or not all(f.is_file() for f in files):
        raise UserError(f"{source}: no .txt or .jsonl files; pass a text file, a JSONL file "
                        "with a 'text' field per line, or a directory of them")
    for f in files:
        if f.suffix == ".jsonl":
            with f.open(encoding="utf-8") as lines:
                for n, line in enumerate(lines, 1):
                    if line.strip():
                        try:
                            yield [json.loads(line)["text"]]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise UserError(f"{f}:{n}: not a JSON object with a 'text' field")
        else:
            yield _text_chunks(f)


def prepare_bpe(source, out_dir, val_fraction: float = 0.1, tokenizer=None) -> dict:
    """Tokenize local text with GPT-2's BPE into OUT_DIR/{train,val}.bin (uint16) + meta.json.

    As nanoGPT's prepare.py: every document ends with the end-of-text token; the first
    (1 - val_fraction) of the tokens are train, the rest val (OpenWebText: val_fraction=0.0005).
    Tokens stream to disk, so the corpus never has to fit in memory. `tokenizer`: GPT-2's BPE
    unless given (tests pass one that needs no download).
    """
    source, out_dir = Path(source).expanduser(), Path(out_dir).expanduser()
    if not source.exists():
        raise UserError(f"{source}: no such file or directory")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction}: must be between 0 and 1")
    tok = tokenizer or tokenizers.BPETokenizer()
    out_dir.mkdir(parents=True, exist_ok=True)
    all_path = out_dir / "all.bin.part"
    with all_path.open("wb") as f:
        for doc in _documents(source):
            for piece in doc:
                f.write(np.array(tok.encode(piece), dtype=BIN_DTYPE).tobytes())
            f.write(np.array([tok.eot_token], dtype=BIN_DTYPE).tobytes())
    tokens = np.memmap(all_path, dtype=BIN_DTYPE, mode="r")
    n_val = max(1, int(len(tokens) * val_fraction))
    n_train = len(tokens) - n_val
    for name, part in (("train", tokens[:n_train]), ("val", tokens[n_train:])):
        tmp = out_dir / f"{name}.bin.part"
        part.tofile(tmp)
        tmp.replace(out_dir / f"{name}.bin")
    del tokens
    all_path.unlink()
    meta = {"tokenizer": tok.to_dict(), "vocab_size": tok.vocab_size, "dtype": "uint16",
            "train_tokens": n_train, "val_tokens": n_val}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def bin_dir(config) -> Path:
    """Where a BPE dataset's bins live: `data_dir` itself, or `data_dir/DATASET` (nanoGPT's
    data/openwebtext layout), with data_dir defaulting to ~/.cache/jaxgpt."""
    root = cache_dir(config)
    return root if (root / "train.bin").is_file() else root / config.dataset


def load_bins(config) -> Dataset:
    """Open train.bin / val.bin as read-only memmaps: nothing is read until a batch is drawn."""
    d = bin_dir(config)
    if not (d / "train.bin").is_file() or not (d / "val.bin").is_file():
        raise UserError(f"config.dataset={config.dataset!r}: no train.bin/val.bin in {d}; "
                        f"prepare them with `python -m jaxgpt.data prepare TEXT {d}` or set "
                        "--config.data_dir (char-level datasets: shakespeare_char, char)")
    meta_path = d / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}  # nanoGPT's bins
    kind = meta.get("tokenizer", {"kind": "gpt2"})
    # GPT-2's tables load on the first encode/decode: training needs only the vocabulary size
    tok = tokenizers.BPETokenizer(lazy=True) if kind == {"kind": "gpt2"} else \
        tokenizers.from_dict(kind)
    train, val = (np.memmap(d / f"{name}.bin", dtype=BIN_DTYPE, mode="r")
                  for name in ("train", "val"))
    for name, split in (("train", train), ("val", val)):
        if len(split) <= config.block_size + 1:
            raise UserError(f"{d / name}.bin has {len(split)} tokens, fewer than block_size+2="
                            f"{config.block_size + 2}: use more text or a smaller block_size")
    return Dataset(train=train, val=val, tokenizer=tok, on_host=True)


# ---------------------------------------------------------------------------------------------
# Host-side batches for memmapped data: each process reads only its rows of the global batch


def local_batch(data: np.ndarray, seed, step: int, shape, block_size: int, rows: np.ndarray):
    """Rows `rows` (of the last axis of `shape`) of the global batch of `step`: x, y (..., r, T).

    The window offsets of the whole global batch come from (seed, step) alone, so every process
    agrees on them and a run with any number of processes sees the same batches.
    """
    rng = np.random.default_rng([*np.atleast_1d(seed), step])
    offsets = rng.integers(0, len(data) - block_size, size=tuple(shape))[..., rows]  # (..., r)
    window = data[offsets[..., None] + np.arange(block_size + 1)].astype(np.int32)  # (..., r, T+1)
    return window[..., :-1], window[..., 1:]  # (..., r, T), (..., r, T)


class HostBatches:
    """Global (n, A, B, T) batches for steps s, s+1, ...: a thread samples `prefetch` steps ahead
    of the device, each process reads only its rows, `make_array_from_process_local_data`
    assembles the global array."""

    def __init__(self, data, *, seed, accum: int, batch_size: int, block_size: int, sharding,
                 prefetch: int = 4):
        self.data, self.seed, self.block_size = data, seed, block_size
        self.shape = (accum, batch_size)  # (A, B)
        self.sharding = sharding
        self.rows = parallel.local_rows(sharding, (1, accum, batch_size, block_size), axis=2)
        self.prefetch = prefetch
        self.thread, self.next_step = None, None

    def _produce(self, step, queue, stop):
        while not stop.is_set():
            try:
                item = local_batch(self.data, self.seed, step, self.shape, self.block_size,
                                   self.rows)
            except Exception as e:  # surfaces in get(), in the training thread
                item = e
            while not stop.is_set():
                try:
                    queue.put(item, timeout=0.1)
                    break
                except Full:
                    pass
            step += 1

    def _restart(self, step):
        self.close()
        self.queue, self.stop = Queue(maxsize=self.prefetch), threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(step, self.queue, self.stop),
                                       daemon=True)
        self.thread.start()
        self.next_step = step

    def get(self, step: int, n: int):
        """(x, y), each a global (n, A, B, T) int32 array sharded over the batch axis."""
        if self.thread is None or step != self.next_step:
            self._restart(step)
        items = [self.queue.get() for _ in range(n)]
        for item in items:
            if isinstance(item, Exception):
                raise item
        self.next_step = step + n
        shape = (n, *self.shape, self.block_size)
        return tuple(parallel.put_process_local(np.stack(t), self.sharding, shape)
                     for t in zip(*items))  # (n, A, r, T) local -> (n, A, B, T) global

    def close(self):
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.thread = None


def _prepare_main(argv) -> None:
    """python -m jaxgpt.data prepare SOURCE OUT_DIR [--val_fraction F]"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jaxgpt.data",
                                     description="Tokenize local text with GPT-2 BPE into "
                                     "train.bin/val.bin (uint16, nanoGPT's format) + meta.json.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="SOURCE: a .txt file, a .jsonl file with a 'text' "
                          "field per line, or a directory of them")
    prep.add_argument("source")
    prep.add_argument("out_dir")
    prep.add_argument("--val_fraction", type=float, default=0.1,
                      help="0.1 as the lecture; nanoGPT's OpenWebText uses 0.0005")
    args = parser.parse_args(argv)
    try:
        meta = prepare_bpe(args.source, args.out_dir, args.val_fraction)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"train.bin has {meta['train_tokens']:,} tokens, val.bin {meta['val_tokens']:,} "
          f"({args.out_dir})")


if __name__ == "__main__":
    _prepare_main(sys.argv[1:])
