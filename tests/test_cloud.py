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
