"""Training: a TrainState pytree, a pure jit-compiled train step, estimate_loss, the loop.

Randomness: the run's root key lives in the state; step s uses fold_in(root, s) for its batch
and its dropout, so the same seed gives the same run and a resumed run the same stream.
"""

import functools
import math
import time
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from tqdm import tqdm

from jaxgpt import checkpoint
from jaxgpt import config as config_lib
from jaxgpt import data as data_lib
from jaxgpt import metrics as metrics_lib
from jaxgpt import optim, parallel, preemption, pretrained, profiling, progress
from jaxgpt import workdir as workdir_lib
from jaxgpt.errors import UserError
from jaxgpt.model import count_params, make_model


class TrainState(train_state.TrainState):
    """step, params, opt_state and the run's root key (+ apply_fn, tx, lr_schedule: static)."""

    rng: jax.Array = flax.struct.field(default=None)
    lr_schedule: Callable = flax.struct.field(pytree_node=False, default=None)


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy over the targets that are not -1 (torch's ignore_index=-1:
    a task masks positions it does not score); logits (B, T, V) float32, targets (B, T) int."""
    keep = targets != -1  # (B, T)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, targets, 0))
    return jnp.sum(jnp.where(keep, losses, 0.0)) / jnp.maximum(keep.sum(), 1)


def loss_fn(params, apply_fn, x, y, dropout_rng):
    logits = apply_fn({"params": params}, x, deterministic=False,
                      rngs={"dropout": dropout_rng})  # (B, T, V)
    return cross_entropy(logits, y)


def create_train_state(config, model, mesh) -> TrainState:
    """Initialise params and optimizer state directly into their shardings on the mesh."""
    tx = optim.make_optimizer(config)
    init_rng, run_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    dummy = jnp.zeros((1, config.block_size), jnp.int32)

    def init(init_rng, run_rng):
        params = model.init(init_rng, dummy)["params"]
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=run_rng,
                                 lr_schedule=optim.lr_schedule(config))

    abstract = jax.eval_shape(init, init_rng, run_rng)
    shardings = parallel.state_sharding(abstract, mesh)
    return jax.jit(init, out_shardings=shardings)(init_rng, run_rng)


def train_step(state: TrainState, batch, rng):
    """One optimizer step on batch = (x, y), each (A, B, T): A micro-batches accumulated.

    Gradients are averaged over the A micro-batches (nanoGPT's gradient_accumulation_steps: the
    effective batch is A*B), then clipped and applied by the optax chain. Returns the new state
    and this step's {loss, grad_norm, lr}.
    """
    x, y = batch  # (A, B, T), (A, B, T)
    keys = jax.random.split(rng, x.shape[0])  # (A,) one dropout key per micro-batch
    grad_fn = jax.value_and_grad(loss_fn)
    if x.shape[0] == 1:
        loss, grads = grad_fn(state.params, state.apply_fn, x[0], y[0], keys[0])
    else:
        def micro_step(grad_sum, inputs):
            loss, grads = grad_fn(state.params, state.apply_fn, *inputs)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grad_sum, losses = jax.lax.scan(micro_step, zeros, (x, y, keys))
        grads = jax.tree.map(lambda g: g / x.shape[0], grad_sum)
        loss = losses.mean()
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": state.lr_schedule(state.step)}  # the rate this step's update uses
    return state.apply_gradients(grads=grads), metrics


def train_steps(state: TrainState, data, *, train_batch, num_steps: int):
    """`num_steps` optimizer steps in one compiled call (a lax.scan: no Python between steps).

    `data` is the batch source's `train_data` for these steps and `train_batch(data, i, key)`
    step i's (x, y): drawn on the device from the step's key, or read from batches the host
    loaded. Returns the new state and the per-step metrics stacked: (num_steps,) each.
    """
    def one_step(state, i):
        data_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        return train_step(state, train_batch(data, i, data_key), dropout_key)

    return jax.lax.scan(one_step, state, jnp.arange(num_steps))


def eval_step(params, apply_fn, x, y):
    """The loss on one batch x, y (B, T), without dropout."""
    return cross_entropy(apply_fn({"params": params}, x, deterministic=True), y)


def eval_loss(params, data, keys, *, apply_fn, eval_batch):
    """Mean loss over one batch per key in one compiled call (batch i: eval_batch(data, i,
    keys[i])); estimate_loss makes several such calls per split."""
    def one_batch(_, inputs):
        return None, eval_step(params, apply_fn, *eval_batch(data, *inputs))

    _, losses = jax.lax.scan(one_batch, None, (jnp.arange(len(keys)), keys))  # (len(keys),)
    return losses.mean()


class Setup(NamedTuple):
    """Everything the loop needs before its first step (bench.py times these same calls)."""

    dataset: data_lib.Dataset
    model: Any
    mesh: jax.sharding.Mesh
    state: TrainState
    batches: Any  # data.DeviceBatches | data.HostBatches
    train_call: Callable  # (state, data, num_steps=n) -> (state, metrics), state donated
    evaluate: Callable  # (params, data, keys) -> mean loss, one batch per key


def setup(config, *, dataset=None, mesh=None) -> Setup:
    """Validate the config, load the data, build the model, mesh, state and the compiled calls."""
    config_lib.validate(config)
    dataset = dataset or data_lib.load_dataset(config)
    model = make_model(config, dataset.tokenizer.vocab_size)
    mesh = mesh or parallel.make_mesh(config)
    parallel.check_batch(config, mesh)
    state = create_train_state(config, model, mesh)
    batches = data_lib.batches(dataset, config, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    train_call = jax.jit(functools.partial(train_steps, train_batch=batches.train_batch),
                         static_argnames="num_steps", donate_argnums=0,
                         out_shardings=(shardings, None))
    evaluate = jax.jit(functools.partial(eval_loss, apply_fn=state.apply_fn,
                                         eval_batch=batches.eval_batch))
    return Setup(dataset, model, mesh, state, batches, train_call, evaluate)


def estimate_loss(s: Setup, params, key, on_call=None) -> dict:
    """{split: mean loss over eval_iters batches} (the lecture's estimate_loss), in calls of
    eval_batches_per_call batches; `on_call(done, total, seconds)` after each call."""
    n = data_lib.eval_batches_per_call(s.batches.eval_iters)
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
            if on_call is not None:  # progress; the call's run time, without its compilation
                on_call(i * per_split + j + 1, 2 * per_split, time.perf_counter() - dispatched)
        losses[split] = total / per_split
    return losses


class _StopEval(Exception):
    """A stop was requested in the middle of an eval."""


def _check_finite(loss: float, step: int):
    if not math.isfinite(loss):
        raise UserError(f"loss is {loss} at step {step}: training diverged; lower "
                        "--config.learning_rate, keep --config.grad_clip > 0, or use "
                        "--config.dtype=float32 (no checkpoint was written for this state)")


def from_weights(s: Setup, weights) -> TrainState:
    """`s`'s fresh state holding the params of `weights` (a checkpoint.Run): step 0 and a fresh
    optimizer state, as finetuning starts (nanoGPT's init_from='gpt2*')."""
    params = jax.tree.map(lambda p, x: jax.device_put(jnp.asarray(p, x.dtype), x.sharding),
                          weights.params, s.state.params)
    return s.state.replace(params=params)


def starting_point(config, workdir):
    """(config, Setup, state, resumed step or None, checkpoints or None) of a run about to
    train or evaluate: its own checkpoint if it has one (init_from auto / resume), else the
    weights init_from names, else a fresh init. `config` has the model keys the weights fix.
    eval_only reads checkpoints but never writes one."""
    weights = None
    if pretrained.is_weights(config.init_from):
        weights = pretrained.load(config.init_from, config)
        config = weights.config  # the weights fix the model's shape
    tokenizer = weights.tokenizer if weights else None
    s = setup(config, dataset=data_lib.load_dataset(config, tokenizer) if weights else None)
    state = from_weights(s, weights) if weights else s.state
    if config.eval_only:
        has_checkpoint = (workdir / checkpoint.CHECKPOINT_DIR).is_dir()
        if config.init_from == "resume" or (config.init_from == "auto" and has_checkpoint):
            state, step = checkpoint.restore(workdir, checkpoint.abstract_like(state))
            return config, s, state, step, None
        return config, s, state, None, None
    ckpt = checkpoint.RunCheckpoints(config, workdir)
    state, resumed = ckpt.start(state, s.dataset.tokenizer)  # a finetune resumes its own run
    return config, s, state, resumed, ckpt


def train(config, workdir) -> TrainState:
    """The training loop: eval every eval_interval, log every log_interval, return the state.

    SIGTERM or Ctrl-C: the call in flight finishes, a checkpoint of that step is saved and
    preemption.Preempted is raised (train.py prints it and exits non-zero; the same command
    resumes). `workdir` is a directory or a URL (gs://...): every file goes through epath.
    With config.eval_only: one evaluation of the loaded model (train and val loss), printed and
    written to the metrics, and no checkpoint.
    """
    config_lib.validate(config)  # before any file is touched or anything compiles
    profiling.check(config)
    metrics_lib.check_wandb(config)
    workdir = workdir_lib.prepare(workdir)
    config, s, state, resumed, ckpt = starting_point(config, workdir)
    main = parallel.is_main_process()
    say = tqdm.write if main else (lambda *a, **k: None)

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

    eval_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    writer = metrics_lib.Metrics(workdir, config, enabled=main)
    profiler = profiling.Profiler(config, workdir, enabled=main, say=say)
    mfu = progress.MFU(config, count_params(state.params, non_embedding=False),
                       s.mesh.devices.size)
    estimate = progress.CPUEstimate(config)
    signals = preemption.Preemption()  # its handlers are installed around the training loop
    tokens_per_step = config.batch_size * config.gradient_accumulation_steps * config.block_size

    def run_eval(step):
        def on_call(done, total, seconds):
            bar.set_postfix_str(f"evaluating {done}/{total}")
            if done == 1:
                warn(estimate.after_eval_batches(seconds * total / (2 * config.eval_iters), step))
            if signals.requested():  # stop without finishing the eval
                raise _StopEval

        losses = estimate_loss(s, state.params, jax.random.fold_in(eval_key, step), on_call)
        # a task's own measure (addition: exact-match accuracy on held-out problems)
        extra = s.dataset.evaluate(s.model, state.params) if s.dataset.evaluate else {}
        say(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            + "".join(f", {k} {v:.4f}" for k, v in extra.items()))
        writer.write("eval", step, train_loss=losses["train"], val_loss=losses["val"],
                     lr=float(state.lr_schedule(step)), **extra)
        writer.flush()
        _check_finite(losses["val"], step)
        return losses

    def warn(line):
        if line:
            say(line)

    def log(first_step, metrics, seconds):
        """Write the per-step metrics of one finished call (read one call late: no stall)."""
        n = len(metrics["loss"])
        step_ms = 1000 * seconds / n
        util = mfu(seconds / n)
        extra = {} if util is None else {"mfu": util}
        for i in range(n):
            step = first_step + i
            _check_finite(float(metrics["loss"][i]), step)
            if step % config.log_interval == 0:
                writer.write("train", step, loss=float(metrics["loss"][i]),
                             grad_norm=float(metrics["grad_norm"][i]),
                             lr=float(metrics["lr"][i]), step_ms=step_ms,
                             tokens_per_sec=tokens_per_step * 1000 / step_ms, **extra)
        shown = {"loss": f"{float(metrics['loss'][-1]):.4f}", "ms": f"{step_ms:.1f}"}
        if util is not None:
            shown["mfu"] = f"{100 * util:.1f}%"
        bar.set_postfix(shown)

    def stop(step):
        """Preempted: log the call in flight, save this step, wait for the write, raise."""
        drain()
        bar.set_postfix_str("saving a checkpoint")
        raise preemption.Preempted(step, signals.signum, ckpt.save_now(state))

    # nanoGPT evaluates after the last step (at max_iters); the lecture's loop at iter
    # max_iters - 1, before its step, and not after it
    last_eval = config.max_iters - 1 if config.eval_before_last_step else config.max_iters
    step = int(state.step)
    bar = tqdm(total=config.max_iters, initial=step, disable=not main, dynamic_ncols=True)
    if config.eval_only:  # nanoGPT's eval_only: the first eval, then exit
        try:
            run_eval(step)
        finally:
            bar.close()
            s.batches.close()
            writer.close()
        return state
    pending = None  # (first step, metrics on device) of the call in flight
    calls = 0  # compiled train calls so far
    last = time.perf_counter()

    def drain():
        nonlocal pending
        if pending is not None:
            log(pending[0], jax.device_get(pending[1]), time.perf_counter() - last)
            pending = None

    # a resumed step with a val loss was evaluated and saved already; one saved on preemption
    # in the middle of its eval was not
    evaluated = resumed if resumed in checkpoint.val_losses(ckpt.manager) else None
    try:
        with signals:
            while True:
                at_eval = ((step % config.eval_interval == 0 and step < last_eval)
                           or step == last_eval)
                if at_eval and step != evaluated:
                    drain()  # before evaluating, so logs stay in step order
                    try:
                        losses = run_eval(step)
                    except _StopEval:
                        stop(step)
                    ckpt.after_eval(state, losses, final=step == last_eval)
                    last = time.perf_counter()
                if step >= config.max_iters:
                    if last_eval < step:  # the lecture's loop: a last step after the last eval
                        drain()
                        ckpt.save_now(state)  # no val loss: the latest, never the "best"
                    break
                if signals.requested():  # all processes agree on this step
                    stop(step)
                profiler.before_call(step, calls, state)
                next_eval = (step // config.eval_interval + 1) * config.eval_interval
                if step < last_eval:
                    next_eval = min(next_eval, last_eval)
                n = min(config.steps_per_call, next_eval - step, config.max_iters - step)
                if calls == 0:
                    bar.set_postfix_str("compiling the training step")
                    start = time.perf_counter()
                state, metrics = s.train_call(state, s.batches.train_data(step, n), num_steps=n)
                if calls == 0:  # jit compiled it before dispatching: time the runs without it
                    say(f"compiled the training step in {time.perf_counter() - start:.1f} s")
                    last = time.perf_counter()
                if pending is not None:
                    host = jax.device_get(pending[1])  # waits for the previous call only
                    now = time.perf_counter()
                    log(pending[0], host, now - last)
                    if calls == 1:
                        warn(estimate.after_train_call((now - last) / len(host["loss"]), step))
                    last = now
                pending = (step, metrics)
                step += n
                calls += 1
                bar.update(n)
        profiler.close(state, step)  # a run shorter than profile_steps: what it has
    finally:
        bar.close()
        s.batches.close()  # stop the host prefetch thread, if any
        ckpt.close()  # wait for the async checkpoint writes
        writer.close()
    return state
