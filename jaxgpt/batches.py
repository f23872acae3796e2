"""Batch sources: what feeds the compiled train and eval calls, behind one protocol.

The lecture's `get_batch` draws B random windows of T+1 tokens. Here it runs inside the compiled
call (`DeviceBatches`: the splits live on the device, each step's batch is drawn from its key),
or on the host for token files too large for the device (`HostBatches`: np.memmap, a prefetch
thread). Both give step i's (x, y) through the same two calls, so step.train_steps never knows
where its batch came from.
"""

import threading
from queue import Full, Queue
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import bins, parallel
from jaxgpt.data import Dataset
from jaxgpt.errors import UserError


class BatchSource(Protocol):
    """What the training loop and the compiled calls ask of a batch source.

    `train_data(step, n)` is the argument of the call that runs steps step..step+n-1 and
    `train_batch(data, i, key)` (traced inside it) step i's (x, y), each (A, B, T): gradient
    accumulation, batch, block. `eval_data(split, keys)` is one eval call's len(keys) batches,
    (x, y) each (E, B, T) whichever the split (so one eval program serves both), and
    `eval_batch(data, i, key)` batch i of them (B, T). `train_spec(n)` / `eval_spec()`: what
    train_data (for n steps) / eval_data return, without reading any (arrays or
    ShapeDtypeStructs: to compile from). `prepare_eval()` compiles what eval_data runs, if
    anything, so that a thread can do it ahead of the first eval.
    """

    eval_iters: int

    def train_data(self, step: int, n: int) -> Any: ...
    def train_spec(self, n: int) -> Any: ...
    def train_batch(self, data, i, key) -> tuple[jax.Array, jax.Array]: ...
    def eval_data(self, split: str, keys) -> Any: ...
    def eval_spec(self) -> Any: ...
    def prepare_eval(self) -> None: ...
    def eval_batch(self, data, i, key) -> tuple[jax.Array, jax.Array]: ...
    def close(self) -> None: ...


def get_batch(data: jax.Array, key: jax.Array, batch_size: int, block_size: int):
    """B random windows of T+1 tokens: x = w[:, :-1], y = w[:, 1:] (the lecture's get_batch).

    Pure and jittable, so the batch can be drawn inside the compiled train step.
    """
    ix = jax.random.randint(key, (batch_size,), 0, data.shape[0] - block_size)  # (B,)
    window = jax.vmap(lambda i: jax.lax.dynamic_slice(data, (i,), (block_size + 1,)))(ix)
    window = window.astype(jnp.int32)  # (B, T+1)
    return window[:, :-1], window[:, 1:]  # (B, T), (B, T)


def eval_batches_per_call(eval_iters: int) -> int:
    """An eval runs as several compiled calls of this many batches (the largest divisor of
    eval_iters up to 10), so the loop can show its progress and time it early."""
    return max(d for d in range(1, min(eval_iters, 10) + 1) if eval_iters % d == 0)


def eval_keys_spec(eval_iters: int, mesh):
    """One eval call's PRNGKeys, (E, 2) uint32, as a ShapeDtypeStruct: to compile from."""
    return jax.ShapeDtypeStruct((eval_batches_per_call(eval_iters), 2), jnp.uint32,
                                sharding=parallel.replicated(mesh))


class DeviceBatches:
    """Small datasets (a character-level text, a task's examples): both splits replicated on
    every device, each training batch drawn inside the compiled call from the step's key, with
    no host work between steps (an eval call's batches: by a small program before it).
    `dataset.draw(data, key, n)` draws n examples (a task's own); by default the lecture's text
    windows of block_size."""

    def __init__(self, dataset: Dataset, config, mesh, put=parallel.put_replicated):
        # put(split, mesh): the split on the mesh (aot.py's only describes it, for compiling)
        self.splits = {"train": put(dataset.train, mesh), "val": put(dataset.val, mesh)}
        self.accum, self.batch_size = config.gradient_accumulation_steps, config.batch_size
        self.mesh, self.eval_iters = mesh, config.eval_iters
        block_size = config.block_size
        self.draw = dataset.draw or (lambda data, key, n: get_batch(data, key, n, block_size))
        self.eval_shape = (eval_batches_per_call(config.eval_iters), config.batch_size)
        self.eval_sharding = parallel.batch_sharding(mesh, leading=1)  # (E, B, T)
        self._eval_draw = jax.jit(self._draw_eval_batches)

    def train_data(self, step: int, n: int):
        return self.splits["train"]

    def train_spec(self, n: int):
        return self.splits["train"]

    def eval_data(self, split: str, keys):
        """(x, y), each (E, B, T): batch i drawn from keys[i] (a small program per split), so
        the eval program sees the same shapes for both splits and compiles once."""
        return self._eval_draw(self.splits[split], keys)

    def prepare_eval(self):
        keys = np.zeros((self.eval_shape[0], 2), np.uint32)
        for split in self.splits:  # the jit keeps each split's draw program
            self._eval_draw(self.splits[split], keys)

    def _draw_eval_batches(self, data, keys):
        x, y = jax.vmap(lambda key: self.draw(data, key, self.batch_size))(keys)  # (E, B, T)
        return tuple(jax.lax.with_sharding_constraint(t, self.eval_sharding) for t in (x, y))

    def eval_spec(self):
        keys = eval_keys_spec(self.eval_iters, self.mesh)
        # (E, B, T) each, T the split's windows or a task's own example length
        return tuple(jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=self.eval_sharding)
                     for t in jax.eval_shape(self._draw_eval_batches, self.splits["val"], keys))

    def _draw(self, data, key, shape):
        x, y = self.draw(data, key, int(np.prod(shape)))  # (A*B, T) each
        sharding = parallel.batch_sharding(self.mesh, leading=len(shape) - 1)
        return tuple(jax.lax.with_sharding_constraint(t.reshape(*shape, t.shape[-1]), sharding)
                     for t in (x, y))

    def train_batch(self, data, i, key):
        return self._draw(data, key, (self.accum, self.batch_size))  # (A, B, T) each

    @staticmethod
    def eval_batch(data, i, key):
        return data[0][i], data[1][i]  # (B, T) each

    def close(self):
        pass


def fixed_windows(data, first: int, shape, block_size: int, rows: np.ndarray):
    """Rows `rows` of the batch of consecutive windows first, first+1, ... (window w: the
    T+1 tokens from w*T, as step.heldout_loss scores a split): x, y (..., r, T). A function of
    the window numbers alone: the same on any slice, any number of processes, any resume."""
    count = int(np.prod(shape))
    starts = (first + np.arange(count)).reshape(shape)[..., rows] * block_size  # (..., r)
    window = data.windows(starts, block_size) if isinstance(data, bins.Shards) else \
        data[starts[..., None] + np.arange(block_size + 1)]
    window = window.astype(np.int32)  # (..., r, T+1)
    return window[..., :-1], window[..., 1:]  # (..., r, T), (..., r, T)


def check_fixed_val(data, config) -> None:
    """A fixed val set needs eval_iters * batch_size windows of block_size in the val split."""
    T = config.block_size
    need = config.eval_iters * config.batch_size * T + 1
    starts = data.num_starts(T) if isinstance(data, bins.Shards) else len(data) - T
    if (need - 1 - T) >= starts:  # the last window's start must be a valid start
        have = len(data)
        raise UserError(f"config.fixed_val: the val split has {have} tokens, fewer than "
                        f"eval_iters x batch_size x block_size + 1 = {need}: lower eval_iters")


def local_batch(data, seed, step: int, shape, block_size: int, rows: np.ndarray):
    """Rows `rows` (of the last axis of `shape`) of the global batch of `step`: x, y (..., r, T).

    The window offsets of the whole global batch come from (seed, step) alone, so every process
    agrees on them and a run with any number of processes sees the same batches. `data`: one
    token array (N,), or bins.Shards, whose window starts are numbered through its shards (one
    shard draws exactly what the same tokens in one array do).
    """
    rng = np.random.default_rng([*np.atleast_1d(seed), step])
    shards = isinstance(data, bins.Shards)
    starts = data.num_starts(block_size) if shards else len(data) - block_size
    offsets = rng.integers(0, starts, size=tuple(shape))[..., rows]  # (..., r)
    window = data.windows(offsets, block_size) if shards else \
        data[offsets[..., None] + np.arange(block_size + 1)]
    window = window.astype(np.int32)  # (..., r, T+1)
    return window[..., :-1], window[..., 1:]  # (..., r, T), (..., r, T)


class HostBatches:
    """Token files (np.memmap) too large for the device: batches sampled on the host, a thread
    `prefetch` steps ahead of the device; each process reads only its rows of the global batch
    and `make_array_from_process_local_data` assembles it."""

    def __init__(self, dataset: Dataset, config, mesh, prefetch: int = 4):
        self.splits = {"train": dataset.train, "val": dataset.val}
        self.seed, self.block_size = config.seed, config.block_size
        self.shape = (config.gradient_accumulation_steps, config.batch_size)  # (A, B)
        self.eval_iters = config.eval_iters
        self.eval_shape = (eval_batches_per_call(config.eval_iters), config.batch_size)
        self.sharding = parallel.batch_sharding(mesh, leading=2)  # (n, A, B, T): B split
        self.rows = parallel.local_rows(self.sharding, (1, *self.shape, 1), axis=2)
        self.eval_sharding = parallel.batch_sharding(mesh, leading=1)  # (E, B, T)
        self.eval_rows = parallel.local_rows(self.eval_sharding, (*self.eval_shape, 1), axis=1)
        self.prefetch = prefetch
        self.thread, self.next_step = None, None
        # fixed_val: the val eval scores windows 0 .. eval_iters * batch_size - 1, each once,
        # in order; an eval's val calls come one after the other, after its train calls
        self.fixed_val, self.val_call = bool(config.get("fixed_val", False)), 0
        if self.fixed_val:
            check_fixed_val(dataset.val, config)

    def _produce(self, step, queue, stop):
        while not stop.is_set():
            try:
                item = local_batch(self.splits["train"], (self.seed, 0), step, self.shape,
                                   self.block_size, self.rows)
            except Exception as e:  # noqa: BLE001  surfaces in train_data(), in the loop's thread
                item = e
            while not stop.is_set():
                try:
                    queue.put(item, timeout=0.1)
                    break
                except Full:
                    pass
            step += 1

    def _restart(self, step):
        self.close()
        self.queue, self.stop = Queue(maxsize=self.prefetch), threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(step, self.queue, self.stop),
                                       daemon=True)
        self.thread.start()
        self.next_step = step

    def train_data(self, step: int, n: int):
        """(x, y) for steps step..step+n-1, each a global (n, A, B, T) int32 array."""
        if self.thread is None or step != self.next_step:  # first call, or a resumed run
            self._restart(step)
        items = [self.queue.get() for _ in range(n)]
        for item in items:
            if isinstance(item, Exception):
                raise item
        self.next_step = step + n
        shape = (n, *self.shape, self.block_size)
        return tuple(parallel.put_process_local(np.stack(t), self.sharding, shape)
                     for t in zip(*items))  # (n, A, r, T) local -> (n, A, B, T) global

    def train_spec(self, n: int):
        spec = jax.ShapeDtypeStruct((n, *self.shape, self.block_size), jnp.int32,
                                    sharding=self.sharding)
        return spec, spec  # (x, y)

    def eval_data(self, split: str, keys):
        """(x, y), each (E, B, T), the E batches of one eval call: their windows come from the
        call's first key."""
        if self.fixed_val and split == "val":  # the call's share of the fixed windows
            calls = self.eval_iters // self.eval_shape[0]
            first = (self.val_call % calls) * int(np.prod(self.eval_shape))
            self.val_call += 1
            local = fixed_windows(self.splits[split], first, self.eval_shape, self.block_size,
                                  self.eval_rows)
        else:
            self.val_call = 0  # an eval starts with its train calls
            seed = (self.seed, 1, *np.asarray(jax.random.key_data(keys[0])).tolist())
            local = local_batch(self.splits[split], seed, 0, self.eval_shape, self.block_size,
                                self.eval_rows)
        return tuple(parallel.put_process_local(t, self.eval_sharding,
                                                (*self.eval_shape, self.block_size))
                     for t in local)

    def prepare_eval(self):
        pass  # eval_data reads on the host: nothing to compile

    def eval_spec(self):
        spec = jax.ShapeDtypeStruct((*self.eval_shape, self.block_size), jnp.int32,
                                    sharding=self.eval_sharding)
        return spec, spec  # (x, y)

    @staticmethod
    def train_batch(data, i, key):
        return data[0][i], data[1][i]  # (A, B, T) each

    eval_batch = train_batch  # (B, T) each

    @staticmethod
    def abstract_data(config, mesh, n: int):
        """(train_data for an n-step call, eval_data for one eval call) as ShapeDtypeStructs:
        what train_data / eval_data return, without reading a file (ahead-of-time compiling)."""
        accum, batch = config.gradient_accumulation_steps, config.batch_size
        block = config.block_size
        evals = eval_batches_per_call(config.eval_iters)
        train = jax.ShapeDtypeStruct((n, accum, batch, block), jnp.int32,
                                     sharding=parallel.batch_sharding(mesh, leading=2))
        val = jax.ShapeDtypeStruct((evals, batch, block), jnp.int32,
                                   sharding=parallel.batch_sharding(mesh, leading=1))
        return (train, train), (val, val)

    def close(self):
        """Stop the prefetch thread (the loop calls it when it ends)."""
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.thread = None


def make(dataset: Dataset, config, mesh) -> BatchSource:
    """The batch source of a dataset: on the host for token files, else on the device."""
    return (HostBatches if dataset.on_host else DeviceBatches)(dataset, config, mesh)
