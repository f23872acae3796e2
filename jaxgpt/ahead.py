"""A compiled call whose program can compile ahead of the first call, on another thread.

A run compiles the state's init, runs it, then compiles the training call: one after the other,
although the training call needs only the state's shapes. XLA compiles without holding
Python's GIL, so train.py starts the training call's compile on a thread from those shapes
while the init compiles and runs: on a 2-core CPU the two take ≈ 5.5–6.5 s instead of 7 s for
the CPU recipe's model (docs/performance.md); on an accelerator the init's compile hides behind
the training step's (not measured there). The eval call's program compiles next on that
thread, while the first steps run. `JAXGPT_COMPILE_AHEAD=0` compiles each program at its first
call, as before: on a machine whose cores are all busy already (a test suite with a worker per
core) the overlap has no idle core to use, and two compiles at once cost more CPU time.

    call = Ahead(jax.jit(f, static_argnames="num_steps"))
    call.compile(abstract_state, data, num_steps=10)  # returns at once
    ...                                               # other work meanwhile
    call(state, data, num_steps=10)  # waits for that program, then runs it
    call(state, data, num_steps=3)   # any other program: through the jit, as before
    call.compiled(state, data, num_steps=10)  # Compiled(program, seconds, from_cache) | None
"""

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import jax

from jaxgpt import compile_cache

ENV = "JAXGPT_COMPILE_AHEAD"


def enabled() -> bool:
    """Whether train.py compiles its first training call ahead (`JAXGPT_COMPILE_AHEAD`, on by
    default)."""
    return os.environ.get(ENV, "1").lower() not in ("0", "off", "false")


class Compiled(NamedTuple):
    program: object  # jax.stages.Compiled
    seconds: float  # how long its compile (or its load from the cache) took
    from_cache: bool  # loaded from the persistent compilation cache


class Ahead:
    """`jitted`, with programs compiled ahead for some static arguments (`compile`)."""

    def __init__(self, jitted):
        self.jitted = jitted
        self.programs: dict[tuple, Future] = {}  # _key(args, static) -> Future[Compiled]

    def compile(self, *args, pool: ThreadPoolExecutor | None = None, **static) -> None:
        """Start compiling the program for these arguments (arrays or ShapeDtypeStructs with
        their shardings) and static arguments on a thread; returns at once. `pool`: queue it
        there (one thread: after the compiles queued before it) instead of a thread of its own."""
        own = pool is None
        pool = pool or ThreadPoolExecutor(1, thread_name_prefix="compile-ahead")
        self.programs[_key(args, static)] = pool.submit(self._compile, args, static)
        if own:
            pool.shutdown(wait=False)  # the thread ends when the compile does

    def _compile(self, args, static) -> Compiled:
        start = time.perf_counter()
        with compile_cache.hits(threading.get_ident()) as hits:
            program = self.jitted.lower(*args, **static).compile()
        return Compiled(program, time.perf_counter() - start, hits() > 0)

    def compiled(self, *args, **static) -> Compiled | None:
        """The program compiled ahead for these arguments' shapes and these static arguments
        (waiting for it), if any."""
        future = self.programs.get(_key(args, static))
        return None if future is None else future.result()  # a compile's error raises here

    def __call__(self, *args, **static):
        ahead = self.compiled(*args, **static)
        return self.jitted(*args, **static) if ahead is None else ahead.program(*args)

    def lower(self, *args, **static):
        return self.jitted.lower(*args, **static)


def _key(args, static: dict) -> tuple:
    """A program's key: its arguments' structure, shapes and dtypes, and its static ones."""
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((x.shape, x.dtype) for x in leaves), tuple(sorted(static.items()))
