"""Datasets: text -> tokens -> train/val arrays, and the lecture's random-window batch sampler.

`shakespeare_char` reads `config.data_path` if set, else downloads tiny Shakespeare once into
`config.data_dir` (default ~/.cache/jaxgpt). `char` is any UTF-8 text file, char-level. Both
`data_path` and `data_dir` may be bucket URLs (gs://...): text is read through etils.epath, token
files are copied once into the local cache. `shakespeare` is tiny Shakespeare in GPT-2's BPE
(nanoGPT's data/shakespeare: split 90/10 by characters, each part encoded; small enough to stay
in memory, no token files).
Any other dataset name (`openwebtext`, ...) is a directory of GPT-2 BPE token files
(`train.bin`/`val.bin`, uint16, nanoGPT's format; `python -m jaxgpt.prepare` writes them),
sampled on the host through np.memmap. `batches(...)` picks the batch source the train loop uses.
"""

import dataclasses
import json
import os
import shutil
import threading
import urllib.request
from pathlib import Path
from queue import Full, Queue
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import parallel
from jaxgpt import tokenizer as tokenizers
from jaxgpt.errors import UserError
from jaxgpt.workdir import as_path, is_remote

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
TRAIN_FRACTION = 0.9  # first 90 % train, rest val (the lecture)
CHAR_DATASETS = ("shakespeare_char", "char")
TEXT_DATASETS = (*CHAR_DATASETS, "shakespeare")  # anything else: a directory of BPE .bin files


@dataclasses.dataclass
class Dataset:
    train: np.ndarray  # (N_train,) token ids
    val: np.ndarray  # (N_val,) token ids
    tokenizer: object
    on_host: bool = False  # np.memmap token files: sampled on the host, not put on the device
    batch_source: Any = None  # a task's own batch source class (addition.py); None: text
    evaluate: Any = None  # (model, params) -> {name: value}, reported at every eval (a task's)


def _data_dir(config) -> str:
    return config.data_dir or os.environ.get("JAXGPT_DATA_DIR") or ""


def cache_dir(config) -> Path:
    """The local directory of downloads and token files: data_dir, else ~/.cache/jaxgpt. A
    data_dir in a bucket (gs://...) is mirrored under ~/.cache/jaxgpt/remote/ (np.memmap needs
    local files; bin_dir copies them)."""
    data_dir, home = _data_dir(config), Path.home() / ".cache" / "jaxgpt"
    if is_remote(data_dir):
        return home / "remote" / data_dir.split("://", 1)[1]
    return Path(data_dir) if data_dir else home


def read_text(config) -> str:
    """The dataset's text: `data_path` (local or gs://...), else the cached or downloaded file."""
    if config.data_path:
        path = as_path(config.data_path)
        if not path.is_file():
            raise UserError(f"config.data_path={config.data_path}: no such file; point "
                            "--config.data_path at a UTF-8 text file")
        return read_utf8(path)
    if config.dataset not in ("shakespeare_char", "shakespeare"):
        raise UserError(f"dataset {config.dataset!r} has no download: set "
                        "--config.data_path=/path/to/text.txt")
    path = cache_dir(config) / "shakespeare_char" / "input.txt"
    if not path.is_file():
        _download(SHAKESPEARE_URL, path)
    return read_utf8(path)


def read_utf8(path) -> str:
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


def load_dataset(config, tokenizer=None) -> Dataset:
    """Tokenize the text and split it 90/10 (text datasets), or open prepared BPE bins.

    `tokenizer`: the vocabulary of weights the run starts from (pretrained.py), which the data
    must be encoded with; by default the text's own characters (char datasets), GPT-2's BPE
    (`shakespeare`), or the bins' meta.json.
    """
    if config.dataset == "addition":  # the lecture's exercise 2: a+b=c problems
        from jaxgpt import addition
        return addition.load(config)
    if config.dataset not in TEXT_DATASETS:
        return _check_tokenizer(load_bins(config), tokenizer, config)
    text = read_text(config)
    bpe = config.dataset == "shakespeare"
    tok = tokenizer or (tokenizers.BPETokenizer() if bpe else _char_tokenizer(config, text))
    if (tok.kind == "char") == bpe:
        raise UserError(f"dataset {config.dataset!r} is {'BPE' if bpe else 'character-level'} "
                        f"but init_from={config.init_from}'s vocabulary is "
                        f"{'characters' if bpe else 'GPT-2 BPE'}: pick a "
                        f"{'character-level' if bpe else 'BPE'} dataset")
    n = int(TRAIN_FRACTION * len(text))  # by characters, then encoded: nanoGPT's prepare.py
    try:
        train, val = (np.array(tok.encode(t), dtype=np.int32) for t in (text[:n], text[n:]))
    except UserError as e:  # only another run's characters can miss some of this text's
        raise UserError(f"{e}; or pretrain the run init_from names with "
                        "--config.vocab_path=<this text>, so its vocabulary covers it") from None
    for name, split in (("train", train), ("val", val)):
        if len(split) <= config.block_size + 1:
            raise UserError(f"the {name} split has {len(split)} tokens, fewer than block_size+2="
                            f"{config.block_size + 2}: use more text or a smaller block_size")
    return Dataset(train=train, val=val, tokenizer=tok)


def _char_tokenizer(config, text: str):
    """The sorted characters of the text, and of `vocab_path` if given (a text to finetune on
    later, so the two runs share one vocabulary)."""
    if not config.vocab_path:
        return tokenizers.CharTokenizer.from_text(text)
    path = as_path(config.vocab_path)
    if not path.is_file():
        raise UserError(f"config.vocab_path={config.vocab_path}: no such file")
    return tokenizers.CharTokenizer.from_text(text + read_utf8(path))


def _check_tokenizer(dataset: Dataset, tokenizer, config) -> Dataset:
    """BPE token files with the weights' vocabulary: the same kind and size, or an error."""
    if tokenizer is None:
        return dataset
    if (tokenizer.kind, tokenizer.vocab_size) != (dataset.tokenizer.kind,
                                                  dataset.tokenizer.vocab_size):
        raise UserError(f"the token files of dataset {config.dataset!r} use a vocabulary of "
                        f"{dataset.tokenizer.vocab_size} {dataset.tokenizer.kind} tokens, "
                        f"init_from={config.init_from}'s weights one of {tokenizer.vocab_size} "
                        f"{tokenizer.kind} tokens: prepare the data with the weights' vocabulary")
    return dataclasses.replace(dataset, tokenizer=tokenizer)


def get_batch(data: jax.Array, key: jax.Array, batch_size: int, block_size: int):
    """B random windows of T+1 tokens: x = w[:, :-1], y = w[:, 1:] (the lecture's get_batch).

    Pure and jittable, so the batch can be drawn inside the compiled train step.
    """
    ix = jax.random.randint(key, (batch_size,), 0, data.shape[0] - block_size)  # (B,)
    window = jax.vmap(lambda i: jax.lax.dynamic_slice(data, (i,), (block_size + 1,)))(ix)
    window = window.astype(jnp.int32)  # (B, T+1)
    return window[:, :-1], window[:, 1:]  # (B, T), (B, T)


# ---------------------------------------------------------------------------------------------
# GPT-2 BPE token files (nanoGPT's format, written by jaxgpt/prepare.py), read by np.memmap

BIN_DTYPE = np.uint16  # GPT-2's 50257 ids fit; nanoGPT's data/openwebtext/prepare.py writes this


BIN_FILES = ("train.bin", "val.bin", "meta.json")


def bin_dir(config) -> Path:
    """Where a BPE dataset's bins live: `data_dir` itself, or `data_dir/DATASET` (nanoGPT's
    data/openwebtext layout), with data_dir defaulting to ~/.cache/jaxgpt; a data_dir in a
    bucket is copied to the local mirror first (once; again if a file's size changed)."""
    root = cache_dir(config)
    if is_remote(_data_dir(config)):
        remote = as_path(_data_dir(config))
        nested = not (remote / "train.bin").exists()
        _mirror(remote / config.dataset if nested else remote,
                root / config.dataset if nested else root)
    return root if (root / "train.bin").is_file() else root / config.dataset


def _mirror(src, dst: Path) -> None:
    for name in BIN_FILES:
        if not (src / name).exists():
            continue
        size = (src / name).stat().length
        if (dst / name).is_file() and (dst / name).stat().st_size == size:
            continue
        if parallel.is_main_process():
            print(f"copying {src / name} ({size / 1e9:.2f} GB) to {dst} (once)", flush=True)
        dst.mkdir(parents=True, exist_ok=True)
        tmp = dst / f"{name}.part{os.getpid()}"
        with (src / name).open("rb") as f, tmp.open("wb") as out:
            shutil.copyfileobj(f, out, 2**24)
        tmp.replace(dst / name)  # never a half-copied file under the real name


def load_bins(config) -> Dataset:
    """Open train.bin / val.bin as read-only memmaps: nothing is read until a batch is drawn."""
    d = bin_dir(config)
    if not (d / "train.bin").is_file() or not (d / "val.bin").is_file():
        raise UserError(f"config.dataset={config.dataset!r}: no train.bin/val.bin in {d}; "
                        f"prepare them with `python -m jaxgpt.prepare TEXT {d}` or set "
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
# Batch sources. Both feed the same compiled multi-step train call (training.train_steps): the
# call takes `train_data(step, n)` as an argument and `train_batch(data, i, key)` gives step i's
# (x, y), each (A, B, T) = (gradient accumulation, batch, block). The step never knows where its
# batch came from.


def eval_batches_per_call(eval_iters: int) -> int:
    """An eval runs as several compiled calls of this many batches (the largest divisor of
    eval_iters up to 10), so the loop can show its progress and time it early."""
    return max(d for d in range(1, min(eval_iters, 10) + 1) if eval_iters % d == 0)


class DeviceBatches:
    """Small datasets (a character-level text): both splits replicated on every device, each
    batch drawn inside the compiled call from the step's key, with no host work between steps."""

    def __init__(self, dataset: Dataset, config, mesh):
        self.splits = {"train": parallel.put_replicated(dataset.train, mesh),
                       "val": parallel.put_replicated(dataset.val, mesh)}
        self.accum, self.batch_size = config.gradient_accumulation_steps, config.batch_size
        self.block_size, self.mesh = config.block_size, mesh
        self.eval_iters = config.eval_iters

    def train_data(self, step: int, n: int):
        return self.splits["train"]

    def eval_data(self, split: str, keys):
        return self.splits[split]

    def _draw(self, data, key, shape):
        x, y = get_batch(data, key, int(np.prod(shape)), self.block_size)  # (A*B, T)
        sharding = parallel.batch_sharding(self.mesh, leading=len(shape) - 1)
        return tuple(jax.lax.with_sharding_constraint(t.reshape(*shape, self.block_size),
                                                      sharding) for t in (x, y))

    def train_batch(self, data, i, key):
        return self._draw(data, key, (self.accum, self.batch_size))  # (A, B, T) each

    def eval_batch(self, data, i, key):
        return self._draw(data, key, (self.batch_size,))  # (B, T) each

    def close(self):
        pass


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
    """Token files (np.memmap) too large for the device: batches sampled on the host, a thread
    `prefetch` steps ahead of the device; each process reads only its rows of the global batch
    and `make_array_from_process_local_data` assembles it."""

    def __init__(self, dataset: Dataset, config, mesh, prefetch: int = 4):
        self.splits = {"train": dataset.train, "val": dataset.val}
        self.seed, self.block_size = config.seed, config.block_size
        self.shape = (config.gradient_accumulation_steps, config.batch_size)  # (A, B)
        self.eval_iters = config.eval_iters
        self.eval_shape = (eval_batches_per_call(config.eval_iters), config.batch_size)
        self.sharding = parallel.batch_sharding(mesh, leading=2)  # (n, A, B, T): B split
        self.rows = parallel.local_rows(self.sharding, (1, *self.shape, 1), axis=2)
        self.eval_sharding = parallel.batch_sharding(mesh, leading=1)  # (E, B, T)
        self.eval_rows = parallel.local_rows(self.eval_sharding, (*self.eval_shape, 1), axis=1)
        self.prefetch = prefetch
        self.thread, self.next_step = None, None

    def _produce(self, step, queue, stop):
        while not stop.is_set():
            try:
                item = local_batch(self.splits["train"], (self.seed, 0), step, self.shape,
                                   self.block_size, self.rows)
            except Exception as e:  # surfaces in train_data(), in the training thread
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

    def train_data(self, step: int, n: int):
        """(x, y) for steps step..step+n-1, each a global (n, A, B, T) int32 array."""
        if self.thread is None or step != self.next_step:  # first call, or a resumed run
            self._restart(step)
        items = [self.queue.get() for _ in range(n)]
        for item in items:
            if isinstance(item, Exception):
                raise item
        self.next_step = step + n
        shape = (n, *self.shape, self.block_size)
        return tuple(parallel.put_process_local(np.stack(t), self.sharding, shape)
                     for t in zip(*items))  # (n, A, r, T) local -> (n, A, B, T) global

    def eval_data(self, split: str, keys):
        """(x, y), each (E, B, T), the E batches of one eval call: their windows come from the
        call's first key."""
        seed = (self.seed, 1, *np.asarray(jax.random.key_data(keys[0])).tolist())
        local = local_batch(self.splits[split], seed, 0, self.eval_shape, self.block_size,
                            self.eval_rows)
        return tuple(parallel.put_process_local(t, self.eval_sharding,
                                                (*self.eval_shape, self.block_size))
                     for t in local)

    def train_batch(self, data, i, key):
        return data[0][i], data[1][i]  # (A, B, T) each

    eval_batch = train_batch  # (B, T) each

    def close(self):
        """Stop the prefetch thread (the loop calls it when it ends)."""
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.thread = None


def batches(dataset: Dataset, config, mesh):
    """The batch source for a dataset: a task's own, on the host for token files, else on the
    device."""
    source = dataset.batch_source or (HostBatches if dataset.on_host else DeviceBatches)
    return source(dataset, config, mesh)
