"""A run on a gs:// workdir against a local GCS emulator (tests/gcs_emulator.py), through the
commands a user types: train.py, the same command resuming with more steps, sample.py."""

import json
import subprocess
import sys
from pathlib import Path

from etils import epath

from tests.test_preemption import ROOT, TIMEOUT, cli_args

WORKDIR = "gs://test-bucket/run"


def run(args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_train_resume_sample_on_gcs(gcs, text_file):
    first = run(cli_args(text_file, WORKDIR, max_iters=20, eval_interval=10, steps_per_call=5))
    assert first.returncode == 0, first.stderr[-3000:]
    objects = gcs.objects("run/")
    for name in ("config.json", "tokenizer.json", "metrics.jsonl"):
        assert f"run/{name}" in objects
    assert any(o.startswith("run/checkpoints/20/") for o in objects), objects
    assert any(o.startswith("run/events.out.tfevents.") for o in objects), objects

    second = run(cli_args(text_file, WORKDIR, max_iters=30, eval_interval=10, steps_per_call=5))
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from the checkpoint of step 20 in {WORKDIR}" in second.stdout
    assert "resuming with changed settings: max_iters\n" in second.stderr  # only that one
    events = [json.loads(line) for line in epath.Path(f"{WORKDIR}/metrics.jsonl").open()]
    evals = [e["step"] for e in events if e["event"] == "eval"]
    assert evals == [0, 10, 20, 30]  # both runs' lines, each once
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(30))

    sample = run([str(ROOT / "sample.py"), "--workdir", WORKDIR, "--start", "the",
                  "--max_new_tokens", "20", "--checkpoint", "latest"])
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert sample.stdout.startswith("the") and len(sample.stdout) == len("the") + 20 + 1
    assert "checkpoint step 30" in sample.stderr
    assert not Path(ROOT / "gs:").exists()  # nothing went to a local directory named gs:


def test_text_and_token_files_read_from_gcs(gcs, tmp_path, monkeypatch):
    """data_path=gs://...: the text read through epath; data_dir=gs://...: the BPE bins copied
    once into the local cache (np.memmap needs a file)."""
    import numpy as np

    from jaxgpt import datasets, prepare
    from jaxgpt import tokenizer as tokenizers
    from tests.conftest import byte_encoding, synthetic_text, tiny

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the local mirror goes under ~/.cache
    text = synthetic_text(20000)
    epath.Path("gs://test-bucket/data/input.txt").write_text(text)
    char = datasets.load(tiny("gs://test-bucket/data/input.txt"))
    assert char.tokenizer.decode(np.concatenate([char.train, char.val]).tolist()) == text

    (tmp_path / "input.txt").write_text(text)
    prepare.prepare_bpe(tmp_path / "input.txt", tmp_path / "bins",
                        tokenizer=tokenizers.BPETokenizer(byte_encoding()))
    for f in (tmp_path / "bins").iterdir():
        epath.Path(f"gs://test-bucket/data/owt/{f.name}").write_bytes(f.read_bytes())
    c = tiny(dataset="owt", data_dir="gs://test-bucket/data", vocab_size=320)
    bpe = datasets.load(c)
    for split in ("train", "val"):
        want = np.fromfile(tmp_path / "bins" / f"{split}.bin", dtype=datasets.data.BIN_DTYPE)
        np.testing.assert_array_equal(getattr(bpe, split), want)
    assert (tmp_path / "home/.cache/jaxgpt/remote/test-bucket/data/owt/train.bin").is_file()
