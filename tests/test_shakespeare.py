"""On the real tiny Shakespeare (path from JAXGPT_SHAKESPEARE, which .ci/run sets).

The fast test checks the lecture's figures for the text; the full CPU recipe run is opt-in
(JAXGPT_SLOW=1: about a minute on 2 cores), since every other test uses generated text.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxgpt import datasets
from tests.conftest import SHAKESPEARE, tiny

ROOT = Path(__file__).resolve().parents[1]
# the lecture's printout of the text's sorted characters
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
needs_text = pytest.mark.skipif(not SHAKESPEARE, reason="set JAXGPT_SHAKESPEARE to input.txt")


@needs_text
def test_the_lectures_dataset_figures():
    """The lecture prints: 1,115,394 characters, 65 of them distinct, split 90 / 10."""
    config = tiny(SHAKESPEARE, dataset="shakespeare_char")
    ds = datasets.load(config)
    assert ds.tokenizer.vocab_size == 65
    assert "".join(ds.tokenizer.itos[i] for i in range(65)) == SHAKESPEARE_CHARS
    assert (len(ds.train), len(ds.val)) == (1_003_854, 111_540)
    assert ds.tokenizer.decode(ds.train[:14]) == "First Citizen:"


@needs_text
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("JAXGPT_SLOW") != "1", reason="opt-in: JAXGPT_SLOW=1")
def test_cpu_recipe_reaches_nanogpts_loss_and_samples(tmp_path):
    """nanoGPT's CPU recipe end to end: the eval lines it prints are metrics.jsonl's evals, the
    val loss starts at about ln(65) (every character equally likely), falls, and ends near
    nanoGPT's 1.8857 (20-batch evals vary by about +-0.02 between seeds: 1.886-1.920
    measured); then sample.py prints 200 characters of the text's alphabet that read like
    words."""
    workdir = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/shakespeare_cpu.py",
                        "--workdir", str(workdir), f"--config.data_path={SHAKESPEARE}"],
                       cwd=ROOT, check=True, capture_output=True, text=True, timeout=900)
    printed = [(int(s), float(t), float(v)) for s, t, v in re.findall(
        r"^step (\d+): train loss (\d+\.\d+), val loss (\d+\.\d+)", r.stdout + r.stderr,
        re.M)]
    evals = [e for e in map(json.loads, (workdir / "metrics.jsonl").open())
             if e["event"] == "eval"]
    assert [e["step"] for e in evals] == list(range(0, 2001, 250))
    assert printed == [(e["step"], round(e["train_loss"], 4), round(e["val_loss"], 4))
                       for e in evals]
    val = [e["val_loss"] for e in evals]
    assert abs(val[0] - math.log(65)) < 0.2  # at init: about uniform over 65 characters
    assert val[0] > val[1] > val[2] > val[3]  # it learns
    final = evals[-1]
    assert final["step"] == 2000 and final["val_loss"] < 1.95
    r = subprocess.run([sys.executable, "sample.py", "--workdir", str(workdir),
                        "--max_new_tokens", "200", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("\n") and r.stdout.endswith("\n")  # the prompt, the end
    text = r.stdout[1:-1]  # one character a token
    assert len(text) == 200 and set(text) <= set(SHAKESPEARE_CHARS)
    assert 0.08 < text.count(" ") / len(text) < 0.35  # words, not a uniform draw (1 in 65)
    common = {"the", "and", "to", "of", "i", "you", "my", "a", "that", "is", "in", "me"}
    assert common & set(re.findall(r"[a-z]+", text.lower()))
