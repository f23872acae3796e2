"""Data preparation, apart from loading (as nanoGPT's data/*/prepare.py): text -> GPT-2 BPE token
files (flat uint16, nanoGPT's format, bins.py) + meta.json.

  python -m jaxgpt.prepare --hf_dataset NAME [--hf_config C] OUT_DIR [--shard_tokens N]
  python -m jaxgpt.prepare SOURCE OUT_DIR [--val_fraction F] [--shard_tokens N]

--hf_dataset is anything Hugging Face `datasets` reads (pip install 'jaxgpt[prepare]'): a dataset
on the Hub (`openwebtext`; `HuggingFaceFW/fineweb-edu --hf_config sample-10BT`), kept in datasets'
own cache; a `save_to_disk` directory; local .parquet / .jsonl / .json files (a file, a glob or a
directory of them). As nanoGPT's data/openwebtext/prepare.py: the split --hf_split is divided by
documents (`train_test_split(test_size=val_fraction, seed=2357, shuffle=True)`, val_fraction
0.0005) and each document is `encode_ordinary(text)` + <|endoftext|> (a literal "<|endoftext|>"
is text), so train.bin / val.bin are byte-identical to nanoGPT's.

SOURCE (no `datasets` needed) is a .txt file, a .jsonl file with a "text" field per line, or a
directory of them, streamed in pieces: each file (a .jsonl line) is a document, and the last
val_fraction (0.1) of the characters is val (nanoGPT's data/shakespeare rule).

--num_proc processes tokenize (default: every core), in order, straight into the final files:
one train.bin / val.bin, or with --shard_tokens N shards of N tokens (train_000000.bin, ...)
that meta.json lists. Each file is written as NAME.part and renamed when complete. Train on
OUT_DIR with `--config.dataset=NAME --config.data_dir=OUT_DIR` (configs/gpt2.py).
"""

import contextlib
import glob
import json
import multiprocessing
import os
import time
from collections import deque
from pathlib import Path

import numpy as np
from absl import flags
from tqdm import tqdm

from jaxgpt import bins, cli
from jaxgpt import tokenizer as tokenizers
from jaxgpt.data import read_utf8
from jaxgpt.errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl")
HF_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
NANOGPT_SEED = 2357  # nanoGPT's data/openwebtext/prepare.py: train_test_split(seed=2357)
ROWS_PER_TASK = 256  # documents one worker encodes at a time
CHARS_PER_TASK = 2**20  # local text: about this much per task


# ---------------------------------------------------------------------------------------------
# Encoding, in worker processes forked with what they need (nothing large is pickled)

_WORKER: dict = {}  # "tok": the tokenizer; HF path: "splits" {name: rows}, "column"


def _encode_rows(task) -> tuple[np.ndarray, int]:
    """Documents start..stop-1 of a split -> (their tokens (n,) uint16, documents done):
    nanoGPT's process(), each document encode_ordinary + <|endoftext|>."""
    split, start, stop = task
    texts = _WORKER["splits"][split][start:stop][_WORKER["column"]]
    return _encode_pieces([(t, True) for t in texts]), stop - start


def _encode_pieces(pieces) -> np.ndarray:
    """[(text, ends_a_document)] -> tokens (n,) uint16, <|endoftext|> after each document's end."""
    tok, ids = _WORKER["tok"], []
    for text, ends in pieces:
        ids.extend(tok.encode_ordinary(text))
        if ends:
            ids.append(tok.eot_token)
    return np.array(ids, dtype=bins.BIN_DTYPE)


def _encode_text_task(pieces) -> tuple[np.ndarray, int]:
    return _encode_pieces(pieces), sum(len(t) for t, _ in pieces)


def _pool(num_proc: int):
    """num_proc processes forked now, with _WORKER as it is (None: encode in this process)."""
    if num_proc <= 1:
        return contextlib.nullcontext(None)
    return multiprocessing.get_context("fork").Pool(num_proc)


def _in_order(pool, fn, tasks, num_proc: int):
    """fn(task) for each task, in order; at most 4 tasks a process ahead of the consumer, so
    memory stays flat however long the input."""
    if pool is None:
        yield from map(fn, tasks)
        return
    pending = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= 4 * num_proc:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _write_split(out_dir: Path, split: str, encoded, shard_tokens: int, bar) -> list[dict]:
    """Stream (tokens, progress) pairs into the split's file(s); the bar shows tokens/s."""
    writer, tokens, start = bins.SplitWriter(out_dir, split, shard_tokens), 0, time.monotonic()
    try:
        for ids, done in encoded:
            writer.write(ids)
            tokens += len(ids)
            bar.set_postfix_str(f"{split} {tokens:,} tokens, "
                                f"{tokens / max(time.monotonic() - start, 1e-9):,.0f} tokens/s",
                                refresh=False)
            bar.update(done)
    except BaseException:
        writer.abort()  # the file being written stays .part
        raise
    return writer.close()


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (nanoGPT's data/openwebtext/prepare.py)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("--hf_dataset needs Hugging Face datasets: pip install "
                        "'jaxgpt[prepare]'") from None
    return datasets


def _local_files(name: str) -> list[str]:
    """The .parquet / .jsonl / .json files `name` points at: a file, a glob, or a directory's
    .parquet / .jsonl files (its .json files may be metadata, such as save_to_disk's)."""
    path = Path(name).expanduser()
    if path.is_dir():
        found = [p for p in sorted(path.rglob("*")) if p.suffix in (".parquet", ".jsonl")]
    else:
        found = [path] if path.is_file() else sorted(map(Path, glob.glob(str(path),
                                                                         recursive=True)))
    return [str(p) for p in found if p.suffix in HF_FILE_BUILDERS and p.is_file()]


def load_hf(name: str, config: str | None = None, split: str = "train", num_proc: int = 1):
    """One split of a dataset: a save_to_disk directory, local parquet/JSON files, or a dataset
    on the Hub (in datasets' cache, or downloaded into it)."""
    datasets = _import_datasets()
    path = Path(name).expanduser()
    try:
        if path.is_dir() and any((path / f).is_file() for f in
                                 ("dataset_dict.json", "dataset_info.json", "state.json")):
            saved = datasets.load_from_disk(str(path))
            return saved[split] if isinstance(saved, datasets.DatasetDict) else saved
        files = _local_files(name)
        if files:
            builders = {HF_FILE_BUILDERS[Path(f).suffix] for f in files}
            if len(builders) > 1:
                raise UserError(f"--hf_dataset {name}: both parquet and JSON files; pass one kind")
            return datasets.load_dataset(builders.pop(), data_files=files, split="train",
                                         num_proc=num_proc)
        if path.exists():
            raise UserError(f"--hf_dataset {name}: neither a save_to_disk directory nor "
                            ".parquet / .jsonl / .json files")
        return datasets.load_dataset(name, config, split=split, num_proc=num_proc)
    except (ConnectionError, FileNotFoundError) as e:  # offline, and not in the cache
        raise UserError(f"--hf_dataset {name}: not in datasets' cache and not downloadable "
                        f"({_first_line(e)}); run once with network (HF_DATASETS_CACHE keeps it) "
                        "or pass a save_to_disk directory or parquet/JSONL files") from None
    except ValueError as e:  # an unknown config or split
        raise UserError(f"--hf_dataset {name}: {_first_line(e)}") from None
    except datasets.exceptions.DatasetGenerationError as e:  # a file that is not what it says
        raise UserError(f"--hf_dataset {name}: could not read it "
                        f"({_first_line(e.__cause__ or e)})") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def split_documents(rows, val_fraction: float) -> dict:
    """nanoGPT's val split: a seeded shuffle of the documents, the first val_fraction of them
    val and the rest train, each in the shuffled order. datasets' own train_test_split draws
    it, over the row numbers alone: on `rows` itself it would write its indices as cache files
    next to the data (a save_to_disk directory)."""
    datasets = _import_datasets()
    numbers = datasets.Dataset.from_dict({"i": np.arange(len(rows))})  # in memory
    split = numbers.train_test_split(test_size=val_fraction, seed=NANOGPT_SEED, shuffle=True)
    return {name: rows.select(split[key]["i"], keep_in_memory=True)
            for name, key in (("train", "train"), ("val", "test"))}


def _check_rows(rows, text_column: str) -> None:
    if text_column not in rows.column_names:
        raise UserError(f"the dataset has no column {text_column!r} (it has "
                        f"{', '.join(rows.column_names)}): pass --text_column")
    if len(rows) < 2:
        raise UserError(f"the dataset has {len(rows)} document(s): train and val need two")


def _prepare_hf(rows, out_dir, val_fraction, tok, shard_tokens, num_proc, text_column):
    splits = split_documents(rows.select_columns([text_column]), val_fraction)
    _WORKER.update(tok=tok, splits=splits, column=text_column)  # before the fork
    files = {}
    with _pool(num_proc) as pool, tqdm(total=len(rows), unit="doc", desc="tokenizing",
                                       dynamic_ncols=True) as bar:
        for name, part in splits.items():
            tasks = ((name, i, min(i + ROWS_PER_TASK, len(part)))
                     for i in range(0, len(part), ROWS_PER_TASK))
            encoded = _in_order(pool, _encode_rows, tasks, num_proc)
            files[name] = _write_split(out_dir, name, encoded, shard_tokens, bar)
    return files


# ---------------------------------------------------------------------------------------------
# Local text files, without datasets


def _text_chunks(path: Path, chunk_bytes: int = 2**24):
    """A text file in pieces of about `chunk_bytes`, cut after a newline (memory stays flat on
    a multi-GB file; BPE may merge differently only across the few cuts)."""
    if path.stat().st_size <= chunk_bytes:
        yield read_utf8(path)
        return
    with path.open(encoding="utf-8") as f:
        while chunk := "".join(f.readlines(chunk_bytes)):
            yield chunk


def _documents(source: Path):
    """Yield the source's documents, each as an iterable of text pieces: a .txt file is one, a
    .jsonl file one per line ("text" field), a directory all of those in it."""
    files = sorted(p for p in source.rglob("*") if p.suffix in TEXT_SUFFIXES) \
        if source.is_dir() else [source]
    if not files or not all(f.is_file() for f in files):
        raise UserError(f"{source}: no .txt or .jsonl files; pass a text file, a JSONL file "
                        "with a 'text' field per line, or a directory of them (other formats: "
                        "--hf_dataset)")
    for f in files:
        if f.suffix == ".jsonl":
            with f.open(encoding="utf-8") as lines:
                for n, line in enumerate(lines, 1):
                    if line.strip():
                        try:
                            yield [json.loads(line)["text"]]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise UserError(f"{f}:{n}: not a JSON object with a 'text' "
                                            "field") from None
        else:
            yield _text_chunks(f)


def _pieces(source: Path):
    """(text, ends_a_document) for every piece of every document."""
    for doc in _documents(source):
        last = None
        for piece in doc:
            if last is not None:
                yield last, False
            last = piece
        yield last or "", True


def _split_by_characters(pieces, n_train: int):
    """The piece stream as (split, text, ends): the first n_train characters train, the rest
    val; the piece across the line is cut there (its document goes on in val)."""
    seen = 0
    for text, ends in pieces:
        cut = min(max(n_train - seen, 0), len(text))
        if not text:  # an empty document: its <|endoftext|> only
            yield "train" if seen < n_train else "val", text, ends
        if cut:
            yield "train", text[:cut], ends and cut == len(text)
        if cut < len(text):
            yield "val", text[cut:], ends
        seen += len(text)


def _tasks(items, split: str):
    """One split's pieces in tasks of about CHARS_PER_TASK characters."""
    task, size = [], 0
    for name, text, ends in items:
        if name != split:
            continue
        task.append((text, ends))
        size += len(text)
        if size >= CHARS_PER_TASK:
            yield task
            task, size = [], 0
    if task:
        yield task


def _count_characters(source: Path) -> int:
    """A first pass over the text (no BPE: cheap), which also finds bad input early."""
    if not source.exists():
        raise UserError(f"{source}: no such file or directory")
    return sum(len(text) for text, _ in _pieces(source))


def _prepare_text(source, out_dir, total, val_fraction, tok, shard_tokens, num_proc):
    n_train = int(total * (1 - val_fraction))
    _WORKER.update(tok=tok)  # before the fork
    files = {}
    with _pool(num_proc) as pool, tqdm(total=total, unit="char", unit_scale=True,
                                       desc="tokenizing", dynamic_ncols=True) as bar:
        for name in bins.SPLITS:
            tasks = _tasks(_split_by_characters(_pieces(source), n_train), name)
            encoded = _in_order(pool, _encode_text_task, tasks, num_proc)
            files[name] = _write_split(out_dir, name, encoded, shard_tokens, bar)
    return files


# ---------------------------------------------------------------------------------------------


def _clear(out_dir: Path, force: bool) -> None:
    """Refuse to replace an earlier run's token files unless force; with it, remove them."""
    old = bins.token_files(out_dir) if out_dir.is_dir() else []
    if old and not force:
        raise UserError(f"{out_dir} already has token files ({', '.join(p.name for p in old[:4])}"
                        f"{', ...' if len(old) > 4 else ''}): pass --force to replace them, or "
                        "choose another OUT_DIR")
    if old:
        print(f"--force: removing {len(old)} token files from an earlier run in {out_dir}")
    for p in old:
        p.unlink()


def prepare_bpe(source=None, out_dir=None, val_fraction: float | None = None, tokenizer=None, *,
                hf_dataset: str = "", hf_config: str | None = None, hf_split: str = "train",
                text_column: str = "text", shard_tokens: int = 0, num_proc: int = 1,
                force: bool = False) -> dict:
    """Tokenize local text (`source`) or a Hugging Face dataset (`hf_dataset`) with GPT-2's BPE
    into OUT_DIR's token files + meta.json (the module docstring has the rules); returns meta.

    val_fraction: by default 0.0005 of the documents (hf_dataset, nanoGPT's) or 0.1 of the
    characters (source). `tokenizer`: GPT-2's BPE unless given (tests pass one that needs no
    download).
    """
    if bool(source) == bool(hf_dataset):
        raise UserError("pass either SOURCE (local text) or --hf_dataset, not both")
    val_fraction = val_fraction if val_fraction is not None else 0.0005 if hf_dataset else 0.1
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction}: must be between 0 and 1")
    if shard_tokens < 0:
        raise UserError(f"shard_tokens={shard_tokens}: must be 0 (one file a split) or more")
    out_dir = Path(out_dir).expanduser()
    if hf_dataset:  # bad input is found before anything in OUT_DIR is touched
        rows = load_hf(hf_dataset, hf_config, hf_split, num_proc)
        _check_rows(rows, text_column)
    else:
        source = Path(source).expanduser()
        total = _count_characters(source)
    tok = tokenizer or tokenizers.BPETokenizer()
    if tok.vocab_size > np.iinfo(bins.BIN_DTYPE).max + 1:
        raise UserError(f"a vocabulary of {tok.vocab_size} tokens does not fit uint16 files")
    _clear(out_dir, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    if hf_dataset:
        files = _prepare_hf(rows, out_dir, val_fraction, tok, shard_tokens, num_proc,
                            text_column)
        split_rule = (f"documents: train_test_split(test_size={val_fraction}, "
                      f"seed={NANOGPT_SEED}, shuffle=True)")
    else:
        files = _prepare_text(source, out_dir, total, val_fraction, tok, shard_tokens, num_proc)
        split_rule = f"characters: the last {val_fraction} val"
    meta = {"tokenizer": tok.to_dict(), "vocab_size": tok.vocab_size, "dtype": "uint16",
            **{f"{s}_tokens": sum(f["tokens"] for f in files[s]) for s in bins.SPLITS},
            "shard_tokens": shard_tokens, "files": files,
            "source": hf_dataset or str(source), "val_split": split_rule}
    tmp = out_dir / f"{bins.META}.part"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(out_dir / bins.META)  # last: a complete meta.json means complete files
    return meta


def define_flags() -> None:
    """The command line's flags: defined only when run as a command, so importing this
    module defines none (two commands' flags of the same name would clash)."""
    flags.DEFINE_string("hf_dataset", "", "A Hugging Face dataset instead of SOURCE: a name on "
                        "the Hub, a save_to_disk directory, or .parquet/.jsonl/.json files.")
    flags.DEFINE_string("hf_config", None, "The dataset's configuration (fineweb-edu: "
                        "sample-10BT).")
    flags.DEFINE_string("hf_split", "train", "The split to divide into train and val.")
    flags.DEFINE_string("text_column", "text", "The column holding each document's text.")
    flags.DEFINE_float("val_fraction", None, "Fraction for val: of the documents with "
                       "--hf_dataset (default 0.0005, nanoGPT's), of the characters of SOURCE "
                       "(default 0.1, the lecture's).")
    flags.DEFINE_integer("shard_tokens", 0, "Tokens per file (train_000000.bin, ...); 0: one "
                         "train.bin and one val.bin, as nanoGPT.")
    flags.DEFINE_integer("num_proc", len(os.sched_getaffinity(0)), "Processes tokenizing.")
    flags.DEFINE_bool("force", False, "Replace the token files of an earlier run in OUT_DIR.")


def main(argv):
    f = flags.FLAGS
    *source, out_dir = argv[1:]
    if not source and not f.hf_dataset:
        raise UserError("expected SOURCE OUT_DIR, or --hf_dataset NAME OUT_DIR")
    meta = prepare_bpe(source[0] if source else None, out_dir, f.val_fraction,
                       hf_dataset=f.hf_dataset, hf_config=f.hf_config, hf_split=f.hf_split,
                       text_column=f.text_column, shard_tokens=f.shard_tokens,
                       num_proc=f.num_proc, force=f.force)
    n_files = sum(len(v) for v in meta["files"].values())
    print(f"train has {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,}, in "
          f"{n_files} files ({out_dir})")


if __name__ == "__main__":
    define_flags()
    cli.run(main, positional=("[SOURCE]", "OUT_DIR"))
