"""What the training loop tells the user while it runs: how long the rest will take on a CPU
(where a GPU recipe can need hours), and the model FLOPs utilization where the chip's peak is
known (the benchmark's datasheet table)."""

import math

import jax

from jaxgpt import flops
from jaxgpt.dtype import resolve_dtype

CPU_WARN_SECONDS = 30 * 60
CPU_RECIPE = "configs/shakespeare_cpu.py"


def duration(seconds: float) -> str:
    """3 h 05 min | 12 min | 40 s"""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds:.0f} s"


class CPUEstimate:
    """Says once, on a CPU-only machine, when the measured pace implies more than ~30 minutes
    left: first from the eval's forward passes (a training step costs about three of them: the
    backward is two), then from the first timed training call. Calls return the line or None."""

    def __init__(self, config):
        self.config = config
        self.done = jax.default_backend() != "cpu"
        self.eval_seconds = None  # one eval, both splits

    def after_eval_batches(self, seconds_per_batch: float, step: int) -> str | None:
        c = self.config
        self.eval_seconds = 2 * c.eval_iters * seconds_per_batch
        step_seconds = 3 * c.gradient_accumulation_steps * seconds_per_batch
        return self._check(step_seconds, step, "the first eval batches")

    def after_train_call(self, step_seconds: float, step: int) -> str | None:
        return self._check(step_seconds, step, "the first training steps")

    def _check(self, step_seconds: float, step: int, measured: str) -> str | None:
        if self.done:
            return None
        c = self.config
        steps_left = c.max_iters - step
        evals_left = c.max_iters // c.eval_interval - step // c.eval_interval + bool(
            c.max_iters % c.eval_interval)
        eval_seconds = self.eval_seconds or 0.0
        total = step_seconds * steps_left + eval_seconds * evals_left
        if total <= CPU_WARN_SECONDS:
            return None
        self.done = True
        return (f"warning: this run needs about {duration(total)} more on this CPU "
                f"({1000 * step_seconds:.0f} ms/step x {steps_left} steps + {evals_left} evals "
                f"of {duration(eval_seconds)}, from {measured}); {CPU_RECIPE} is the recipe "
                "sized for a CPU. Going on (Ctrl-C saves a checkpoint and stops).")


class MFU:
    """Model FLOPs utilization of a step time: nanoGPT's FLOPs count over the datasheet peak of
    every device in the mesh; `None` where the peak is unknown (CPUs, unlisted chips). Muon's
    Newton–Schulz FLOPs are optimizer work, not model FLOPs: not counted (flops.optimizer_flops)."""

    def __init__(self, config, n_params: int, n_devices: int, device=None):
        device = device or jax.devices()[0]
        peak, _ = flops.datasheet_peak(device, resolve_dtype(config.dtype))
        tokens = config.batch_size * config.gradient_accumulation_steps * config.block_size
        self.step_flops = flops.flops_per_token(config, n_params) * tokens
        self.peak = peak * n_devices

    def __call__(self, step_seconds: float) -> float | None:
        if not math.isfinite(self.peak) or step_seconds <= 0:
            return None
        return self.step_flops / step_seconds / self.peak
