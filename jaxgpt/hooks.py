"""Hooks: the work the training loop hands off after each compiled call and each eval.

The loop (training.Loop) calls every hook at each moment of `Hook`, in list order: metrics
writing, the progress bar, the finite check, the CPU time estimate, the profiler, the
checkpoints. Each is a small object with the state it needs; none of them touches the train
state except to read it.
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

    index: int  # 0 for the run's first call
    first_step: int
    metrics: dict  # {"loss", "grad_norm", "lr"}: (n,) numpy arrays
    seconds: float  # since the previous call finished: its run time on the device
    mfu: float | None  # model FLOPs utilization, where the chip's peak is known

    @property
    def n(self) -> int:
        return len(self.metrics["loss"])

    @property
    def step_ms(self) -> float:
        return 1000 * self.seconds / self.n


class Hook:
    """What the loop calls; a hook overrides the moments it cares about. `loop` is the
    training.Loop: its state, step, calls and schedule are the hook's to read."""

    def before_call(self, loop, n: int) -> None:
        """Before dispatching the call that runs steps loop.step .. loop.step + n - 1."""

    def after_call(self, loop, call: Call) -> None:
        """A call's metrics are on the host."""

    def eval_progress(self, loop, done: int, total: int, seconds: float) -> None:
        """`done` of an eval's `total` calls ran, the last in `seconds`."""

    def after_eval(self, loop, losses: dict, extra: dict) -> None:
        """An eval at loop.step finished: {train, val} losses and a task's own measures."""

    def at_end(self, loop) -> None:
        """The run reached max_iters (not called when it stops early)."""


def check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise UserError(f"loss is {loss} at step {step}: training diverged; lower "
                        "--config.learning_rate, keep --config.grad_clip > 0, or use "
                        "--config.dtype=float32 (no checkpoint was written for this state)")


class FiniteCheck(Hook):
    """A NaN or infinite loss ends the run with one line, before it is logged or saved."""

    def after_call(self, loop, call):
        for i, loss in enumerate(call.metrics["loss"]):
            check_finite(float(loss), call.first_step + i)

    def after_eval(self, loop, losses, extra):
        check_finite(losses["val"], loop.step)


class MetricsLog(Hook):
    """metrics.jsonl, TensorBoard and W&B (metrics.Metrics): every log_interval-th step, every
    eval; the eval line printed as nanoGPT prints it."""

    def __init__(self, writer: metrics_lib.Metrics, config, say):
        self.writer, self.say, self.log_interval = writer, say, config.log_interval
        self.tokens_per_step = (config.batch_size * config.gradient_accumulation_steps
                                * config.block_size)

    def after_call(self, loop, call):
        extra = {} if call.mfu is None else {"mfu": call.mfu}
        for i in range(call.n):
            if (call.first_step + i) % self.log_interval == 0:
                # loss, grad_norm, lr (+ loss_scale in float16): the step's own metrics
                own = {k: float(v[i]) for k, v in call.metrics.items()}
                self.writer.write("train", call.first_step + i, **own, step_ms=call.step_ms,
                                  tokens_per_sec=self.tokens_per_step * 1000 / call.step_ms,
                                  **extra)

    def after_eval(self, loop, losses, extra):
        self.say(f"step {loop.step}: train loss {losses['train']:.4f}, val loss "
                 f"{losses['val']:.4f}" + "".join(f", {k} {v:.4f}" for k, v in extra.items()))
        self.writer.write("eval", loop.step, train_loss=losses["train"], val_loss=losses["val"],
                          lr=float(loop.state.lr_schedule(loop.step)), **extra)
        self.writer.flush()


class ProgressBar(Hook):
    """A tqdm bar over the steps: the last loss, ms/step and MFU; what the loop is doing."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def status(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def before_call(self, loop, n):
        if loop.calls == 0:
            self.status("compiling the training step")

    def after_call(self, loop, call):
        shown = {"loss": f"{float(call.metrics['loss'][-1]):.4f}", "ms": f"{call.step_ms:.1f}"}
        if call.mfu is not None:
            shown["mfu"] = f"{100 * call.mfu:.1f}%"
        self.bar.update(call.n)
        self.bar.set_postfix(shown)

    def eval_progress(self, loop, done, total, seconds):
        self.status(f"evaluating {done}/{total}")


class CPUTimeWarning(Hook):
    """On a CPU, says once when the measured pace implies a long run (progress.CPUEstimate)."""

    def __init__(self, config, say):
        self.estimate, self.say = progress.CPUEstimate(config), say
        self.eval_iters = config.eval_iters

    def _warn(self, line):
        if line:
            self.say(line)

    def eval_progress(self, loop, done, total, seconds):
        if done == 1:
            per_batch = seconds * total / (2 * self.eval_iters)
            self._warn(self.estimate.after_eval_batches(per_batch, loop.step))

    def after_call(self, loop, call):
        if call.index == 0:
            self._warn(self.estimate.after_train_call(call.seconds / call.n, call.first_step))


class Profile(Hook):
    """profile_steps: a jax.profiler trace of that many steps after the first call."""

    def __init__(self, profiler: profiling.Profiler):
        self.profiler = profiler

    def before_call(self, loop, n):
        self.profiler.before_call(loop.step, loop.calls, loop.state)

    def at_end(self, loop):
        self.profiler.close(loop.state, loop.step)  # a run shorter than profile_steps


class Checkpoints(Hook):
    """Saves after each eval (always_save_checkpoint: every one, else improvements and the
    final one), and the lecture's last step, which comes after its last eval."""

    def __init__(self, ckpt: checkpoint.RunCheckpoints):
        self.ckpt = ckpt

    def after_eval(self, loop, losses, extra):
        self.ckpt.after_eval(loop.state, losses, final=loop.step == loop.schedule.last_eval)

    def at_end(self, loop):
        if loop.schedule.saves_last_step(loop.step):
            self.ckpt.save_now(loop.state)  # no val loss: the latest, never the "best"
