"""The training loop: set up a run, then step, evaluate and save on a schedule.

    train(config, workdir)  # what train.py calls
    setup(config)           # data, model, mesh, state, the compiled calls (bench.py, tests)

Three parts, each testable on its own: `Schedule` (when to evaluate, how many steps each
compiled call runs: arithmetic on step numbers), `Loop` (the mutable state of one run: the
train state, the step, the call in flight) and the hooks (hooks.py: metrics, progress bar,
checkpoints, ...: the per-call work the loop hands off). The compiled side is step.py.
"""

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from tqdm import tqdm

from jaxgpt import batches as batches_lib
from jaxgpt import (
    checkpoint,
    compile_cache,
    datasets,
    hellaswag,
    lock,
    parallel,
    preemption,
    pretrained,
    profiling,
    progress,
    step,
)
from jaxgpt import config as config_lib
from jaxgpt import data as data_lib
from jaxgpt import hooks as hooks_lib
from jaxgpt import metrics as metrics_lib
from jaxgpt import workdir as workdir_lib
from jaxgpt.errors import UserError
from jaxgpt.model import auto_dtype, count_params, make_model, resolve_dtype

# ---------------------------------------------------------------------------------------------
# Setup: everything the loop needs before its first step


class Setup(NamedTuple):
    """Everything the loop needs before its first step (bench.py times these same calls)."""

    dataset: data_lib.Dataset
    model: Any
    mesh: jax.sharding.Mesh
    state: step.TrainState
    batches: batches_lib.BatchSource
    train_call: Callable  # (state, data, num_steps=n) -> (state, metrics), state donated
    evaluate: Callable  # (params, data, keys) -> mean loss, one batch per key


def setup(config, *, dataset=None, mesh=None) -> Setup:
    """Validate the config, load the data, build the model, mesh, state and the compiled calls."""
    config_lib.validate(config)
    dataset = dataset or datasets.load(config)
    model = make_model(config, dataset.tokenizer.vocab_size)
    mesh = mesh or parallel.make_mesh(config)
    parallel.check_batch(config, mesh)
    dataset = hellaswag.with_hellaswag(dataset, config, model, mesh)  # scored at every eval
    state = step.create_train_state(config, model, mesh)
    source = batches_lib.make(dataset, config, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return Setup(dataset, model, mesh, state, source,
                 step.jit_train_steps(shardings, source.train_batch),
                 step.jit_eval_loss(state.apply_fn, source.eval_batch, mesh))


def estimate_loss(s: Setup, params, key, on_call=None) -> dict | None:
    """{split: mean loss over eval_iters batches} (the lecture's estimate_loss), in calls of
    eval_batches_per_call batches. `on_call(done, total, seconds)` runs after each call; if it
    returns True the eval stops there and returns None."""
    n = batches_lib.eval_batches_per_call(s.batches.eval_iters)
    per_split = s.batches.eval_iters // n
    losses = {}
    for i, split in enumerate(("train", "val")):
        # every batch's key drawn at once: the calls see the batches one call would see
        keys = jax.random.split(jax.random.fold_in(key, i), s.batches.eval_iters)
        total = 0.0
        for j in range(per_split):
            chunk = keys[j * n:(j + 1) * n]  # (n,) this call's batches
            loss = s.evaluate(params, s.batches.eval_data(split, chunk), chunk)  # 1st: compiles
            dispatched = time.perf_counter()
            total += float(loss)  # waits for the device
            # progress; the call's run time, without its compilation
            if on_call and on_call(i * per_split + j + 1, 2 * per_split,
                                   time.perf_counter() - dispatched):
                return None
        losses[split] = total / per_split
    return losses


# ---------------------------------------------------------------------------------------------
# The schedule: pure arithmetic on step numbers


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When the loop evaluates and how many steps each compiled call may run.

    nanoGPT evaluates every eval_interval steps and after the last step (at max_iters); the
    lecture's loop (`eval_before_last_step`) at iter max_iters - 1 instead, before that iter's
    step, and not after it. A call never runs past the next eval or max_iters. `evaluated`: a
    resumed step whose eval was done and saved already (a step saved on preemption in the
    middle of its eval has no val loss, and is evaluated again).
    """

    max_iters: int
    eval_interval: int
    steps_per_call: int = 1
    eval_before_last_step: bool = False
    evaluated: int | None = None

    @classmethod
    def from_config(cls, config, evaluated: int | None = None) -> "Schedule":
        return cls(config.max_iters, config.eval_interval, config.steps_per_call,
                   config.eval_before_last_step, evaluated)

    @property
    def last_eval(self) -> int:
        return self.max_iters - 1 if self.eval_before_last_step else self.max_iters

    def eval_due(self, step: int) -> bool:
        regular = step % self.eval_interval == 0 and step < self.last_eval
        return (regular or step == self.last_eval) and step != self.evaluated

    def call_steps(self, step: int) -> int:
        """How many steps the call starting at `step` runs: up to the next eval or the end."""
        next_eval = (step // self.eval_interval + 1) * self.eval_interval
        if step < self.last_eval:
            next_eval = min(next_eval, self.last_eval)
        return min(self.steps_per_call, next_eval - step, self.max_iters - step)

    def events(self, step: int):
        """From `step` on: ("eval", s) and ("train", s, n) in the order the loop runs them."""
        while True:
            if self.eval_due(step):
                yield ("eval", step)
            if step >= self.max_iters:
                return
            n = self.call_steps(step)
            yield ("train", step, n)
            step += n

    def saves_last_step(self, step: int) -> bool:
        """The lecture's loop ends with a step after its last eval: saved without a val loss."""
        return step >= self.max_iters and self.last_eval < step


# ---------------------------------------------------------------------------------------------
# The loop


class Loop:
    """One run: the train state, the step it is at and the call in flight, stepped through the
    schedule's events; everything else is a hook's."""

    def __init__(self, s: Setup, state, schedule: Schedule, hooks: list[hooks_lib.Hook], *,
                 eval_key, mfu: progress.MFU, signals: preemption.Preemption,
                 progress_bar: hooks_lib.ProgressBar, ckpt: checkpoint.RunCheckpoints | None,
                 say):
        self.s, self.state, self.step = s, state, int(state.step)
        self.schedule, self.hooks, self.eval_key, self.mfu = schedule, hooks, eval_key, mfu
        self.signals, self.progress_bar, self.ckpt, self.say = signals, progress_bar, ckpt, say
        self.calls = 0  # compiled train calls dispatched
        self.collected = 0  # and read back
        self.pending = None  # (first step, metrics on the device) of the call in flight
        self.clock = time.perf_counter()  # when the previous call finished

    def _each(self, moment: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, moment)(self, *args)

    def run(self):
        """Train to max_iters; returns the state. Preempted after a save if a stop is asked."""
        for event in self.schedule.events(self.step):
            if event[0] == "eval":
                self.collect()  # before evaluating, so logs stay in step order
                if not self.evaluate():
                    self.stop()
                self.clock = time.perf_counter()  # the eval is not the next call's run time
            elif self.signals.requested():  # all processes agree on this step
                self.stop()
            else:
                self.dispatch(event[2])
        self.collect()
        self._each("at_end")
        return self.state

    def dispatch(self, n: int) -> None:
        """Start the call that runs the next n steps, then read back the one before it."""
        self._each("before_call", n)
        start = time.perf_counter()
        with compile_cache.hits() as hits:  # the first call compiles, or loads from the cache
            self.state, metrics = self.s.train_call(
                self.state, self.s.batches.train_data(self.step, n), num_steps=n)
        if self.calls == 0:  # jit compiled it before dispatching: time the runs without it
            seconds = time.perf_counter() - start
            self.say(f"loaded the compiled training step from the compilation cache in "
                     f"{seconds:.1f} s" if hits() else
                     f"compiled the training step in {seconds:.1f} s")
            self.clock = time.perf_counter()
        self.collect()  # waits for the previous call only
        self.pending = (self.step, metrics)
        self.step += n
        self.calls += 1

    def collect(self) -> None:
        """The call in flight's metrics to the host, handed to the hooks."""
        if self.pending is None:
            return
        first_step, metrics = self.pending
        self.pending = None
        host = jax.device_get(metrics)  # waits for that call
        now = time.perf_counter()
        seconds, self.clock = now - self.clock, now
        call = hooks_lib.Call(self.collected, first_step, host, seconds,
                    self.mfu(seconds / len(host["loss"])))
        self.collected += 1
        self._each("after_call", call)

    def evaluate(self) -> dict | None:
        """The losses at this step (hooks log and save them), or None if a stop came first."""
        def on_call(done, total, seconds):
            self._each("eval_progress", done, total, seconds)
            return self.signals.requested()  # stop without finishing the eval

        key = jax.random.fold_in(self.eval_key, self.step)
        losses = estimate_loss(self.s, self.state.params, key, on_call)
        if losses is None:
            return None
        # a task's own measures (addition: exact-match accuracy on held-out problems;
        # hellaswag_path: HellaSwag's acc and acc_norm)
        evaluate = self.s.dataset.evaluate
        extra = evaluate(self.s.model, self.state.params) if evaluate else {}
        self._each("after_eval", losses, extra)
        return losses

    def stop(self):
        """Preempted: log the call in flight, save this step, wait for the write, raise."""
        self.collect()
        self.progress_bar.status("saving a checkpoint")
        saved = self.ckpt.save_now(self.state) if self.ckpt else False
        raise preemption.Preempted(self.step, self.signals.signum, saved)


# ---------------------------------------------------------------------------------------------
# train(): where the run starts, what it opens, the loop


def starting_point(config, workdir, stack: contextlib.ExitStack):
    """(config, Setup, state, resumed step or None, checkpoints or None) of a run about to
    train or evaluate: its own checkpoint if it has one (init_from auto / resume), else the
    weights init_from names, else a fresh init. `config` has the model keys the weights fix.
    eval_only reads checkpoints but never writes one. What it opens, `stack` closes."""
    weights = None
    if pretrained.is_weights(config.init_from):
        weights = pretrained.load(config.init_from, config)
        config = weights.config  # the weights fix the model's shape
    dataset = datasets.load(config, weights.tokenizer) if weights else None
    s = setup(config, dataset=dataset)
    stack.callback(s.batches.close)  # the host prefetch thread, if any
    state = step.with_params(s.state, weights.params) if weights else s.state
    if config.eval_only:
        has_checkpoint = (workdir / checkpoint.CHECKPOINT_DIR).is_dir()
        if config.init_from == "resume" or (config.init_from == "auto" and has_checkpoint):
            state, at = checkpoint.restore(workdir, checkpoint.abstract_like(state))
            return config, s, state, at, None
        return config, s, state, None, None
    ckpt = checkpoint.RunCheckpoints(config, workdir)
    stack.callback(ckpt.close)  # waits for the async checkpoint writes
    state, resumed = ckpt.start(state, s.dataset.tokenizer)  # a finetune resumes its own run
    return config, s, state, resumed, ckpt


def _announce(config, s: Setup, state, resumed, workdir, say) -> None:
    if resumed is not None:
        say(f"resuming from the checkpoint of step {resumed} in {workdir}")
    elif pretrained.is_weights(config.init_from):
        say(f"starting from the weights of {config.init_from} (step 0, a fresh optimizer)")
    devices = (f"(devices: {s.mesh.devices.size} {jax.devices()[0].platform}, "
               f"mesh {dict(s.mesh.shape)})")
    if config.param_count == "all":  # gpt.py: print(sum(p.numel() ...)/1e6, 'M parameters')
        say(f"{count_params(state.params, non_embedding=False) / 1e6} M parameters {devices}")
    else:
        say(f"number of parameters: {count_params(state.params) / 1e6:.2f}M {devices}")
    why = f" (auto: {auto_dtype()[1]})" if config.dtype == "auto" else ""
    say(f"compute dtype: {resolve_dtype(config.dtype)}{why}")


def train(config, workdir) -> step.TrainState:
    """Train per the config in `workdir`: eval every eval_interval, log every log_interval,
    save after evals; returns the state.

    SIGTERM or Ctrl-C: the call in flight finishes, a checkpoint of that step is saved and
    preemption.Preempted is raised (train.py prints it and exits non-zero; the same command
    resumes). `workdir` is a directory or a URL (gs://...): every file goes through epath.
    With config.eval_only: one evaluation of the loaded model (train and val loss), printed and
    written to the metrics, and no checkpoint. One run per workdir: process 0 holds its lock
    (lock.py) from before the first write to the end. A failed write ends the run with one
    line (UserError) naming the newest good checkpoint.
    """
    config_lib.validate(config)  # before any file is touched or anything compiles
    profiling.check(config)
    metrics_lib.check_wandb(config)
    preemption.check_multiprocess()
    workdir = workdir_lib.prepare(workdir)
    compile_cache.enable(workdir)
    ckpt = None
    try:
        with contextlib.ExitStack() as stack:  # everything opened below, closed on every exit
            lock.hold(workdir, config.take_over_lock, stack)  # before anything is written
            config, s, state, resumed, ckpt = starting_point(config, workdir, stack)
            return _run(config, workdir, s, state, resumed, ckpt, stack)
    except OSError as e:  # metrics, events, run info (a checkpoint's is WriteFailed)
        if not _write_failed(e, workdir):
            raise
        good = ckpt.good_step if ckpt else checkpoint.latest_step(workdir)
        raise UserError(checkpoint.write_failure(f"writing {e.filename or workdir}", e,
                                                 workdir, good)) from None
    except jax.errors.JaxRuntimeError as e:  # at compile time (the first call) or later
        if "RESOURCE_EXHAUSTED" in str(e):
            raise UserError(out_of_memory(config)) from None
        raise


def out_of_memory(config) -> str:
    """What to change when the device runs out of memory, as one line."""
    b, a = config.batch_size, config.gradient_accumulation_steps
    fewer = (f"--config.batch_size={b // 2} --config.gradient_accumulation_steps={2 * a} (the "
             "same tokens per step)" if b % 2 == 0 else "a smaller batch_size with more "
             "gradient_accumulation_steps (the same product)")
    return (f"out of device memory (RESOURCE_EXHAUSTED) at batch_size={b}, "
            f"gradient_accumulation_steps={a}, remat={config.remat}, mesh.fsdp="
            f"{config.mesh.fsdp}: try {fewer}, or --config.remat=True, or shard the parameters "
            "with --config.mesh.fsdp=N; `python -m jaxgpt.aot --config CONFIG --topology TPU "
            "--fit` finds the largest batch that fits before you run")


def _write_failed(e: OSError, workdir) -> bool:
    """A full disk, a quota or a permission; on an object store, any error but a missing
    object (gcsfs raises plain OSErrors for quota and permission answers)."""
    if workdir_lib.is_remote(workdir):
        return not isinstance(e, FileNotFoundError)
    return e.errno in checkpoint.WRITE_ERRNOS


def _run(config, workdir, s: Setup, state, resumed, ckpt, stack: contextlib.ExitStack):
    """The loop of train(), its hooks and what they open (closed by `stack`)."""
    main = parallel.is_main_process()
    say = tqdm.write if main else (lambda *a, **k: None)
    _announce(config, s, state, resumed, workdir, say)
    writer = stack.enter_context(contextlib.closing(
        metrics_lib.Metrics(workdir, config, enabled=main)))
    bar = stack.enter_context(tqdm(total=config.max_iters, initial=int(state.step),
                                   disable=not main, dynamic_ncols=True))
    signals = stack.enter_context(preemption.Preemption())  # handlers while training
    progress_bar = hooks_lib.ProgressBar(bar)
    hooks = [hooks_lib.FiniteCheck(), hooks_lib.MetricsLog(writer, config, say), progress_bar,
             hooks_lib.CPUTimeWarning(config, say)]
    if not config.eval_only:
        hooks += [hooks_lib.Profile(profiling.Profiler(config, workdir, enabled=main, say=say)),
                  hooks_lib.Checkpoints(ckpt)]
    # a resumed step with a val loss was evaluated and saved already
    evaluated = resumed if ckpt and resumed in checkpoint.val_losses(ckpt.manager) else None
    loop = Loop(s, state, Schedule.from_config(config, evaluated), hooks,
                eval_key=jax.random.fold_in(jax.random.PRNGKey(config.seed), 1),
                mfu=progress.MFU(config, count_params(state.params, non_embedding=False),
                                 s.mesh.devices.size),
                signals=signals, progress_bar=progress_bar, ckpt=ckpt, say=say)
    if config.eval_only:  # nanoGPT's eval_only: the first eval, then exit
        if not loop.evaluate():
            loop.stop()
        return loop.state
    return loop.run()
