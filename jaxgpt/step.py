"""Everything under jit: the TrainState, the loss, the train step and the eval step.

The file a reader of the lecture's gpt.py looks for: its training loop body (`get_batch`,
`model(xb, yb)`, `loss.backward()`, `optimizer.step()`) is `train_step` here, a pure function
compiled once; `estimate_loss`'s inner loop is `eval_loss`.

Randomness: the run's root key lives in the state; step s uses fold_in(root, s) for its batch
and its dropout, so the same seed gives the same run and a resumed run the same stream.
"""

import functools
import os
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from jaxgpt import optim, parallel
from jaxgpt.dtype import resolve_dtype

# torch.cuda.amp.GradScaler's defaults: init_scale, growth_interval
INITIAL_LOSS_SCALE = 2.0**15
LOSS_SCALE_PERIOD = 2000


@flax.struct.dataclass
class LossScale:
    """float16's loss scale, torch.cuda.amp.GradScaler's rule: the loss is multiplied by `scale`
    before the backward pass so small gradients do not flush to zero in float16 (whose largest
    value is 65504, smallest normal 6e-5); a step whose gradients overflow is skipped and halves
    it, `period` finite steps in a row double it. `dynamic=False` keeps it fixed (no skip).

    (jmp's DynamicLossScale does the same, but validates its leaves when a pytree is rebuilt,
    which breaks jax.tree.map over the state, e.g. to its shardings.)
    """

    scale: jax.Array  # () float32
    good_steps: jax.Array  # () int32: finite steps since the scale last changed
    dynamic: bool = flax.struct.field(pytree_node=False, default=True)
    period: int = flax.struct.field(pytree_node=False, default=LOSS_SCALE_PERIOD)

    @classmethod
    def create(cls, scale: float = INITIAL_LOSS_SCALE, **kw) -> "LossScale":
        return cls(jnp.float32(scale), jnp.int32(0), **kw)

    def adjust(self, finite) -> "LossScale":
        if not self.dynamic:
            return self
        grow = finite & (self.good_steps + 1 >= self.period)
        scale = jnp.where(finite, jnp.where(grow, 2 * self.scale, self.scale),
                          jnp.maximum(self.scale / 2, 1.0))
        return self.replace(scale=scale, good_steps=jnp.where(finite & ~grow,
                                                              self.good_steps + 1, 0))


def make_loss_scale(config) -> LossScale | None:
    """Loss scaling for float16 compute; None (no scaling) for float32 and bfloat16."""
    return LossScale.create() if resolve_dtype(config.dtype) == "float16" else None


class TrainState(train_state.TrainState):
    """step, params, opt_state, the run's root key and, in float16, the loss scale (+ apply_fn,
    tx, lr_schedule: static)."""

    rng: jax.Array = flax.struct.field(default=None)
    loss_scale: LossScale | None = None
    lr_schedule: Callable = flax.struct.field(pytree_node=False, default=None)


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy over the targets that are not -1 (torch's ignore_index=-1:
    a task masks positions it does not score); logits (B, T, V) float32, targets (B, T) int."""
    keep = targets != -1  # (B, T)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, targets, 0))
    return jnp.sum(jnp.where(keep, losses, 0.0)) / jnp.maximum(keep.sum(), 1)


def loss_fn(params, apply_fn, x, y, dropout_rng, loss_scale=None):
    """(what is differentiated: the loss, times the loss scale in float16; the loss)."""
    logits = apply_fn({"params": params}, x, deterministic=False,
                      rngs={"dropout": dropout_rng})  # (B, T, V)
    loss = cross_entropy(logits, y)
    return (loss if loss_scale is None else loss * loss_scale.scale), loss


# ---------------------------------------------------------------------------------------------
# The state: created straight into its shardings, or only its shapes (a restore target)


def _init_fn(config, model):
    """(init, its two keys): the function that builds a fresh TrainState from the seed."""
    tx = optim.make_optimizer(config)
    schedule = optim.lr_schedule(config)  # one object: every state init builds holds this one
    init_rng, run_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    dummy = jnp.zeros((1, config.block_size), jnp.int32)

    def init(init_rng, run_rng):
        params = model.init(init_rng, dummy)["params"]
        state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=run_rng,
                                  loss_scale=make_loss_scale(config), lr_schedule=schedule)
        # create's step is a Python 0 (a weakly typed int32 here); a restored step is int32: a
        # fresh and a resumed run must compile, and cache, one training program, not two
        return state.replace(step=jnp.zeros((), jnp.int32))

    return init, (init_rng, run_rng)


def init_train_state(config, model, mesh) -> tuple[TrainState, Callable[[], TrainState]]:
    """(the state's ShapeDtypeStructs on the mesh, a function that computes the state): the
    shapes come at once (nothing compiles), so the training call can compile from them while
    the state's init compiles and runs; both describe one pytree (the same static fields)."""
    init, keys = _init_fn(config, model)
    shapes = jax.eval_shape(init, *keys)
    shardings = parallel.state_sharding(shapes, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            shapes, shardings)

    def create() -> TrainState:
        lowered = jax.jit(init, out_shardings=shardings).lower(*keys)
        return lowered.compile(init_compiler_options(mesh))(*keys)

    return abstract, create


def init_compiler_options(mesh) -> dict:
    """On a CPU, the init compiles at LLVM -O1: it runs once, for milliseconds, and its
    compile (a threefry draw and an erfinv per parameter) is most of its cost — 1.9 s instead
    of 2.9 s for the CPU recipes' model at the default -O2, with the same values (elementwise
    code: no vectorised reduction to reorder; tests/test_step.py checks it). Other platforms,
    or a level already set in XLA_FLAGS: the defaults."""
    cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    if not cpu or "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {"xla_backend_optimization_level": 1}


def abstract_train_state(config, model, mesh) -> TrainState:
    """The state's shapes, dtypes and shardings on the mesh (ShapeDtypeStructs): nothing is
    computed. What a checkpoint restores into, and what ahead-of-time compilation lowers."""
    return init_train_state(config, model, mesh)[0]


def create_train_state(config, model, mesh) -> TrainState:
    """Initialise params and optimizer state directly into their shardings on the mesh."""
    return init_train_state(config, model, mesh)[1]()


def with_params(state: TrainState, params) -> TrainState:
    """`state` (fresh: step 0, a fresh optimizer) holding `params` (numpy or jax arrays) in its
    own dtypes and shardings, as finetuning starts (nanoGPT's init_from='gpt2*')."""
    params = jax.tree.map(lambda p, x: jax.device_put(jnp.asarray(p, x.dtype), x.sharding),
                          params, state.params)
    return state.replace(params=params)


# ---------------------------------------------------------------------------------------------
# Training


def compute_copy(params, apply_fn):
    """The weights every layer casts to the compute dtype before its matmul (>= 2-D: kernels
    and embedding tables), cast once: with gradient accumulation each micro-batch would cast
    them again (0.75 GB of HBM traffic per micro-batch for GPT-2 124M in bfloat16). The same
    values and the same gradients (a layer's cast of a bfloat16 weight is the identity); the
    tied embedding (wte, used twice) keeps its float32 copy, so its two gradients are still
    summed in float32. Nothing is cast when the compute dtype is float32."""
    config = getattr(getattr(apply_fn, "__self__", None), "config", None)
    dtype = getattr(config, "compute_dtype", jnp.dtype(jnp.float32))
    if dtype == jnp.float32:
        return params
    tied = getattr(config, "tie_weights", False)

    def cast(path, x):
        names = [getattr(k, "key", "") for k in path]
        if x.ndim < 2 or x.dtype != jnp.float32 or (tied and "wte" in names):
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def train_step(state: TrainState, batch, rng):
    """One optimizer step on batch = (x, y), each (A, B, T): A micro-batches accumulated.

    Gradients are averaged over the A micro-batches (nanoGPT's gradient_accumulation_steps: the
    effective batch is A*B), then clipped and applied by the optax chain. Returns the new state
    and this step's {loss, grad_norm, lr} (+ loss_scale in float16).

    float16: the loss is scaled up before the backward pass and the gradients scaled back down;
    a step whose gradients overflowed (inf / NaN) changes no weight and halves the scale (as
    torch's GradScaler skips optimizer.step()); its step number still advances.
    """
    x, y = batch  # (A, B, T), (A, B, T)
    keys = jax.random.split(rng, x.shape[0])  # (A,) one dropout key per micro-batch
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    scale = state.loss_scale
    if x.shape[0] == 1:
        (_, loss), grads = grad_fn(state.params, state.apply_fn, x[0], y[0], keys[0], scale)
    else:
        params = compute_copy(state.params, state.apply_fn)  # once per step, not per micro-batch

        def micro_step(grad_sum, inputs):
            (_, loss), grads = grad_fn(params, state.apply_fn, *inputs, scale)
            return jax.tree.map(lambda s, g: s + g.astype(s.dtype), grad_sum, grads), loss

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grad_sum, losses = jax.lax.scan(micro_step, zeros, (x, y, keys))
        grads = jax.tree.map(lambda g: g / x.shape[0], grad_sum)
        loss = losses.mean()
    if scale is not None:
        grads = jax.tree.map(lambda g: g / scale.scale, grads)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": state.lr_schedule(state.step)}  # the rate this step's update uses
    new = state.apply_gradients(grads=grads)
    if scale is not None and scale.dynamic:
        finite = jnp.isfinite(metrics["grad_norm"])  # any inf / NaN makes the norm one
        skipped = state.replace(step=state.step + 1)  # the weights and AdamW state unchanged
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, skipped)
        new = new.replace(loss_scale=scale.adjust(finite))
    if scale is not None:
        metrics["loss_scale"] = scale.scale  # the scale this step used
    return new, metrics


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


def jit_train_steps(state_shardings, train_batch):
    """The compiled training call: (state, data, num_steps=n) -> (state, metrics), the state
    donated and kept in its shardings. train.py, the benchmark and every test build it here."""
    mesh = jax.tree.leaves(state_shardings)[0].mesh  # traced in it: the kernels see the mesh
    fn = parallel.traced_in(mesh, functools.partial(train_steps, train_batch=train_batch))
    return jax.jit(fn, static_argnames="num_steps", donate_argnums=0,
                   out_shardings=(state_shardings, None))


# ---------------------------------------------------------------------------------------------
# Evaluation


def eval_step(params, apply_fn, x, y):
    """The loss on one batch x, y (B, T), without dropout."""
    return cross_entropy(apply_fn({"params": params}, x, deterministic=True), y)


def eval_loss(params, data, keys, *, apply_fn, eval_batch):
    """Mean loss over one batch per key in one compiled call (batch i: eval_batch(data, i,
    keys[i])); the loop's estimate_loss makes several such calls per split."""
    def one_batch(_, inputs):
        return None, eval_step(params, apply_fn, *eval_batch(data, *inputs))

    _, losses = jax.lax.scan(one_batch, None, (jnp.arange(len(keys)), keys))  # (len(keys),)
    return losses.mean()


def jit_eval_loss(apply_fn, eval_batch, mesh=None):
    """The compiled eval call: (params, data, keys) -> mean loss, one batch per key; traced in
    `mesh` (the training mesh) if given, so the kernels see it."""
    fn = functools.partial(eval_loss, apply_fn=apply_fn, eval_batch=eval_batch)
    return jax.jit(fn if mesh is None else parallel.traced_in(mesh, fn))


@functools.lru_cache(maxsize=8)
def _eval_batch(model):
    return jax.jit(lambda params, x, y: eval_step(params, model.apply, x, y))


def heldout_loss(model, params, tokens, block_size: int, batch_size: int = 64) -> float:
    """Mean next-token loss over every non-overlapping block_size window of `tokens` (a whole
    split: for tiny Shakespeare's val split at block 64, 1742 windows, each token once), so two
    models compare without the sampling noise of estimate_loss's random batches."""
    tokens = np.asarray(tokens, np.int32)
    n = (len(tokens) - 1) // block_size  # windows of block_size inputs + their targets
    x = tokens[:n * block_size].reshape(n, block_size)  # (n, T)
    y = tokens[1:n * block_size + 1].reshape(n, block_size)  # (n, T)
    step = _eval_batch(model)
    total = 0.0
    for i in range(0, n, batch_size):  # the last, smaller batch compiles once more
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]  # (b, T)
        total += float(step(params, xb, yb)) * len(xb)  # each window weighs the same
    return total / n
