"""Token files: GPT-2 BPE ids as flat uint16 (nanoGPT's format), one split in `train.bin` /
`val.bin` or in shards of a fixed token count (`train_000000.bin`, ...) listed in meta.json.

`SplitWriter` streams a split's tokens into its final file(s) (python -m jaxgpt.prepare);
`open_split` opens them again as np.memmaps (data.load_bins), several shards as one `Shards`.
"""

import json
from pathlib import Path

import numpy as np

from jaxgpt.errors import UserError

BIN_DTYPE = np.uint16  # GPT-2's 50257 ids fit; nanoGPT's data/openwebtext/prepare.py writes this
META = "meta.json"
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def token_files(out_dir: Path) -> list[Path]:
    """What a prepare run writes in out_dir: the bins (single or shards, finished or .part) and
    meta.json."""
    names = [f"{s}{tail}" for s in SPLITS for tail in (".bin", "_*.bin", ".bin.part", "_*.part")]
    return sorted({p for n in [*names, META] for p in out_dir.glob(n) if p.is_file()})


class SplitWriter:
    """A split's tokens, appended in order, into OUT_DIR/{split}.bin (shard_tokens=0) or shards of
    exactly `shard_tokens` tokens (the last one shorter). Each file is written as NAME.part and
    renamed once complete, so a file under its real name is never a truncated one."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int = 0):
        self.out_dir, self.split, self.shard_tokens = Path(out_dir), split, shard_tokens
        self.files: list[dict] = []  # the finished files: {"name", "tokens"}
        self._file, self._name, self._tokens = None, "", 0

    def _open(self) -> None:
        self._name = shard_name(self.split, len(self.files)) if self.shard_tokens else \
            f"{self.split}.bin"
        self._file, self._tokens = (self.out_dir / f"{self._name}.part").open("wb"), 0

    def _finish(self) -> None:
        self._file.close()
        (self.out_dir / f"{self._name}.part").replace(self.out_dir / self._name)
        self.files.append({"name": self._name, "tokens": self._tokens})
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        """Append ids (n,) uint16."""
        ids = np.asarray(ids, dtype=BIN_DTYPE)
        while len(ids):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._tokens if self.shard_tokens else len(ids)
            self._file.write(ids[:room].tobytes())
            self._tokens += min(room, len(ids))
            ids = ids[room:]
            if self._tokens == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict]:
        """Finish the last file (an empty split still gets one) and return all of them."""
        if self._file is None and not self.files:
            self._open()
        if self._file is not None:
            self._finish()
        return self.files

    def abort(self) -> None:
        """Close the file being written, leaving it as .part (an interrupted run)."""
        if self._file is not None:
            self._file.close()


class Shards:
    """A split in several token files, read as one: window starts are numbered through the
    shards in order, and a window never crosses from one shard into the next."""

    def __init__(self, arrays):
        self.arrays = list(arrays)  # each (n_i,) uint16 np.memmap
        self.sizes = np.array([len(a) for a in self.arrays], dtype=np.int64)  # (S,)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def _first_starts(self, block_size: int) -> np.ndarray:
        """(S+1,) the number of the first window start of each shard: shard i has n_i - T
        starts (0..n_i-T-1: a window of T+1 tokens ends inside it), as a single file has."""
        return np.concatenate([[0], np.cumsum(np.maximum(self.sizes - block_size, 0))])

    def num_starts(self, block_size: int) -> int:
        return int(self._first_starts(block_size)[-1])

    def windows(self, starts: np.ndarray, block_size: int) -> np.ndarray:
        """starts (...,) numbers in [0, num_starts) -> (..., T+1) tokens, each shard read once."""
        first = self._first_starts(block_size)
        shard = np.searchsorted(first, starts, side="right") - 1  # (...,)
        offset = starts - first[shard]  # (...,) into that shard
        out = np.empty((*starts.shape, block_size + 1), dtype=BIN_DTYPE)
        for s in np.unique(shard):
            here = shard == s
            out[here] = self.arrays[s][offset[here][:, None] + np.arange(block_size + 1)]
        return out


def read_meta(d: Path) -> dict:
    path = d / META
    return json.loads(path.read_text()) if path.is_file() else {}  # nanoGPT's bins have none


def open_split(d: Path, split: str, meta: dict):
    """A split as one read-only np.memmap (train.bin: nanoGPT's, or a single listed file) or as
    Shards; each listed file must hold the token count meta.json gives it."""
    listed = meta.get("files", {}).get(split)
    if not listed:
        return np.memmap(d / f"{split}.bin", dtype=BIN_DTYPE, mode="r")
    arrays = []
    for f in listed:
        path = d / f["name"]
        size = path.stat().st_size if path.is_file() else None
        if size != f["tokens"] * np.dtype(BIN_DTYPE).itemsize:
            found = "is missing" if size is None else f"has {size} bytes"
            raise UserError(f"{path} {found}, meta.json says {f['tokens']} tokens: the files "
                            "are incomplete or from another run; prepare them again")
        arrays.append(np.memmap(path, dtype=BIN_DTYPE, mode="r") if f["tokens"] else
                      np.zeros(0, BIN_DTYPE))  # np.memmap refuses an empty file
    return arrays[0] if len(arrays) == 1 and listed[0]["name"] == f"{split}.bin" else \
        Shards(arrays)


def has_split(d: Path, split: str, meta: dict) -> bool:
    return bool(meta.get("files", {}).get(split)) or (d / f"{split}.bin").is_file()
