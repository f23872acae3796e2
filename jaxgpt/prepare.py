"""Data preparation, apart from loading (as nanoGPT's data/*/prepare.py): local text -> GPT-2
BPE token files train.bin / val.bin (flat uint16, nanoGPT's format) + meta.json.

  python -m jaxgpt.prepare SOURCE OUT_DIR [--val_fraction F]

SOURCE is a .txt file, a .jsonl file with a "text" field per line (as a Hugging Face dataset
exports with `ds.to_json`), or a directory of them. Train on OUT_DIR with
`--config.dataset=NAME --config.data_dir=OUT_DIR` (configs/gpt2.py).
"""

import json
from pathlib import Path

import numpy as np
from absl import flags

from jaxgpt import cli
from jaxgpt import tokenizer as tokenizers
from jaxgpt.data import BIN_DTYPE, read_utf8
from jaxgpt.errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl")


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
                            raise UserError(f"{f}:{n}: not a JSON object with a 'text' "
                                            "field") from None
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


def define_flags() -> None:
    """The command line's flags: defined only when run as a command, so importing this
    module defines none (two commands' flags of the same name would clash)."""
    flags.DEFINE_float("val_fraction", 0.1, "Fraction of the tokens for val: 0.1 as the lecture; "
                       "nanoGPT's OpenWebText uses 0.0005.")


def main(argv):
    source, out_dir = argv[1:]
    meta = prepare_bpe(source, out_dir, flags.FLAGS.val_fraction)
    print(f"train.bin has {meta['train_tokens']:,} tokens, val.bin {meta['val_tokens']:,} "
          f"({out_dir})")


if __name__ == "__main__":
    define_flags()
    cli.run(main, positional=("SOURCE", "OUT_DIR"))
