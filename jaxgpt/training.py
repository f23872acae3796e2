"""The training loop: start a run, then step, evaluate, save and stop on a schedule.

    train(config, workdir)  # what train.py calls: the start-up, read top to bottom
    setup(config)           # data, model, mesh, state, the compiled calls (bench.py, tests)

`Loop.run` is one iteration at a time, as nanoGPT's loop: evaluate when due, dispatch the next
compiled call and read back the one before it (so the host never waits for the device), stop on
a signal. `Schedule` says when to evaluate (arithmetic on step numbers); the hooks (hooks.py:
metrics, progress bar, checkpoints, ...) do the per-call work; the compiled side is step.py.
"""

import contextlib
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
from tqdm import tqdm

from jaxgpt import (
    addition,
    ahead,
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
    splash,
    step,
)
from jaxgpt import batches as batches_lib
from jaxgpt import config as config_lib
from jaxgpt import data as data_lib
from jaxgpt import hooks as hooks_lib
from jaxgpt import metrics as metrics_lib
from jaxgpt import workdir as workdir_lib
from jaxgpt.dtype import auto_dtype, resolve_dtype
from jaxgpt.errors import UserError
from jaxgpt.model import count_params, make_model

# ---------------------------------------------------------------------------------------------
# Setup: everything the loop needs before its first step


class Setup(NamedTuple):
    """Everything the loop needs before its first step (bench.py times these same calls)."""

    dataset: data_lib.Dataset
    model: Any
    mesh: jax.sharding.Mesh
    state: step.TrainState
    batches: batches_lib.BatchSource
    train_call: ahead.Ahead  # (state, data, num_steps=n) -> (state, metrics), state donated
    evaluate: ahead.Ahead  # (params, data, keys) -> mean loss, one batch per key


def setup(config, *, dataset=None, mesh=None, first_call: int | None = None) -> Setup:
    """Load the data, build the model, mesh, state and the compiled calls, for a config that
    config.validate accepted. `first_call=n`: the n-step training call's program compiles on a
    thread while the state's init compiles and runs (train.py's first call), then the eval
    call's on the same thread, while the first steps run."""
    dataset = dataset or datasets.load(config)
    model = make_model(config, dataset.tokenizer.vocab_size)
    mesh = mesh or parallel.make_mesh(config)
    parallel.check_batch(config, mesh)
    source = batches_lib.make(dataset, config, mesh)
    abstract, create_state = step.init_train_state(config, model, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    train_call = ahead.Ahead(step.jit_train_steps(shardings, source.train_batch))
    evaluate = ahead.Ahead(step.jit_eval_loss(abstract.apply_fn, source.eval_batch, mesh))
    if first_call:  # on one thread: the first training call's program, then the eval's
        pool = ThreadPoolExecutor(1, thread_name_prefix="compile-ahead")
        train_call.compile(abstract, source.train_spec(first_call), num_steps=first_call,
                           pool=pool)
        evaluate.compile(abstract.params, source.eval_spec(),
                         batches_lib.eval_keys_spec(config.eval_iters, mesh), pool=pool)
        pool.submit(source.prepare_eval)  # a DeviceBatches' draws of eval batches
        pool.shutdown(wait=False)  # its thread ends after the last compile
    state = create_state()
    return Setup(dataset, model, mesh, state, source, train_call, evaluate)


def eval_measures(config, s: Setup) -> list[Callable]:
    """A task's own measures, scored after the losses at every eval: (params) -> {name: value}.
    Built (files read, examples rendered) once per run, before the first step."""
    measures = []
    if config.dataset == "addition":  # exact-match accuracy on the held-out problems
        measures.append(addition.Accuracy(s.model, s.dataset.val, config.addition))
    if config.hellaswag_path:  # HellaSwag's acc and acc_norm
        measures.append(hellaswag.during_training(config, s.model, s.dataset.tokenizer, s.mesh))
    return measures


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


class Evaluate(NamedTuple):
    """Evaluate the state at `step` (before any later step runs)."""

    step: int


class Steps(NamedTuple):
    """Run steps `step` .. `step + n - 1` in one compiled call."""

    step: int
    n: int


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When the loop evaluates and how many steps each compiled call may run.

    nanoGPT evaluates every eval_interval steps and after the last step (at max_iters); the
    lecture's loop (`eval_before_last_step`) at iter max_iters - 1 instead, before that iter's
    step, and not after it. A call never runs past the next eval or max_iters. `evaluated`: a
    resumed step whose eval was done and saved already (a step saved on preemption in the
    middle of its eval has no val loss, and is evaluated again). `eval_at_start=False`: none at
    step 0 (the others stay where they were).
    """

    max_iters: int
    eval_interval: int
    steps_per_call: int = 1
    eval_before_last_step: bool = False
    evaluated: int | None = None
    eval_at_start: bool = True

    @classmethod
    def from_config(cls, config, evaluated: int | None = None) -> "Schedule":
        return cls(config.max_iters, config.eval_interval, config.steps_per_call,
                   config.eval_before_last_step, evaluated, config.eval_at_start)

    @property
    def last_eval(self) -> int:
        return self.max_iters - 1 if self.eval_before_last_step else self.max_iters

    def eval_due(self, step: int) -> bool:
        regular = (step % self.eval_interval == 0 and step < self.last_eval
                   and (step > 0 or self.eval_at_start))
        return (regular or step == self.last_eval) and step != self.evaluated

    def call_steps(self, step: int) -> int:
        """How many steps the call starting at `step` runs: up to the next eval or the end."""
        next_eval = (step // self.eval_interval + 1) * self.eval_interval
        if step < self.last_eval:
            next_eval = min(next_eval, self.last_eval)
        return min(self.steps_per_call, next_eval - step, self.max_iters - step)

    def events(self, step: int):
        """From `step` on: Evaluate and Steps events, in the order the loop runs them."""
        while True:
            if self.eval_due(step):
                yield Evaluate(step)
            if step >= self.max_iters:
                return
            n = self.call_steps(step)
            yield Steps(step, n)
            step += n

    def saves_last_step(self, step: int) -> bool:
        """The lecture's loop ends with a step after its last eval: saved without a val loss."""
        return step >= self.max_iters and self.last_eval < step


# ---------------------------------------------------------------------------------------------
# The loop


class InFlight(NamedTuple):
    """A dispatched call whose metrics are still on the device."""

    index: int  # 0: the run's first call (the one that compiled)
    step: int  # its first step
    metrics: dict  # {"loss", "grad_norm", "lr"}: (n,) device arrays
    dispatched: float  # perf_counter when the host had dispatched it


class Loop:
    """One run's loop over the schedule's events; what it reports goes to the hooks."""

    def __init__(self, s: Setup, schedule: Schedule, hooks: list[hooks_lib.Hook], *,
                 eval_key, measures: list[Callable], mfu: progress.MFU,
                 signals: preemption.Preemption, say):
        self.s, self.schedule, self.hooks, self.eval_key = s, schedule, hooks, eval_key
        self.measures, self.mfu, self.signals, self.say = measures, mfu, signals, say
        self.calls = 0  # compiled train calls dispatched
        self.last_read = 0.0  # perf_counter when the previous call's metrics reached the host

    def run(self, state: step.TrainState) -> step.TrainState:
        """Train from state.step to the schedule's end; returns the state. On SIGTERM or Ctrl-C:
        saves this step and raises preemption.Preempted."""
        in_flight = None
        for event in self.schedule.events(int(state.step)):
            match event:
                case Evaluate(step):
                    # evaluate (the call in flight is read back first: logs stay in step order)
                    self.read_back(in_flight)
                    in_flight = None
                    if self.evaluate(step, state) is None:  # a stop came mid-eval
                        self.stop(step, state)
                case Steps(step, n):
                    # termination: every process agrees on this step (preemption.Preemption)
                    if self.signals.requested():
                        self.read_back(in_flight)
                        self.stop(step, state)
                    # forward, backward, update: n steps in one compiled call, dispatched...
                    self.each("before_call", self.calls, step, state)
                    state, metrics = self.train_call(state, step, n)
                    dispatched = time.perf_counter()
                    # ...then the previous call read back, while this one runs
                    self.read_back(in_flight)
                    in_flight = InFlight(self.calls, step, metrics, dispatched)
                    self.calls += 1
        self.read_back(in_flight)
        self.each("at_end", int(state.step), state)
        return state

    def each(self, moment: str, *args):
        """Every hook's `moment`, in list order; their results."""
        return [getattr(hook, moment)(*args) for hook in self.hooks]

    def train_call(self, state, step: int, n: int):
        """Dispatch steps step..step+n-1; the first call compiles first (or loads the cache)."""
        start = time.perf_counter()
        data = self.s.batches.train_data(step, n)
        with compile_cache.hits() as hits:
            out = self.s.train_call(state, data, num_steps=n)
        if self.calls == 0:
            seconds, from_cache = time.perf_counter() - start, hits() > 0
            train_call = self.s.train_call
            if isinstance(train_call, ahead.Ahead) and (compiled := train_call.compiled(
                    state, data, num_steps=n)):  # compiled ahead, beside the init: its own time
                seconds, from_cache = compiled.seconds, compiled.from_cache
            self.say(f"loaded the compiled training step from the compilation cache in "
                     f"{seconds:.1f} s" if from_cache else
                     f"compiled the training step in {seconds:.1f} s")
        return out

    def read_back(self, call: InFlight | None) -> None:
        """A call's metrics to the host (waiting for it), handed to the hooks."""
        if call is None:
            return
        host = jax.device_get(call.metrics)  # waits for that call
        done = time.perf_counter()
        # its run time: from when the device could start it (dispatched, and the call before
        # it done) to now; so neither compilation nor an eval counts
        seconds = done - max(call.dispatched, self.last_read)
        self.last_read = done
        self.each("after_call", hooks_lib.Call(call.index, call.step, host, seconds,
                                               self.mfu(seconds / len(host["loss"]))))

    def evaluate(self, step: int, state) -> dict | None:
        """The losses at this step (hooks log and save them), or None if a stop came first."""
        def on_call(done, total, seconds):
            self.each("eval_progress", step, done, total, seconds)
            return self.signals.requested()  # stop without finishing the eval

        key = jax.random.fold_in(self.eval_key, step)
        losses = estimate_loss(self.s, state.params, key, on_call)
        if losses is None:
            return None
        measures = {}
        for measure in self.measures:
            measures |= measure(state.params)
        self.each("after_eval", step, state, losses, measures)
        return losses

    def stop(self, step: int, state):
        """Preempted: the hooks save this step (and wait for the write), then raise."""
        saved = any(self.each("on_stop", step, state))
        raise preemption.Preempted(step, self.signals.signum, saved)


# ---------------------------------------------------------------------------------------------
# train(): the start-up, one step after the other


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
    # checks: before any file is touched or anything compiles
    config_lib.validate(config)
    profiling.check(config)
    metrics_lib.check_wandb(config)
    preemption.check_multiprocess()
    workdir = workdir_lib.prepare(workdir)
    compile_cache.enable(workdir)
    ckpt = None
    try:
        with contextlib.ExitStack() as stack:  # everything opened below, closed on every exit
            lock.hold(workdir, config.take_over_lock, stack)  # before anything is written
            # the weights to start from (init_from=gpt2, a path) fix the model and vocabulary
            weights = None
            if pretrained.is_weights(config.init_from):
                weights = pretrained.load(config.init_from, config)
                config = weights.config
            # data, model, mesh, a fresh state, the compiled calls (the first training call's
            # program compiling while the state initialises)
            first_call = (Schedule.from_config(config).call_steps(0)
                          if ahead.enabled() and not config.eval_only else None)
            s = setup(config, dataset=datasets.load(config, weights.tokenizer) if weights
                      else None, first_call=first_call)
            stack.callback(s.batches.close)  # the host prefetch thread, if any
            measures = eval_measures(config, s)  # a bad HellaSwag file fails here, not later
            state = step.with_params(s.state, weights.params) if weights else s.state
            # this workdir's checkpoint: resume from it (eval_only reads it, writes none)
            if config.eval_only:
                state, resumed = checkpoint.restore_for_eval(config, workdir, state)
            else:
                ckpt = checkpoint.RunCheckpoints(config, workdir)
                stack.callback(ckpt.close)  # waits for the async checkpoint writes
                state, resumed = ckpt.start(state, s.dataset.tokenizer)
            # where the run reports: the terminal, metrics files, the progress bar
            main = parallel.is_main_process()
            say = tqdm.write if main else (lambda *a, **k: None)
            announce(config, s, state, resumed, workdir, say)
            writer = stack.enter_context(contextlib.closing(
                metrics_lib.Metrics(workdir, config, enabled=main)))
            bar = stack.enter_context(tqdm(total=config.max_iters, initial=int(state.step),
                                           disable=not main, dynamic_ncols=True))
            signals = stack.enter_context(preemption.Preemption())  # handlers while training
            # the loop; eval_only: one eval at the loaded step (nanoGPT's), then exit
            schedule = (Schedule(int(state.step), config.eval_interval) if config.eval_only
                        else Schedule.from_config(config, ckpt.evaluated))
            hooks = hooks_lib.make(config, workdir, writer, bar, ckpt, schedule, say,
                                   enabled=main)
            loop = Loop(s, schedule, hooks,
                        eval_key=jax.random.fold_in(jax.random.PRNGKey(config.seed), 1),
                        measures=measures,
                        mfu=progress.MFU(config, count_params(state.params, non_embedding=False),
                                         s.mesh.devices.size),
                        signals=signals, say=say)
            return loop.run(state)
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


def announce(config, s: Setup, state, resumed, workdir, say) -> None:
    """Where the run starts, its size, devices and compute dtype."""
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
    line = f"compute dtype: {resolve_dtype(config.dtype)}{why}"
    if config.model == "gpt" and config.attention == "fused":  # the lecture's heads: softmax
        impl, why = splash.resolve_impl(config, jax.default_backend())
        line += f"; attention: {impl}" + (f" ({why})" if config.attention_impl == "auto" else "")
    say(line)


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
