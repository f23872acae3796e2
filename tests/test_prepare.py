"""python -m jaxgpt.prepare: local text and Hugging Face datasets (nanoGPT's
data/openwebtext/prepare.py rules) to BPE token files, shards and their loader, the command's
one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxgpt import batches, bins, datasets, prepare
from jaxgpt import tokenizer as tokenizers
from jaxgpt.errors import UserError
from tests.conftest import byte_encoding, synthetic_text, tiny

hf = pytest.importorskip("datasets")
tiktoken = pytest.importorskip("tiktoken")
ROOT = Path(__file__).resolve().parents[1]
REAL_BPE = ROOT.parent / "shared" / "data" / "tiktoken"  # r50k_base: GPT-2's ranks, offline


@pytest.fixture
def encoding(monkeypatch):
    """GPT-2's BPE (r50k_base, from the copy beside the checkout) where there, else bytes."""
    if not REAL_BPE.is_dir():
        return byte_encoding()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(REAL_BPE))
    return tiktoken.get_encoding("r50k_base")


def _documents(n: int = 300) -> list[str]:
    """Short documents of a few lines; one holds a literal <|endoftext|>, one is empty."""
    docs = [synthetic_text(int(40 + 200 * (i % 7) / 6), seed=i) for i in range(n)]
    docs[5] = "before <|endoftext|> after"
    docs[9] = ""
    return docs


@pytest.fixture
def saved(tmp_path):
    """A small dataset as save_to_disk writes it, with a second column prepare ignores."""
    docs = _documents()
    path = tmp_path / "saved"
    hf.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).save_to_disk(str(path))
    return path


def _nanogpt_tokens(path, enc, val_fraction):
    """nanoGPT's prepare.py, step by step: its split, then encode_ordinary + eot a document."""
    split = hf.load_from_disk(str(path)).train_test_split(test_size=val_fraction, seed=2357,
                                                          shuffle=True)
    return {name: np.array([t for text in split[key]["text"]
                            for t in [*enc.encode_ordinary(text), enc.eot_token]], np.uint16)
            for name, key in (("train", "train"), ("val", "test"))}


def _read(out, split):
    meta = json.loads((out / "meta.json").read_text())
    return np.concatenate([np.fromfile(out / f["name"], dtype=np.uint16)
                           for f in meta["files"][split]])


def test_prepare_bpe_writes_nanogpt_bins(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("First Citizen:\nBefore we proceed")
    (src / "sub" / "b.jsonl").write_text(json.dumps({"text": "any further, hear me"}) + "\n\n" +
                                         json.dumps({"text": "speak."}) + "\n")
    tok = tokenizers.BPETokenizer(byte_encoding())  # GPT-2's tables need a download; same code path
    meta = prepare.prepare_bpe(src, tmp_path / "out", val_fraction=0.25, tokenizer=tok)
    docs = ["First Citizen:\nBefore we proceed", "any further, hear me", "speak."]
    expected = sum((tok.encode(d) + [tok.eot_token] for d in docs), [])  # nanoGPT: EOT after each
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert np.concatenate([train, val]).tolist() == expected
    chars = sum(map(len, docs))  # byte tokens: one a character; val is the last 25 % of them
    assert len(val) - val.tolist().count(tok.eot_token) == chars - int(chars * 0.75)
    assert meta["val_tokens"] == len(val)
    assert meta["tokenizer"] == {"kind": "gpt2"} and not list((tmp_path / "out").glob("*.part"))

    config = tiny(dataset="owt", data_dir=str(tmp_path / "out"), block_size=4)
    dataset = datasets.load(config)
    assert dataset.on_host and isinstance(dataset.train, np.memmap)
    assert dataset.tokenizer.vocab_size == 50257  # GPT-2's, known without loading its tables


def test_prepare_cli_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizers, "_gpt2_encoding", byte_encoding)
    (tmp_path / "t.txt").write_text("hello world\n" * 50)
    prepare.prepare_bpe(tmp_path / "t.txt", tmp_path / "owt")
    with pytest.raises(UserError, match="no such file"):
        prepare.prepare_bpe(tmp_path / "missing.txt", tmp_path / "x")
    r = subprocess.run([sys.executable, "-m", "jaxgpt.prepare", str(tmp_path / "missing.txt"),
                        str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "jaxgpt.prepare", str(tmp_path / "t.txt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "expected SOURCE OUT_DIR" in r.stderr
    with pytest.raises(UserError, match="no train.bin/val.bin"):
        datasets.load(tiny(dataset="openwebtext", data_dir=str(tmp_path / "nothing")))
    # data_dir/DATASET also works (nanoGPT's data/openwebtext layout)
    assert datasets.load(tiny(dataset="owt", data_dir=str(tmp_path), block_size=4)).on_host


def test_large_text_files_are_read_in_pieces(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("".join(f"line {i} of the corpus\n" for i in range(2000)))
    pieces = list(prepare._text_chunks(path, chunk_bytes=4096))
    assert len(pieces) > 5 and "".join(pieces) == path.read_text()
    assert all(p.endswith("\n") for p in pieces)  # cut after a newline, never mid-word



def test_hf_dataset_gives_nanogpts_token_streams(saved, tmp_path, encoding):
    tok = tokenizers.BPETokenizer(encoding)
    meta = prepare.prepare_bpe(hf_dataset=str(saved), out_dir=tmp_path / "out",
                               val_fraction=0.05, tokenizer=tok, num_proc=2)
    assert not [p for p in saved.iterdir() if p.name.startswith("cache-")]  # nothing written
    want = _nanogpt_tokens(saved, encoding, 0.05)
    for split in bins.SPLITS:
        got = np.fromfile(tmp_path / "out" / f"{split}.bin", dtype=np.uint16)
        np.testing.assert_array_equal(got, want[split])
        assert meta[f"{split}_tokens"] == len(got)
        assert meta["files"][split] == [{"name": f"{split}.bin", "tokens": len(got)}]
    n_docs = len(_documents())
    assert (np.concatenate([want["train"], want["val"]]) == encoding.eot_token).sum() == n_docs
    assert len(want["val"]) < len(want["train"]) / 5  # 15 of 300 documents
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["meta.json", "train.bin", "val.bin"]  # no .part, no second copy


def test_a_literal_endoftext_is_text():
    tok = tokenizers.BPETokenizer(byte_encoding())
    prepare._WORKER.update(tok=tok)
    ids = prepare._encode_pieces([("a<|endoftext|>b", True)]).tolist()
    assert ids == [*b"a<|endoftext|>b", 256]  # one <|endoftext|>: the document's end


def test_shards_concatenate_to_the_single_files(saved, tmp_path):
    tok = tokenizers.BPETokenizer(byte_encoding())
    single = prepare.prepare_bpe(hf_dataset=str(saved), out_dir=tmp_path / "one",
                                 val_fraction=0.05, tokenizer=tok)
    meta = prepare.prepare_bpe(hf_dataset=str(saved), out_dir=tmp_path / "shards",
                               val_fraction=0.05, tokenizer=tok, shard_tokens=1000, num_proc=2)
    assert json.loads((tmp_path / "shards" / "meta.json").read_text()) == meta
    for split in bins.SPLITS:
        want = np.fromfile(tmp_path / "one" / f"{split}.bin", dtype=np.uint16)
        np.testing.assert_array_equal(_read(tmp_path / "shards", split), want)
        files = meta["files"][split]
        assert [f["name"] for f in files] == [f"{split}_{i:06d}.bin" for i in range(len(files))]
        assert all(f["tokens"] == 1000 for f in files[:-1]) and 0 < files[-1]["tokens"] <= 1000
        assert sum(f["tokens"] for f in files) == meta[f"{split}_tokens"] == \
            single[f"{split}_tokens"]
        for f in files:
            assert (tmp_path / "shards" / f["name"]).stat().st_size == 2 * f["tokens"]
    assert not list((tmp_path / "shards").glob("*.part"))


def _windows_exist(x, y, shards):
    """Each window (x row + its last y token) is a slice of one shard."""
    for wx, wy in zip(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])):
        w = np.append(wx, wy[-1]).astype(np.uint16)
        assert any(np.any(np.all(np.lib.stride_tricks.sliding_window_view(a, len(w)) == w,
                                 axis=1)) for a in shards.arrays if len(a) >= len(w))


def test_loader_draws_windows_inside_the_shards(tmp_path):
    """Shards of distinct tokens (the id says shard and position): every window lies inside
    one shard, the same (seed, step) gives the same batch (a resumed run), every process's
    rows are its rows of the global batch, and one shard draws what one file does."""
    out = tmp_path / "owt"
    writer = {s: bins.SplitWriter(out, s, shard_tokens=50) for s in bins.SPLITS}
    out.mkdir()
    for s in bins.SPLITS:
        writer[s].write(np.arange(230, dtype=np.uint16))  # shards 0-49, 50-99, ..., 200-229
    files = {s: writer[s].close() for s in bins.SPLITS}
    (out / "meta.json").write_text(json.dumps({"files": files}))
    dataset = datasets.load(tiny(dataset="owt", data_dir=str(out), block_size=16))
    shards = dataset.train
    assert isinstance(shards, bins.Shards) and len(shards) == 230
    assert shards.num_starts(16) == 4 * (50 - 16) + (30 - 16)
    x, y = batches.local_batch(shards, (3, 0), 11, (4, 64), 16, np.arange(64))  # (A, B, T)
    assert x.shape == (4, 64, 16) and x.dtype == np.int32
    window = np.concatenate([x, y[..., -1:]], axis=-1)  # (A, B, T+1)
    assert np.all(np.diff(window, axis=-1) == 1)  # consecutive ids: no shard boundary crossed
    assert np.all(window[..., 0] // 50 == window[..., -1] // 50)
    assert len(np.unique(window[..., 0] // 50)) == 5  # all five shards are drawn from
    _windows_exist(x, y, shards)
    again, _ = batches.local_batch(shards, (3, 0), 11, (4, 64), 16, np.arange(64))
    np.testing.assert_array_equal(again, x)
    part, _ = batches.local_batch(shards, (3, 0), 11, (4, 64), 16, np.arange(8, 16))
    np.testing.assert_array_equal(part, x[:, 8:16])

    flat = np.random.default_rng(0).integers(0, 50257, 500).astype(np.uint16)
    one = bins.Shards([flat])  # one shard: the very windows of the same tokens in one file
    for step in range(3):
        np.testing.assert_array_equal(
            batches.local_batch(one, (1, 0), step, (2, 8), 16, np.arange(8))[0],
            batches.local_batch(flat, (1, 0), step, (2, 8), 16, np.arange(8))[0])


def test_host_batches_over_shards_resume_exactly(tmp_path, saved):
    prepare.prepare_bpe(hf_dataset=str(saved), out_dir=tmp_path / "owt", val_fraction=0.05,
                        tokenizer=tokenizers.BPETokenizer(byte_encoding()), shard_tokens=3000)
    config = tiny(dataset="owt", data_dir=str(tmp_path / "owt"), block_size=16,
                  vocab_size=320, batch_size=4, gradient_accumulation_steps=2)
    from jaxgpt import parallel

    dataset, mesh = datasets.load(config), parallel.make_mesh(config)
    assert isinstance(dataset.train, bins.Shards) and len(dataset.train.arrays) > 3
    run = batches.HostBatches(dataset, config, mesh)
    first = [np.asarray(t) for t in run.train_data(0, 6)]  # (6, A, B, T) each
    resumed = batches.HostBatches(dataset, config, mesh)
    later = [np.asarray(t) for t in resumed.train_data(4, 2)]  # steps 4, 5 after a restart
    run.close()
    resumed.close()
    for a, b in zip(first, later):
        np.testing.assert_array_equal(a[4:], b)


def test_interrupted_prepare_leaves_no_complete_looking_file(saved, tmp_path):
    """A run stopped halfway leaves finished shards and a .part, but no meta.json: the loader
    does not take it for a dataset, and a new run replaces it only with force."""
    calls = []

    class Failing(tokenizers.BPETokenizer):
        def encode_ordinary(self, s):
            calls.append(s)
            if len(calls) == 270:  # in the second task of 256 documents
                raise RuntimeError("interrupted")
            return super().encode_ordinary(s)

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare.prepare_bpe(hf_dataset=str(saved), out_dir=out, val_fraction=0.05,
                            tokenizer=Failing(byte_encoding()), shard_tokens=2000)
    left = sorted(p.name for p in out.iterdir())
    assert "train_000000.bin" in left and left[-1].endswith(".part") and "meta.json" not in left
    with pytest.raises(UserError, match="no train.bin/val.bin"):
        datasets.load(tiny(dataset="owt", data_dir=str(out)))
    with pytest.raises(UserError, match="--force"):  # the leftovers are not silently replaced
        prepare.prepare_bpe(hf_dataset=str(saved), out_dir=out,
                            tokenizer=tokenizers.BPETokenizer(byte_encoding()))
    prepare.prepare_bpe(hf_dataset=str(saved), out_dir=out, force=True,
                        tokenizer=tokenizers.BPETokenizer(byte_encoding()))
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_bad_inputs(saved, tmp_path):
    tok = tokenizers.BPETokenizer(byte_encoding())
    for kwargs, words in [
            (dict(hf_dataset=str(saved), text_column="body"), "no column 'body' (it has text, id)"),
            (dict(hf_dataset=str(saved), source=saved), "not both"),
            (dict(hf_dataset=str(tmp_path)), "neither a save_to_disk directory"),
            (dict(hf_dataset=str(saved), shard_tokens=-1), "shard_tokens=-1"),
            (dict(hf_dataset=str(saved), val_fraction=1.0), "val_fraction=1.0")]:
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
            prepare.prepare_bpe(out_dir=tmp_path / "o", tokenizer=tok, **kwargs)
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match="could not read it"):
        prepare.prepare_bpe(hf_dataset=str(tmp_path / "bad.jsonl"), out_dir=tmp_path / "o",
                            tokenizer=tok)
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_local_parquet_and_jsonl_files(tmp_path):
    tok = tokenizers.BPETokenizer(byte_encoding())
    docs = _documents(40)
    table = hf.Dataset.from_dict({"text": docs})
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.to_json(str(tmp_path / "d.jsonl"))
    got = {}
    for name in ("d.parquet", "d.jsonl"):
        prepare.prepare_bpe(hf_dataset=str(tmp_path / name), out_dir=tmp_path / name[2:],
                            tokenizer=tok, val_fraction=0.1)
        got[name] = [_read(tmp_path / name[2:], s) for s in bins.SPLITS]
    want = _nanogpt_split_of(docs, tok, 0.1)
    for name in got:
        for g, w in zip(got[name], want):
            np.testing.assert_array_equal(g, w)


def _nanogpt_split_of(docs, tok, val_fraction):
    split = hf.Dataset.from_dict({"text": docs}).train_test_split(test_size=val_fraction,
                                                                   seed=2357, shuffle=True)
    return [np.array([t for d in split[k]["text"] for t in [*tok.encode_ordinary(d),
                                                            tok.eot_token]], np.uint16)
            for k in ("train", "test")]


def test_local_text_splits_by_characters(tmp_path):
    """SOURCE: the last val_fraction of the characters is val, across documents; shards too."""
    tok = tokenizers.BPETokenizer(byte_encoding())  # one token a character: counts are exact
    src = tmp_path / "src"
    src.mkdir()
    docs = ["abc " * 30, "", "defg " * 20]
    (src / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare.prepare_bpe(src, tmp_path / "out", val_fraction=0.4, tokenizer=tok,
                               shard_tokens=64, num_proc=2)
    cut = int(sum(map(len, docs)) * 0.6) - len(docs[0])  # the line falls inside docs[2]
    eot = [tok.eot_token]
    want_train = [*docs[0].encode(), *eot, *eot, *docs[2][:cut].encode()]  # docs 0, 1 end here
    want_val = [*docs[2][cut:].encode(), *eot]
    assert _read(tmp_path / "out", "train").tolist() == want_train
    assert _read(tmp_path / "out", "val").tolist() == want_val
    assert meta["train_tokens"] == len(want_train) and len(meta["files"]["train"]) == 3


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "jaxgpt.prepare", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def _one_line_error(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and all(w in lines[-1] for w in words), lines[-1]


@pytest.mark.skipif(not REAL_BPE.is_dir(), reason="GPT-2's BPE file (../shared/data/tiktoken)")
def test_cli_with_gpt2s_bpe(saved, tmp_path):
    r = _run("--hf_dataset", saved, tmp_path / "out", "--num_proc", "2", "--val_fraction",
             "0.05", env={"TIKTOKEN_CACHE_DIR": str(REAL_BPE)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tokens/s" in r.stderr and "train has" in r.stdout
    want = _nanogpt_tokens(saved, tiktoken.get_encoding("r50k_base"), 0.05)
    for split in bins.SPLITS:
        np.testing.assert_array_equal(
            np.fromfile(tmp_path / "out" / f"{split}.bin", np.uint16), want[split])


def test_cli_errors_are_one_line(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    _one_line_error(_run("--hf_dataset", "no-such/dataset-xyz", tmp_path / "o", env=offline),
                    "no-such/dataset-xyz", "cache")
    _one_line_error(_run(tmp_path / "o"), "--hf_dataset NAME OUT_DIR")
    no_datasets = ("import sys, runpy; sys.modules['datasets'] = None; "
                   "sys.argv = ['prepare', '--hf_dataset', 'openwebtext', 'out']; "
                   "runpy.run_module('jaxgpt.prepare', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", no_datasets], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    _one_line_error(r, "jaxgpt[prepare]")
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()
