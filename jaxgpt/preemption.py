"""Stopping cleanly when the machine is being taken away.

SIGTERM (a spot VM reclaimed, `gcloud ... stop`, a Kubernetes eviction) or a first Ctrl-C asks the
training loop to finish the compiled call in flight, save a checkpoint at that step, and stop
(`Preempted`). A second Ctrl-C kills the process at once: the default action, which leaves the
last good checkpoint untouched (orbax commits a step only once it is completely written).

One process: Python signal handlers set a flag the loop reads after each call. Several processes:
each may be signalled at a different moment, or only one of them, so they must agree on the step.
`jax.distributed.initialize` starts JAX's preemption sync manager, which catches SIGTERM itself,
tells every process through the coordination service, and makes
`multihost_utils.reached_preemption_sync_point(i)` return True at the same call index `i` in
all of them. A Ctrl-C there is turned into a SIGTERM for it (a Python SIGTERM handler would
replace its own).
"""

import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

from jaxgpt.errors import UserError


class Preempted(Exception):
    """The run stopped early after saving a checkpoint at `step`; `signum` says why."""

    def __init__(self, step: int, signum: int, saved: bool):
        self.step, self.signum, self.saved = step, signum, saved
        what = "checkpoint saved" if saved else "no step trained yet, nothing to save"
        super().__init__(f"preempted at step {step}: {what}; run the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process stopped by that signal


def check_multiprocess() -> None:
    """Several processes without jax.distributed (a pod slice started without --distributed):
    JAX's preemption sync point is then always False and the Python SIGTERM handler is not
    installed (the sync manager would own SIGTERM), so a SIGTERM would kill the run unsaved."""
    if jax.process_count() > 1 and not jax.distributed.is_initialized():
        raise UserError(f"{jax.process_count()} processes but jax.distributed is not "
                        "initialized, so a preemption (SIGTERM) would stop the run without a "
                        "checkpoint: start every process with --distributed (TPU pod slices, "
                        "SLURM, Open MPI) or --coordinator_address, --num_processes and "
                        "--process_id")


class Preemption:
    """`requested()` after each compiled call (train or eval), at the same points in every
    process: True once the run should save and stop, at the same call in all of them. Use as a
    context manager: the signal handlers are installed inside."""

    def __init__(self):
        self.signum = None  # the signal that asked for the stop
        self.multi = jax.process_count() > 1
        self.checks = 0  # the sync point's step index: equal across processes at each check
        self._saved_handlers = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            self._install(signal.SIGINT, self._on_interrupt)
            if not self.multi:  # with several processes JAX's sync manager owns SIGTERM
                self._install(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)
        return False

    def _install(self, signum, handler):
        self._saved_handlers[signum] = signal.signal(signum, handler)

    def _on_term(self, signum, frame):
        self.signum = signum

    def _on_interrupt(self, signum, frame):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
        print("\ninterrupted: saving a checkpoint after the step in flight (Ctrl-C again to quit "
              "at once, keeping the last saved checkpoint)", file=sys.stderr, flush=True)
        if self.multi:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's sync manager: every process stops

    def requested(self) -> bool:
        self.checks += 1
        if not self.multi:
            return self.signum is not None
        if multihost_utils.reached_preemption_sync_point(self.checks):
            self.signum = self.signum or signal.SIGTERM
            return True
        return False
