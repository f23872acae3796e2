"""The workdir: runs/<config name> by default, any etils.epath location, one-line errors for one
that cannot be used, and the features that write into it (profile_steps)."""

import gzip
import json
import subprocess
import sys

import pytest

from jaxgpt import training
from jaxgpt import workdir as workdir_lib
from jaxgpt.errors import UserError
from tests.conftest import tiny
from tests.test_preemption import ROOT, TIMEOUT, cli_args


def test_default_workdir_is_runs_and_the_config_name(tmp_path, text_file):
    args = [a for a in cli_args(text_file, "unused", max_iters=4, eval_interval=4)
            if not a.startswith("--workdir") and a != "unused"]
    r = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("workdir: runs/shakespeare_cpu (")
    assert (tmp_path / "runs" / "shakespeare_cpu" / "checkpoints" / "4").is_dir()


def test_a_workdir_that_is_a_file(tmp_path, text_file):
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(UserError, match="is a file, not a directory"):
        training.train(tiny(text_file), tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_the_cli_says_it_in_one_line(tmp_path, text_file):
    (tmp_path / "taken").write_text("")
    r = subprocess.run([sys.executable, *cli_args(text_file, tmp_path / "taken")], cwd=ROOT,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 1
    assert r.stderr.startswith("error: --workdir ") and r.stderr.count("\n") == 1, r.stderr


def test_a_bucket_that_does_not_exist(gcs, text_file):
    with pytest.raises(UserError, match=r"cannot write to --workdir gs://no-such-bucket/run "
                                        r"\(.*\): check that the bucket exists"):
        training.train(tiny(text_file), "gs://no-such-bucket/run")


@pytest.mark.parametrize("steps", [-1, 20])
def test_bad_profile_steps(tmp_path, text_file, steps):
    with pytest.raises(UserError, match=f"profile_steps={steps}: use 0"):
        training.train(tiny(text_file, max_iters=20, profile_steps=steps), tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # stopped before anything was written


def test_profile_steps_writes_a_trace_of_the_training_step(tmp_path, text_file):
    training.train(tiny(text_file, max_iters=20, steps_per_call=2, profile_steps=4), tmp_path)
    (trace,) = (tmp_path / "plugins" / "profile").glob("*/*.trace.json.gz")
    assert list(trace.parent.glob("*.xplane.pb"))  # what TensorBoard's profile tab reads
    names = {e.get("name", "") for e in json.loads(gzip.decompress(trace.read_bytes()))[
        "traceEvents"]}
    assert any("train_steps" in n for n in names), sorted(names)[:50]


def test_as_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(workdir_lib.as_path("gs://b/run")) == "gs://b/run"
    assert str(workdir_lib.as_path("runs/x")) == str(tmp_path / "runs" / "x")
    assert workdir_lib.default("configs/shakespeare.py") == "runs/shakespeare"
