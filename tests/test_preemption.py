"""Preemption through real processes: `python train.py ...` stopped by SIGTERM (or Ctrl-C) saves a
checkpoint at the step it reached and exits non-zero; the same command then finishes the run with
the losses of a run never stopped. Also the two-process set-up of test_parallel.py with SIGTERM sent
to one process only: both stop at the same step.

A run is signalled once its metrics.jsonl shows training under way (the handlers are installed
before the loop starts), and is long enough (400 steps of a tiny model) to be mid-run then.
"""

import ast
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxgpt import checkpoint, preemption, pretrained, training
from tests.conftest import tiny, xla_flags
from tests.test_parallel import _free_port

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240
MAX_ITERS = 400


def cli_args(text, workdir, **overrides):
    """train.py's command line for the tests' tiny config (tests/conftest.py) on `text`."""
    settings = dict(max_iters=MAX_ITERS, eval_interval=100, lr_decay_iters=MAX_ITERS,
                    steps_per_call=1, log_interval=1)
    c = tiny(text, **{**settings, **overrides})
    keys = ("dataset", "data_path", "block_size", "n_layer", "n_head", "n_embd", "batch_size",
            "max_iters", "eval_interval", "eval_iters", "learning_rate", "warmup_iters",
            "lr_decay_iters", "min_lr", "log_interval", "steps_per_call", "dropout",
            *overrides)
    return [str(ROOT / "train.py"), "--config", str(ROOT / "configs/shakespeare_cpu.py"),
            "--workdir", str(workdir), *(f"--config.{k}={c[k]}" for k in dict.fromkeys(keys))]


def cli_config(text, **overrides):
    """The config cli_args gives train.py, built in this process."""
    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs/shakespeare_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    args = cli_args(text, "unused", **overrides)
    for arg in args[args.index("unused") + 1:]:
        key, value = arg[len("--config."):].split("=", 1)
        try:
            config[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # a string: a path, a dataset name
            config[key] = value
    return config


def start(args, log: Path, devices: int = 1, **env):
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("JAXGPT_")
                or k == "JAXGPT_COMPILATION_CACHE"},
               XLA_FLAGS=xla_flags(devices),
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **env)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def finish(proc) -> tuple[int, str]:
    proc.wait(timeout=TIMEOUT)
    return proc.returncode, proc.log.read_text()


def events(workdir) -> list:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_training(workdir, procs, min_step=3):
    """Until metrics.jsonl shows a train step >= min_step (or a process died)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if any(e["event"] == "train" and e["step"] >= min_step for e in events(workdir)):
            return
        for p in procs:
            assert p.poll() is None, p.log.read_text()[-3000:]
        time.sleep(0.02)
    raise AssertionError("the run logged no training step")


def preempted_step(output: str) -> int:
    (line,) = [ln for ln in output.splitlines() if ln.startswith("preempted at step ")]
    assert line.endswith(": checkpoint saved; run the same command to resume"), line
    return int(line.split()[3].rstrip(":"))


def assert_same_events(got, want):
    """The same events in the same order with the same losses (a resumed run continues the same
    data order and RNG stream)."""
    assert [(e["event"], e["step"]) for e in got] == [(e["event"], e["step"]) for e in want]
    for g, w in zip(got, want):
        for k in ("loss", "train_loss", "val_loss"):
            if k in w:
                assert math.isclose(g[k], w[k], rel_tol=1e-6), (w["event"], w["step"], k)


def test_sigterm_saves_and_the_same_command_finishes_like_an_uninterrupted_run(tmp_path,
                                                                               text_file):
    straight = start(cli_args(text_file, tmp_path / "straight"), tmp_path / "straight.log")
    args = cli_args(text_file, tmp_path / "run")
    proc = start(args, tmp_path / "run1.log")
    wait_for_training(tmp_path / "run", [proc])
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    step = preempted_step(out)
    assert 3 <= step < MAX_ITERS
    assert checkpoint.make_manager(tmp_path / "run").latest_step() == step
    # the stopped run logged every step before the one it saved, and nothing after it
    assert max(e["step"] for e in events(tmp_path / "run") if e["event"] == "train") == step - 1

    code, out = finish(start(args, tmp_path / "run2.log"))  # the same command resumes
    assert code == 0, out[-3000:]
    assert f"resuming from the checkpoint of step {step}" in out
    code, out = finish(straight)
    assert code == 0, out[-3000:]
    assert_same_events(events(tmp_path / "run"), events(tmp_path / "straight"))


def test_second_ctrl_c_exits_at_once_and_keeps_the_last_checkpoint(tmp_path, text_file):
    workdir = tmp_path / "run"
    proc = start(cli_args(text_file, workdir), tmp_path / "run.log")
    deadline = time.monotonic() + TIMEOUT
    while not (workdir / "checkpoints" / "100").is_dir():  # step 100's save committed
        assert proc.poll() is None and time.monotonic() < deadline, proc.log.read_text()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    code, out = finish(proc)
    assert code in (-signal.SIGINT, 128 + signal.SIGINT), out[-3000:]
    assert "interrupted: saving a checkpoint" in out
    # whatever the second Ctrl-C cut short, a complete checkpoint remains and loads
    assert 100 in checkpoint.make_manager(workdir, read_only=True).all_steps()
    run = pretrained.load_run(workdir, "latest")
    assert run.step >= 100


def test_two_processes_sigterm_to_one_both_stop_at_the_same_step(tmp_path, text_file):
    """2 processes x 2 CPU devices over jax.distributed; only process 1 gets SIGTERM."""
    port = _free_port()
    workdir = tmp_path / "multi"
    args = cli_args(text_file, workdir)
    procs = [start(args, tmp_path / f"p{i}.log", devices=2,
                   JAXGPT_COORDINATOR=f"127.0.0.1:{port}", JAXGPT_NUM_PROCESSES="2",
                   JAXGPT_PROCESS_ID=str(i)) for i in range(2)]
    wait_for_training(workdir, procs)
    procs[1].send_signal(signal.SIGTERM)
    results = [finish(p) for p in procs]
    for code, out in results:
        assert code == 128 + signal.SIGTERM, out[-3000:]
    steps = {preempted_step(out) for _, out in results}
    assert len(steps) == 1, steps  # the processes agreed on the step
    (step,) = steps
    assert 3 <= step < MAX_ITERS
    assert checkpoint.make_manager(workdir, read_only=True).latest_step() == step


def test_a_stop_during_an_eval_resumes_with_that_eval(tmp_path, text_file, monkeypatch):
    """SIGTERM while step 10 is evaluated (in-process): the eval stops between its calls, step 10
    is saved without a val loss, and the resumed run evaluates step 10 first, then goes on as
    a run never stopped."""
    config = tiny(text_file, max_iters=20, eval_interval=10, eval_iters=20)  # 2 calls a split
    training.train(config, tmp_path / "straight")

    real, evals = training.estimate_loss, []

    def signalled(s, params, key, on_call=None):
        evals.append(key)

        def on_call_then_signal(done, total, seconds):
            if len(evals) == 2 and done == 1:  # step 10's eval, after its first call
                os.kill(os.getpid(), signal.SIGTERM)
            return on_call(done, total, seconds)  # True: stop the eval here

        return real(s, params, key, on_call_then_signal)

    monkeypatch.setattr(training, "estimate_loss", signalled)
    with pytest.raises(preemption.Preempted) as stopped:
        training.train(config, tmp_path / "run")
    assert (stopped.value.step, stopped.value.saved) == (10, True)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert checkpoint.val_losses(tmp_path / "run") == {}  # step 10 has no val loss
    monkeypatch.undo()
    training.train(config, tmp_path / "run")
    assert_same_events(events(tmp_path / "run"), events(tmp_path / "straight"))
