"""Training: a TrainState pytree, a pure jit-compiled train step, estimate_loss, the loop.

Randomness: the run's root key lives in the state; step s uses fold_in(root, s) for its batch
and its dropout, so the same seed gives the same run and a resumed run the same stream.
"""

import functools
import json
import math
import time
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

from jaxgpt import checkpoint
from jaxgpt import config as config_lib
from jaxgpt import data as data_lib
from jaxgpt import optim, parallel
from jaxgpt.errors import UserError
from jaxgpt.model import count_params, make_model


class TrainState(train_state.TrainState):
    """step, params, opt_state (+ apply_fn, tx as static fields) and the run's root key."""

    rng: jax.Array = flax.struct.field(default=None)


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy; logits (B, T, V) float32, targets (B, T) int."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


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
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=run_rng)

    abstract = jax.eval_shape(init, init_rng, run_rng)
    shardings = parallel.state_sharding(abstract, mesh)
    return jax.jit(init, out_shardings=shardings)(init_rng, run_rng)


def train_step(state: TrainState, batch, rng):
    """One optimizer step on batch = (x, y), each (A, B, T): A micro-batches accumulated.

    Gradients are averaged over the A micro-batches (nanoGPT's gradient_accumulation_steps: the
    effective batch is A*B), then clipped and applied by the optax chain.
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
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.apply_gradients(grads=grads), metrics


def train_steps(state: TrainState, data, *, num_steps, batch_size, block_size, accum, mesh):
    """`num_steps` optimizer steps in one compiled call, batches drawn on the device.

    Returns the new state and the per-step metrics stacked: (num_steps,) each.
    """
    def one_step(state, _):
        data_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        x, y = data_lib.get_batch(data, data_key, accum * batch_size, block_size)  # (A*B, T)
        x, y = (t.reshape(accum, batch_size, block_size) for t in (x, y))  # (A, B, T)
        sharding = parallel.batch_sharding(mesh, leading=1)
        x, y = (jax.lax.with_sharding_constraint(t, sharding) for t in (x, y))
        return train_step(state, (x, y), dropout_key)

    return jax.lax.scan(one_step, state, length=num_steps)


def train_steps_on_batches(state: TrainState, batches):
    """One optimizer step per leading entry of batches = (x, y), each (S, A, B, T): the variant
    for data sampled on the host (memmapped token files); same randomness as train_steps."""
    def one_step(state, batch):
        _, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        return train_step(state, batch, dropout_key)

    return jax.lax.scan(one_step, state, batches)


def eval_step(params, apply_fn, x, y):
    """The loss on one batch x, y (B, T), without dropout."""
    return cross_entropy(apply_fn({"params": params}, x, deterministic=True), y)


def eval_loss_on_batches(params, batches, *, apply_fn):
    """Mean loss over host-sampled batches = (x, y), each (eval_iters, B, T)."""
    def one_batch(_, batch):
        return None, eval_step(params, apply_fn, *batch)

    _, losses = jax.lax.scan(one_batch, None, batches)  # (eval_iters,)
    return losses.mean()


def eval_loss(params, data, key, *, apply_fn, eval_iters, batch_size, block_size, mesh):
    """Mean loss over `eval_iters` random batches of `data`, in one compiled call."""
    def one_batch(_, k):
        x, y = data_lib.get_batch(data, k, batch_size, block_size)  # (B, T)
        x, y = (jax.lax.with_sharding_constraint(t, parallel.batch_sharding(mesh)) for t in (x, y))
        return None, eval_step(params, apply_fn, x, y)

    _, losses = jax.lax.scan(one_batch, None, jax.random.split(key, eval_iters))  # (eval_iters,)
    return losses.mean()


def compile_fns(config, mesh, state):
    """jit the multi-step train call (state donated, shardings kept) and the eval call."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(
        functools.partial(train_steps, batch_size=config.batch_size,
                          block_size=config.block_size,
                          accum=config.gradient_accumulation_steps, mesh=mesh),
        static_argnames="num_steps", donate_argnums=0, out_shardings=(shardings, None))
    evaluate = jax.jit(
        functools.partial(eval_loss, apply_fn=state.apply_fn, eval_iters=config.eval_iters,
                          batch_size=config.batch_size, block_size=config.block_size, mesh=mesh))
    return step, evaluate


def host_data_fns(config, mesh, state, dataset):
    """(splits, step, evaluate) for memmapped data: batches sampled on the host, each process
    loading only its rows. step(state, first_step, n) and evaluate(params, split, key) mirror
    the on-device path."""
    sharding = parallel.batch_sharding(mesh, leading=2)  # (S, A, B, T): B over every device
    loader = data_lib.HostBatches(dataset.train, seed=(config.seed, 0),
                                  accum=config.gradient_accumulation_steps,
                                  batch_size=config.batch_size, block_size=config.block_size,
                                  sharding=sharding)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = jax.jit(train_steps_on_batches, donate_argnums=0, out_shardings=(shardings, None))
    eval_fn = jax.jit(functools.partial(eval_loss_on_batches, apply_fn=state.apply_fn))
    eval_sharding = parallel.batch_sharding(mesh, leading=1)  # (eval_iters, B, T)
    rows = parallel.local_rows(eval_sharding, (1, config.batch_size, 1), axis=1)
    shape = (config.eval_iters, config.batch_size)

    def step(state, first_step, n):
        return step_fn(state, loader.get(first_step, n))

    step.close = loader.close  # stop the prefetch thread when the loop ends

    def evaluate(params, split, key):
        seed = (config.seed, 1, *np.asarray(jax.random.key_data(key)).tolist())
        local = data_lib.local_batch(split, seed, 0, shape, config.block_size, rows)
        batches = tuple(parallel.put_process_local(t, eval_sharding, (*shape, config.block_size))
                        for t in local)
        return eval_fn(params, batches)

    return {"train": dataset.train, "val": dataset.val}, step, evaluate


def device_data_fns(config, mesh, state, dataset):
    """(splits, step, evaluate) for small datasets: replicated on every device, batches drawn
    inside the compiled step."""
    splits = {name: parallel.put_replicated(arr, mesh)
              for name, arr in (("train", dataset.train), ("val", dataset.val))}
    step_fn, evaluate = compile_fns(config, mesh, state)

    def step(state, first_step, n):
        return step_fn(state, splits["train"], num_steps=n)

    step.close = lambda: None

    return splits, step, evaluate


def estimate_loss(evaluate, state, splits: dict, key) -> dict:
    """{split: mean loss} over eval_iters batches each (the lecture's estimate_loss)."""
    return {name: float(evaluate(state.params, arr, jax.random.fold_in(key, i)))
            for i, (name, arr) in enumerate(splits.items())}


class MetricsWriter:
    """Appends one JSON object per event to WORKDIR/metrics.jsonl (process 0 only)."""

    def __init__(self, workdir: Path):
        self.path = workdir / "metrics.jsonl"
        self.enabled = parallel.is_main_process()

    def write(self, **event):
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(event) + "\n")


def _check_finite(loss: float, step: int):
    if not math.isfinite(loss):
        raise UserError(f"loss is {loss} at step {step}: training diverged; lower "
                        "--config.learning_rate, keep --config.grad_clip > 0, or use "
                        "--config.dtype=float32 (no checkpoint was written for this state)")


def train(config, workdir) -> TrainState:
    """The training loop: eval every eval_interval, log every log_interval, return the state."""
    config_lib.validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    main = parallel.is_main_process()
    say = tqdm.write if main else (lambda *a, **k: None)

    dataset = data_lib.load_dataset(config)
    model = make_model(config, dataset.tokenizer.vocab_size)
    mesh = parallel.make_mesh(config)
    parallel.check_batch(config, mesh)
    state = create_train_state(config, model, mesh)
    ckpt = checkpoint.RunCheckpoints(config, workdir)
    state, resumed = ckpt.start(state, dataset.tokenizer)  # resumed: the restored step or None
    if resumed is not None:
        say(f"resuming from the checkpoint of step {resumed} in {workdir}")
    say(f"number of parameters: {count_params(state.params) / 1e6:.2f}M "
        f"(devices: {mesh.devices.size} {jax.devices()[0].platform}, mesh {dict(mesh.shape)})")

    data_fns = host_data_fns if dataset.on_host else device_data_fns
    splits, step_fn, evaluate = data_fns(config, mesh, state, dataset)
    lr_at = optim.lr_schedule(config)
    eval_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    writer = MetricsWriter(workdir)
    tokens_per_step = config.batch_size * config.gradient_accumulation_steps * config.block_size

    def run_eval(step):
        losses = estimate_loss(evaluate, state, splits, jax.random.fold_in(eval_key, step))
        say(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        writer.write(event="eval", step=step, train_loss=losses["train"], val_loss=losses["val"],
                     lr=float(lr_at(step)))
        _check_finite(losses["val"], step)
        return losses

    def log(first_step, metrics, seconds):
        """Write the per-step metrics of one finished call (read one call late: no stall)."""
        n = len(metrics["loss"])
        step_ms = 1000 * seconds / n
        # the call's learning rates in one dispatch: a jnp call per step would steal the CPU
        lrs = np.broadcast_to(np.asarray(lr_at(np.arange(first_step, first_step + n))), (n,))
        for i in range(n):
            s = first_step + i
            _check_finite(float(metrics["loss"][i]), s)
            if s % config.log_interval == 0:
                writer.write(event="train", step=s, loss=float(metrics["loss"][i]),
                             grad_norm=float(metrics["grad_norm"][i]), lr=float(lrs[i]),
                             step_ms=step_ms, tokens_per_sec=tokens_per_step * 1000 / step_ms)
        bar.set_postfix(loss=f"{float(metrics['loss'][-1]):.4f}", ms=f"{step_ms:.1f}")

    step = int(state.step)
    bar = tqdm(total=config.max_iters, initial=step, disable=not main, dynamic_ncols=True)
    pending = None  # (first step, metrics on device) of the call in flight
    last = time.perf_counter()
    while True:
        at_eval = step % config.eval_interval == 0 or step == config.max_iters
        if at_eval and step != resumed:  # a resumed step was evaluated and saved already
            if pending is not None:  # drain before evaluating, so logs stay in step order
                log(pending[0], jax.device_get(pending[1]), time.perf_counter() - last)
                pending = None
            losses = run_eval(step)
            ckpt.after_eval(state, losses, final=step == config.max_iters)
            last = time.perf_counter()
        if step >= config.max_iters:
            break
        next_eval = (step // config.eval_interval + 1) * config.eval_interval
        n = min(config.steps_per_call, next_eval - step, config.max_iters - step)
        state, metrics = step_fn(state, step, n)
        if pending is not None:
            host = jax.device_get(pending[1])  # waits for the previous call only
            now = time.perf_counter()
            log(pending[0], host, now - last)
            last = now
        pending = (step, metrics)
        step += n
        bar.update(n)
    bar.close()
    step_fn.close()  # stop the host prefetch thread, if any
    ckpt.close()  # wait for the async checkpoint writes
    return state
