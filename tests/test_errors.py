"""Every error exit of train.py and sample.py is one line and closes what it opened (no thread
or event-loop traceback after it); a full disk loses nothing; several processes without
jax.distributed are refused."""

import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from jaxgpt import checkpoint, lock, training
from jaxgpt import metrics as metrics_lib
from jaxgpt.errors import UserError
from tests import test_preemption as runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    from tests.conftest import synthetic_text

    (root / "input.txt").write_text(synthetic_text(20000))
    training.train(runs.cli_config(root / "input.txt", max_iters=5, eval_interval=5), root / "run")
    return root


def start(args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(runs.ROOT)}
    return subprocess.Popen([sys.executable, *args], cwd=runs.ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_every_error_exit_is_one_line_without_a_traceback(trained, tmp_path):
    text, run = trained / "input.txt", trained / "run"
    train = lambda workdir, **o: runs.cli_args(text, workdir, max_iters=5, eval_interval=5, **o)  # noqa: E731
    sample = [str(runs.ROOT / "sample.py"), "--max_new_tokens", "5"]
    cases = {
        "init_from=scratch would overwrite": train(run, init_from="scratch"),
        "holds no checkpoint": train(tmp_path / "empty", init_from="resume"),
        "batch_size=0: must be a positive integer": train(tmp_path / "bad", batch_size=0),
        "no such file": [*train(tmp_path / "nodata"), f"--config.data_path={tmp_path}/none"],
        "outside the vocabulary": [*sample, "--workdir", str(run), "--start", "Zebra!"],
        "no such directory": [*sample, "--workdir", str(tmp_path / "nothing")],
    }
    procs = {message: start(args) for message, args in cases.items()}  # all at once: faster
    for message, proc in procs.items():
        _, err = proc.communicate(timeout=runs.TIMEOUT)
        assert proc.returncode == 1, (message, err[-3000:])
        assert "Traceback" not in err and "Exception" not in err, (message, err[-3000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, (message, err[-3000:])
    assert not (run / lock.LOCK_FILE).exists()  # every refused run released the lock


def test_several_processes_without_jax_distributed_are_refused(tmp_path, text_file,
                                                               monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    with pytest.raises(UserError, match="4 processes but jax.distributed is not initialized.*"
                                        "--distributed"):
        training.train(runs.cli_config(text_file), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------
# A full disk: a real one, a small tmpfs (needs root, as CI runs)


def mount(path, size_bytes, remount=False) -> bool:
    options = f"{'remount,' if remount else ''}size={size_bytes}"
    args = ["mount", "-o", options, str(path)] if remount else [
        "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    return shutil.which("mount") is not None and subprocess.run(
        args, capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not mount(disk, 1 << 20):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def disk_usage(path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def test_a_full_disk_says_one_line_and_the_same_command_resumes(tmp_path, text_file,
                                                                small_disk):
    settings = dict(max_iters=20, eval_interval=10, lr_decay_iters=20)
    training.train(runs.cli_config(text_file, **settings), tmp_path / "straight")
    one_checkpoint = disk_usage(tmp_path / "straight" / "checkpoints" / "20")
    # room for the run's files and one checkpoint, not for a second one beside it
    assert mount(small_disk, one_checkpoint * 3 // 2, remount=True)
    workdir = small_disk / "run"
    proc = start(runs.cli_args(text_file, workdir, **settings))
    _, err = proc.communicate(timeout=runs.TIMEOUT)
    assert proc.returncode == 1, err[-3000:]
    # the save is refused before orbax starts it: nothing half-written, nothing else printed
    assert "Traceback" not in err and "Exception" not in err, err[-3000:]
    assert err.endswith("\n") and err.strip().splitlines()[-1] == err.splitlines()[-1]
    line = err.splitlines()[-1]
    assert line.startswith("error: writing checkpoint step 20 failed (No space left on device: "
                           ), line
    assert "MB free, a checkpoint takes" in line
    assert "); the newest good checkpoint is step 10 in " in line
    assert "run the same command to resume" in line
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10"]

    assert mount(small_disk, one_checkpoint * 4, remount=True)  # space freed
    logged = len(runs.events(workdir))
    training.train(runs.cli_config(text_file, **settings), workdir)  # the same run, resumed
    assert sorted(os.listdir(workdir / "checkpoints")) == ["20"]
    # the resumed run logs steps 10.. again (step 10's eval was saved with it): as straight
    want = [e for e in runs.events(tmp_path / "straight")
            if e["step"] >= 10 and (e["event"], e["step"]) != ("eval", 10)]
    runs.assert_same_events(runs.events(workdir)[logged:], want)
    assert json.loads((workdir / "config.json").read_text())["max_iters"] == 20
    assert checkpoint.best_step(workdir) == 20


def test_a_write_that_fails_midway_says_one_line(tmp_path, text_file, small_disk):
    """The disk fills during the write (the room check before it turned off, as when another
    process takes the space): orbax's threads fail as they wind down, and the user still sees
    one line; the half-written step is removed by the next start."""
    settings = dict(max_iters=20, eval_interval=10, lr_decay_iters=20)
    training.train(runs.cli_config(text_file, **settings), tmp_path / "straight")
    one_checkpoint = disk_usage(tmp_path / "straight" / "checkpoints" / "20")
    assert mount(small_disk, one_checkpoint * 3 // 2, remount=True)
    workdir = small_disk / "run"
    no_check = ("import runpy, sys; from jaxgpt import checkpoint; "
                "checkpoint.RunCheckpoints._check_room = lambda self, step: None; "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = start(["-c", no_check, *runs.cli_args(text_file, workdir, **settings)])
    _, err = proc.communicate(timeout=runs.TIMEOUT)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "Exception" not in err, err[-3000:]
    line = err.splitlines()[-1]
    assert line.startswith("error: writing checkpoint step 20 failed (No space left on device);"
                           " the newest good checkpoint is step 10 in "), line
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20.orbax-checkpoint-tmp"]

    assert mount(small_disk, one_checkpoint * 4, remount=True)
    training.train(runs.cli_config(text_file, **settings), workdir)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["20"]  # the partial step removed
    assert checkpoint.best_step(workdir) == 20


def test_a_failed_metrics_write_names_the_newest_good_checkpoint(tmp_path, text_file,
                                                                 monkeypatch):
    """ENOSPC injected into metrics.jsonl's writes once step 15 is logged: one UserError; the
    checkpoint of step 10 is complete and restorable."""
    real = metrics_lib.AppendFile.flush

    def flush(self, force=True):
        if b'"step": 15' in self.pending:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real(self, force)

    monkeypatch.setattr(metrics_lib.AppendFile, "flush", flush)
    with pytest.raises(UserError) as failed:
        training.train(runs.cli_config(text_file, max_iters=20, eval_interval=10, steps_per_call=5),
                       tmp_path)
    assert str(failed.value).startswith(f"writing {tmp_path / 'metrics.jsonl'} failed (No space "
                                        f"left on device); the newest good checkpoint is step "
                                        f"10 in {tmp_path}: free space")
    assert checkpoint.make_manager(tmp_path, read_only=True).all_steps() == [10]
    assert not (tmp_path / lock.LOCK_FILE).exists()


def test_a_lock_that_cannot_be_written_names_the_newest_checkpoint(trained, monkeypatch):
    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(lock.RunLock, "_create", full)
    with pytest.raises(UserError, match=r"run.lock failed \(No space left on device\); the "
                                        r"newest good checkpoint is step 5 in "):
        training.train(runs.cli_config(trained / "input.txt", max_iters=10, eval_interval=5),
                       trained / "run")
