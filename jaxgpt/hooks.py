"""Hooks: the work the training loop hands off after each compiled call and each eval.

The loop (training.Loop) calls every hook at each moment of `Hook`, in list order (`make`):
the finite check, metrics writing, the progress bar, the CPU time estimate, the profiler, the
checkpoints. Each is a small object holding what it needs; a moment's arguments are what the
hooks use (the step, the state, a call's metrics, an eval's losses); none changes the state.
"""

import dataclasses
import math

from tqdm import tqdm

from jaxgpt import checkpoint, profiling, progress
from jaxgpt import metrics as metrics_lib
from jaxgpt.errors import UserError


@dataclasses.dataclass
class Call:
    """One finished compiled call, read back on the host one call late (so the host never waits
    for the call in flight)."""

    index: int  # 0 for the run's first call (the one that compiled)
    first_step: int
    metrics: dict  # {"loss", "grad_norm", "lr"}: (n,) numpy arrays
    seconds: float  # its run time on the device
    mfu: float | None  # model FLOPs utilization, where the chip's peak is known

    @property
    def n(self) -> int:
        return len(self.metrics["loss"])

    @property
    def step_ms(self) -> float:
        return 1000 * self.seconds / self.n


class Hook:
    """What the loop calls; a hook overrides the moments it cares about."""

    def before_call(self, index: int, step: int, state) -> None:
        """Before dispatching call `index` (0: the one that compiles), which starts at `step`."""

    def after_call(self, call: Call) -> None:
        """A call's metrics are on the host."""

    def eval_progress(self, step: int, done: int, total: int, seconds: float) -> None:
        """`done` of the eval's `total` calls at `step` ran, the last in `seconds`."""

    def after_eval(self, step: int, state, losses: dict, measures: dict) -> None:
        """The eval at `step` finished: {train, val} losses and a task's own measures."""

    def on_stop(self, step: int, state) -> bool:
        """The run stops at `step` (SIGTERM, Ctrl-C); True if this hook saved the state."""
        return False

    def at_end(self, step: int, state) -> None:
        """The run reached the schedule's end (not called when it stops early)."""


def make(config, workdir, writer: metrics_lib.Metrics, bar: tqdm,
         ckpt: checkpoint.RunCheckpoints | None, schedule, say, *, enabled: bool) -> list[Hook]:
    """A run's hooks, in the order they run; without checkpoints (eval_only) neither the
    profiler nor the checkpoints. `enabled`: this process writes (process 0)."""
    hooks = [FiniteCheck(), MetricsLog(writer, config, say), ProgressBar(bar),
             CPUTimeWarning(config, say)]
    if ckpt is not None:
        hooks += [Profile(profiling.Profiler(config, workdir, enabled=enabled, say=say)),
                  Checkpoints(ckpt, schedule)]
    return hooks


def check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise UserError(f"loss is {loss} at step {step}: training diverged; lower "
                        "--config.learning_rate, keep --config.grad_clip > 0, or use "
                        "--config.dtype=float32 (no checkpoint was written for this state)")


class FiniteCheck(Hook):
    """A NaN or infinite loss ends the run with one line, before it is logged or saved."""

    def after_call(self, call):
        for i, loss in enumerate(call.metrics["loss"]):
            check_finite(float(loss), call.first_step + i)

    def after_eval(self, step, state, losses, measures):
        check_finite(losses["val"], step)


class MetricsLog(Hook):
    """metrics.jsonl, TensorBoard and W&B (metrics.Metrics): every log_interval-th step, every
    eval; the eval line printed as nanoGPT prints it."""

    def __init__(self, writer: metrics_lib.Metrics, config, say):
        self.writer, self.say, self.log_interval = writer, say, config.log_interval
        self.tokens_per_step = (config.batch_size * config.gradient_accumulation_steps
                                * config.block_size)

    def after_call(self, call):
        extra = {} if call.mfu is None else {"mfu": call.mfu}
        for i in range(call.n):
            if (call.first_step + i) % self.log_interval == 0:
                # loss, grad_norm, lr (+ loss_scale in float16): the step's own metrics
                own = {k: float(v[i]) for k, v in call.metrics.items()}
                self.writer.write("train", call.first_step + i, **own, step_ms=call.step_ms,
                                  tokens_per_sec=self.tokens_per_step * 1000 / call.step_ms,
                                  **extra)

    def after_eval(self, step, state, losses, measures):
        self.say(f"step {step}: train loss {losses['train']:.4f}, val loss "
                 f"{losses['val']:.4f}" + "".join(f", {k} {v:.4f}" for k, v in measures.items()))
        self.writer.write("eval", step, train_loss=losses["train"], val_loss=losses["val"],
                          lr=float(state.lr_schedule(step)), **measures)
        self.writer.flush()


class ProgressBar(Hook):
    """A tqdm bar over the steps: the last loss, ms/step and MFU; what the loop is doing."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def before_call(self, index, step, state):
        if index == 0:
            self.bar.set_postfix_str("compiling the training step")

    def after_call(self, call):
        shown = {"loss": f"{float(call.metrics['loss'][-1]):.4f}", "ms": f"{call.step_ms:.1f}"}
        if call.mfu is not None:
            shown["mfu"] = f"{100 * call.mfu:.1f}%"
        self.bar.update(call.n)
        self.bar.set_postfix(shown)

    def eval_progress(self, step, done, total, seconds):
        self.bar.set_postfix_str(f"evaluating {done}/{total}")

    def on_stop(self, step, state):
        self.bar.set_postfix_str("saving a checkpoint")
        return False


class CPUTimeWarning(Hook):
    """On a CPU, says once when the measured pace implies a long run (progress.CPUEstimate)."""

    def __init__(self, config, say):
        self.estimate, self.say = progress.CPUEstimate(config), say
        self.eval_iters = config.eval_iters

    def _warn(self, line):
        if line:
            self.say(line)

    def eval_progress(self, step, done, total, seconds):
        if done == 1:
            per_batch = seconds * total / (2 * self.eval_iters)
            self._warn(self.estimate.after_eval_batches(per_batch, step))

    def after_call(self, call):
        if call.index == 0:
            self._warn(self.estimate.after_train_call(call.seconds / call.n, call.first_step))


class Profile(Hook):
    """profile_steps: a jax.profiler trace of that many steps after the first call."""

    def __init__(self, profiler: profiling.Profiler):
        self.profiler = profiler

    def before_call(self, index, step, state):
        self.profiler.before_call(step, index, state)

    def at_end(self, step, state):
        self.profiler.close(state, step)  # a run shorter than profile_steps


class Checkpoints(Hook):
    """Saves after each eval (always_save_checkpoint: every one, else improvements and the
    final one), on a stop, and the lecture's last step, which comes after its last eval."""

    def __init__(self, ckpt: checkpoint.RunCheckpoints, schedule):
        self.ckpt, self.schedule = ckpt, schedule  # schedule: training.Schedule

    def after_eval(self, step, state, losses, measures):
        self.ckpt.after_eval(state, losses, final=step == self.schedule.last_eval)

    def on_stop(self, step, state):
        return self.ckpt.save_now(state)  # written completely before the run exits

    def at_end(self, step, state):
        if self.schedule.saves_last_step(step):
            self.ckpt.save_now(state)  # no val loss: the latest, never the "best"
