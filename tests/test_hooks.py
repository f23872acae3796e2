"""The loop (training.Loop) and its hooks (hooks.py), without compiling anything: a fake compiled
call, a fake eval and recording hooks check the order of events, what each hook receives, the
one-call-late read-back, the run time of a call, and the stop on a signal."""

import math
import signal
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jaxgpt import hooks, preemption, training
from jaxgpt.errors import UserError
from tests.conftest import tiny


class Recorder(hooks.Hook):
    """Every moment as a tuple, in the order the loop calls them."""

    def __init__(self, saves=False):
        self.events, self.saves = [], saves

    def before_call(self, index, step, state):
        self.events.append(("before_call", index, step, state.step))

    def after_call(self, call):
        self.events.append(("after_call", call.index, call.first_step, call.n, call.seconds))

    def eval_progress(self, step, done, total, seconds):
        self.events.append(("eval_progress", step, done, total))

    def after_eval(self, step, state, losses, measures):
        self.events.append(("after_eval", step, state.step, losses["val"], measures))

    def on_stop(self, step, state):
        self.events.append(("on_stop", step, state.step))
        return self.saves

    def at_end(self, step, state):
        self.events.append(("at_end", step, state.step))


class State(SimpleNamespace):
    """A train state whose only field is its step (the fake call advances it)."""


class Signals:
    """preemption.Preemption's interface: a stop asked at the `at`-th check (1-based)."""

    def __init__(self, at=None):
        self.at, self.checks, self.signum = at, 0, None

    def requested(self):
        self.checks += 1
        if self.at is not None and self.checks >= self.at:
            self.signum = signal.SIGTERM
            return True
        return False


def fake_setup(compile_seconds=0.0):
    """A Setup whose compiled call runs n steps in Python: loss = 1 / (step + 1); its first
    call blocks for `compile_seconds`, as jit compiles before dispatching."""
    calls = []

    def train_call(state, data, num_steps):
        time.sleep(0.0 if calls else compile_seconds)
        calls.append(num_steps)
        steps = np.arange(state.step, state.step + num_steps)
        step = state.step + num_steps
        return State(step=step, params=step), {"loss": 1.0 / (steps + 1),
                                                    "grad_norm": np.ones(num_steps),
                                                    "lr": np.zeros(num_steps)}

    batches = SimpleNamespace(train_data=lambda step, n: None, eval_iters=2)
    return SimpleNamespace(train_call=train_call, batches=batches)


def make_loop(schedule, recorder, signals=None, measures=(), compile_seconds=0.0):
    return training.Loop(fake_setup(compile_seconds), schedule, [recorder],
                         eval_key=jax.random.PRNGKey(0), measures=list(measures),
                         mfu=lambda s: None, signals=signals or Signals(), say=lambda *a: None)


EVAL_SECONDS = 0.1


@pytest.fixture(autouse=True)
def fake_eval(monkeypatch):
    """estimate_loss without a model: two eval calls of EVAL_SECONDS / 2, val = 1 / (step + 1)."""
    def estimate_loss(s, params, key, on_call=None):
        for done in (1, 2):
            time.sleep(EVAL_SECONDS / 2)
            if on_call and on_call(done, 2, 0.0):
                return None
        step = params
        return {"train": 1.0 / (step + 1), "val": 1.0 / (step + 1)}

    monkeypatch.setattr(training, "estimate_loss", estimate_loss)


def run(loop, step=0):
    return loop.run(State(step=step, params=step))  # the fake eval reads the step off params


def test_one_iteration_in_order_reading_each_call_back_one_call_late():
    rec = Recorder()
    run(make_loop(training.Schedule(6, 3, steps_per_call=2), rec))
    names = [(e[0], *e[1:3]) for e in rec.events if e[0] != "eval_progress"]
    assert names == [
        ("after_eval", 0, 0),
        ("before_call", 0, 0),  # call 0: steps 0, 1
        ("before_call", 1, 2),  # call 1: step 2 (the eval at 3 ends it) dispatched ...
        ("after_call", 0, 0),  # ... before call 0 is read back
        ("after_call", 1, 2),  # an eval reads the call in flight back first
        ("after_eval", 3, 3),
        ("before_call", 2, 3),
        ("before_call", 3, 5),
        ("after_call", 2, 3),
        ("after_call", 3, 5),
        ("after_eval", 6, 6),
        ("at_end", 6, 6),
    ]
    progress = [e[1:] for e in rec.events if e[0] == "eval_progress"]
    assert progress == [(s, d, 2) for s in (0, 3, 6) for d in (1, 2)]


def test_measures_join_the_losses_at_every_eval():
    rec = Recorder()
    run(make_loop(training.Schedule(4, 2), rec,
                  measures=[lambda p: {"accuracy": 0.5}, lambda p: {"acc_norm": p / 10}]))
    evals = [e for e in rec.events if e[0] == "after_eval"]
    # the measures see the params of the step evaluated (the fake params are the step)
    assert [(e[1], e[4]) for e in evals] == [
        (0, {"accuracy": 0.5, "acc_norm": 0.0}), (2, {"accuracy": 0.5, "acc_norm": 0.2}),
        (4, {"accuracy": 0.5, "acc_norm": 0.4})]


def test_a_calls_seconds_leave_out_the_compilation_and_the_evals():
    """The fake calls finish as soon as they are dispatched (a run time of ~0), the first
    after 0.2 s of "compilation", and each eval takes 0.1 s: no call's seconds include either."""
    rec = Recorder()
    run(make_loop(training.Schedule(6, 3), rec, compile_seconds=0.2))
    seconds = [e[4] for e in rec.events if e[0] == "after_call"]
    assert len(seconds) == 6
    assert all(0 <= s < EVAL_SECONDS / 2 for s in seconds), seconds


def test_a_signal_stops_at_a_call_boundary_and_the_hooks_save():
    rec = Recorder(saves=True)
    with pytest.raises(preemption.Preempted) as stop:
        run(make_loop(training.Schedule(10, 5, steps_per_call=1), rec, signals=Signals(at=5)))
    # checks: eval 0 (2 calls), then before each call: the 3rd call's check stops it
    assert stop.value.step == 2 and stop.value.saved and stop.value.signum == signal.SIGTERM
    assert rec.events[-1] == ("on_stop", 2, 2)
    assert ("after_call", 1, 1) in [e[:3] for e in rec.events]  # the call in flight logged
    assert not any(e[0] == "at_end" for e in rec.events)


def test_a_signal_during_an_eval_stops_before_the_eval_is_reported():
    rec = Recorder()
    with pytest.raises(preemption.Preempted) as stop:
        run(make_loop(training.Schedule(10, 5), rec, signals=Signals(at=1)))
    assert stop.value.step == 0 and not stop.value.saved
    assert [e[0] for e in rec.events] == ["eval_progress", "on_stop"]


def test_eval_only_is_one_eval_at_the_loaded_step():
    rec = Recorder()
    run(make_loop(training.Schedule(7, 5), rec), step=7)
    assert [e[0] for e in rec.events if e[0] != "eval_progress"] == ["after_eval", "at_end"]


# ---------------------------------------------------------------------------------------------
# The hooks, one by one


def call(first_step, losses, seconds=0.5, index=1, mfu=None):
    n = len(losses)
    return hooks.Call(index, first_step, {"loss": np.array(losses), "grad_norm": np.ones(n),
                                          "lr": np.full(n, 1e-3)}, seconds, mfu)


def test_finite_check_names_the_step_of_a_nan():
    with pytest.raises(UserError, match="loss is nan at step 12"):
        hooks.FiniteCheck().after_call(call(10, [1.0, 2.0, math.nan]))
    with pytest.raises(UserError, match="loss is inf at step 5"):
        hooks.FiniteCheck().after_eval(5, None, {"train": 1.0, "val": math.inf}, {})


class Writer:
    def __init__(self):
        self.rows = []

    def write(self, event, step, **values):
        self.rows.append((event, step, values))

    def flush(self):
        pass


def test_metrics_log_writes_every_log_interval_and_nanogpts_eval_line():
    writer, said = Writer(), []
    log = hooks.MetricsLog(writer, tiny(log_interval=2, batch_size=4, block_size=8), said.append)
    log.after_call(call(3, [1.0, 2.0, 3.0], seconds=0.3, mfu=0.25))  # steps 3, 4, 5: 4 logged
    assert [(e, s) for e, s, _ in writer.rows] == [("train", 4)]
    values = writer.rows[0][2]
    assert values["loss"] == 2.0 and values["step_ms"] == pytest.approx(100.0)
    assert values["tokens_per_sec"] == pytest.approx(4 * 8 / 0.1) and values["mfu"] == 0.25
    state = SimpleNamespace(lr_schedule=lambda step: 1e-4 * step)
    log.after_eval(20, state, {"train": 1.5, "val": 1.75}, {"accuracy": 0.5})
    assert said == ["step 20: train loss 1.5000, val loss 1.7500, accuracy 0.5000"]
    assert writer.rows[-1] == ("eval", 20, {"train_loss": 1.5, "val_loss": 1.75,
                                            "lr": pytest.approx(2e-3), "accuracy": 0.5})


class Ckpt:
    def __init__(self):
        self.calls = []

    def after_eval(self, state, losses, *, final):
        self.calls.append(("after_eval", final))

    def save_now(self, state):
        self.calls.append(("save_now", state))
        return True


@pytest.mark.parametrize("lecture", [False, True])
def test_checkpoints_save_after_evals_on_a_stop_and_the_lectures_last_step(lecture):
    ckpt = Ckpt()
    hook = hooks.Checkpoints(ckpt, training.Schedule(10, 4, eval_before_last_step=lecture))
    for step in (8, 9, 10):
        hook.after_eval(step, None, {"val": 1.0}, {})
    last = 9 if lecture else 10
    assert ckpt.calls == [("after_eval", s == last) for s in (8, 9, 10)]
    assert hook.on_stop(4, "state at 4") is True
    hook.at_end(10, "state at 10")
    saved_at_end = [c for c in ckpt.calls if c == ("save_now", "state at 10")]
    assert len(saved_at_end) == (1 if lecture else 0)  # nanoGPT's last eval saved it already


def test_make_wires_each_hook_once_in_order(tmp_path):
    c = tiny()
    bar = SimpleNamespace(set_postfix_str=lambda s: None)
    schedule = training.Schedule.from_config(c)
    kinds = [type(h) for h in hooks.make(c, tmp_path, Writer(), bar, Ckpt(), schedule, print,
                                         enabled=False)]
    assert kinds == [hooks.FiniteCheck, hooks.MetricsLog, hooks.ProgressBar,
                     hooks.CPUTimeWarning, hooks.Profile, hooks.Checkpoints]
    eval_only = hooks.make(c, tmp_path, Writer(), bar, None, schedule, print, enabled=False)
    assert hooks.Checkpoints not in map(type, eval_only) and hooks.Profile not in map(type,
                                                                                  eval_only)
