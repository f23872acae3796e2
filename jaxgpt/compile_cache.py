"""JAX's persistent compilation cache, on by default for training runs.

A resumed Spot VM run, or a second run of a recipe, loads the compiled training step from disk
instead of compiling it again (GPT-2 on a TPU slice: tens of seconds to minutes). Where:

- `JAX_COMPILATION_CACHE_DIR` (JAX's own variable) if set, else
- `JAXGPT_COMPILATION_CACHE`: a directory or bucket URL, or `off`, else
- beside a cloud workdir: `gs://BUCKET/runs/gpt2` -> `gs://BUCKET/runs/jax_cache` (a TPU VM's
  disk goes with the VM; the bucket outlives it and every run in it shares the cache), else
- `~/.cache/jaxgpt/jax_cache` on this machine.

JAX keys each entry on the program, the devices and the jax/libtpu versions, so a stale entry is
never used; it only stores programs that took over a second to compile (its own threshold).
"""

import contextlib
import os
import threading

import jax
from etils import epath

ENV = "JAXGPT_COMPILATION_CACHE"
HIT = "/jax/compilation_cache/cache_hits"  # jax.monitoring's event for an executable loaded


def directory(workdir) -> str | None:
    """Where compiled programs are kept for a run in `workdir`; None: no cache."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    chosen = os.environ.get(ENV, "")
    if chosen.lower() in ("off", "0", "false", "none"):
        return None
    if chosen:
        return chosen
    workdir = str(workdir)
    if "://" in workdir:
        return str(epath.Path(workdir).parent / "jax_cache")
    return os.path.join(os.path.expanduser("~"), ".cache", "jaxgpt", "jax_cache")


def enable(workdir) -> str | None:
    """Turn the cache on for this process (before the first compile); returns where."""
    path = directory(workdir)
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
    return path


@contextlib.contextmanager
def hits(thread: int | None = None):
    """Counts the executables loaded from the cache inside the block: `with hits() as n:`
    ... `n()` (JAX records a monitoring event for each, in the thread that compiles).
    `thread`: only that thread's loads (a compile ahead runs beside the main thread's)."""
    count = [0]

    def listen(event, **kwargs):
        if event == HIT and thread in (None, threading.get_ident()):
            count[0] += 1

    jax.monitoring.register_event_listener(listen)
    try:
        yield lambda: count[0]
    finally:
        jax.monitoring.unregister_event_listener(listen)
