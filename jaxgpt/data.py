"""Datasets: text -> tokens -> train/val arrays (the lecture's 90/10 split), or token files.

`shakespeare_char` reads `config.data_path` if set, else downloads tiny Shakespeare once into
`config.data_dir` (default ~/.cache/jaxgpt). `char` is any UTF-8 text file, char-level. Both
`data_path` and `data_dir` may be bucket URLs (gs://...): text is read through etils.epath, token
files are copied once into the local cache. `shakespeare` is tiny Shakespeare in GPT-2's BPE
(nanoGPT's data/shakespeare: split 90/10 by characters, each part encoded; small enough to stay
in memory, no token files).
Any other dataset name (`openwebtext`, ...) is a directory of GPT-2 BPE token files
(`train.bin`/`val.bin`, uint16, nanoGPT's format; `python -m jaxgpt.prepare` writes them),
sampled on the host through np.memmap. batches.py turns a Dataset into batches; datasets.py
finds a dataset's loader by name.
"""

import dataclasses
import json
import os
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxgpt import bins, parallel
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
    # np.memmap token files: sampled on the host, not put on the device
    on_host: bool = False
    # a task's examples: draw(data, key, n) -> x, y (n, T), traced in the compiled call
    # (addition.py); None: the lecture's random text windows (batches.get_batch)
    draw: Callable | None = None


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
        download(SHAKESPEARE_URL, path)
    return read_utf8(path)


def read_utf8(path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def download(url: str, path: Path,
             instead: str = "pass a local copy with --config.data_path=/path/to/input.txt"
             ) -> None:
    """`url` into `path`, once; offline, a UserError ending in what to do `instead`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            tmp.write_bytes(r.read())
    except OSError as e:
        raise UserError(f"could not download {url} ({e}); offline? {instead}") from None
    tmp.replace(path)  # never leave a half-written file where a good one is expected


def load_text(config, tokenizer=None) -> Dataset:
    """Tokenize the text and split it 90/10 (by characters, then encoded: nanoGPT's prepare.py).

    `tokenizer`: the vocabulary of weights the run starts from (pretrained.py), which the data
    must be encoded with; by default the text's own characters (char datasets) or GPT-2's BPE
    (`shakespeare`).
    """
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


# ---------------------------------------------------------------------------------------------
# GPT-2 BPE token files (nanoGPT's format, written by jaxgpt/prepare.py), read by np.memmap

BIN_DTYPE = bins.BIN_DTYPE
BIN_FILES = ("train.bin", "val.bin", bins.META)


def bin_dir(config) -> Path:
    """Where a BPE dataset's bins live: `data_dir` itself, or `data_dir/DATASET` (nanoGPT's
    data/openwebtext layout), with data_dir defaulting to ~/.cache/jaxgpt; a data_dir in a
    bucket is copied to the local mirror first (once; again if a file's size changed)."""
    root = cache_dir(config)
    if is_remote(_data_dir(config)):
        remote = as_path(_data_dir(config))
        nested = not (remote / "train.bin").exists() and not (remote / bins.META).exists()
        _mirror(remote / config.dataset if nested else remote,
                root / config.dataset if nested else root)
    return root if _has_bins(root) else root / config.dataset


def _has_bins(d: Path) -> bool:
    return (d / "train.bin").is_file() or bool(bins.read_meta(d).get("files"))


def _mirror(src, dst: Path) -> None:
    meta = json.loads((src / bins.META).read_text()) if (src / bins.META).exists() else {}
    listed = [f["name"] for split in meta.get("files", {}).values() for f in split]
    for name in dict.fromkeys([*BIN_FILES, *listed]):  # the bins, and shards meta.json lists
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


def load_bins(config, tokenizer=None) -> Dataset:
    """Open the train and val token files as read-only memmaps (several shards: one `Shards`
    per split): nothing is read until a batch is drawn. `tokenizer` (the weights' a run starts
    from) must match the bins' meta.json."""
    d = bin_dir(config)
    meta = bins.read_meta(d)
    if not all(bins.has_split(d, split, meta) for split in bins.SPLITS):
        raise UserError(f"config.dataset={config.dataset!r}: no train.bin/val.bin in {d}; "
                        f"prepare them with `python -m jaxgpt.prepare TEXT {d}` or set "
                        "--config.data_dir (char-level datasets: shakespeare_char, char)")
    kind = meta.get("tokenizer", {"kind": "gpt2"})
    # GPT-2's tables load on the first encode/decode: training needs only the vocabulary size
    tok = tokenizers.BPETokenizer(lazy=True) if kind == {"kind": "gpt2"} else \
        tokenizers.from_dict(kind)
    train, val = (bins.open_split(d, split, meta) for split in bins.SPLITS)
    for name, split in (("train", train), ("val", val)):
        if isinstance(split, bins.Shards):  # windows stay inside a shard
            if split.num_starts(config.block_size) < 2:
                raise UserError(f"{d / name}_*.bin: fewer than two windows of block_size+1="
                                f"{config.block_size + 1} tokens fit in its shards: prepare "
                                "larger shards (--shard_tokens) or use a smaller block_size")
        elif len(split) <= config.block_size + 1:
            raise UserError(f"{d / name}.bin has {len(split)} tokens, fewer than block_size+2="
                            f"{config.block_size + 2}: use more text or a smaller block_size")
    return _check_tokenizer(Dataset(train=train, val=val, tokenizer=tok, on_host=True),
                            tokenizer, config)
