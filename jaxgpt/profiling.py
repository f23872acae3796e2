"""`profile_steps=N`: a jax.profiler trace of N training steps after warm-up, into the workdir.

The trace starts before the second compiled call (the first one compiles) and stops once N
steps ran under it, after waiting for the device. It is written to a local temporary directory,
then copied through etils.epath to WORKDIR/plugins/profile/<date>/ (so a gs:// workdir works):
`tensorboard --logdir WORKDIR` shows it in the Profile tab (with the tensorboard-plugin-profile
package), and `perfetto_trace.json.gz` opens in https://ui.perfetto.dev. Process 0 only.
"""

import shutil
import tempfile
from pathlib import Path

import jax
from etils import epath

from jaxgpt.errors import UserError


def check(config) -> None:
    n = config.get("profile_steps", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or (n and n >= config.max_iters):
        raise UserError(f"profile_steps={n!r}: use 0 (no profile) or a number of steps smaller "
                        f"than max_iters={config.max_iters} (the first call is warm-up)")


class Profiler:
    """Call `before_call(step, calls_done, state)` before each compiled call and `close(state)`
    at the end; `saved` is the workdir's trace directory once written."""

    def __init__(self, config, workdir, enabled: bool = True, say=print):
        check(config)
        self.say = say
        self.steps = config.get("profile_steps", 0) if enabled else 0
        self.workdir = epath.Path(workdir)
        self.local = None  # the temporary trace directory while tracing
        self.start_step = None
        self.saved = None

    def before_call(self, step: int, calls_done: int, state) -> None:
        if not self.steps or self.saved is not None:
            return
        if self.local is None and calls_done >= 1:
            self.local = Path(tempfile.mkdtemp(prefix="jaxgpt-profile-"))
            jax.profiler.start_trace(str(self.local), create_perfetto_trace=True)
            self.start_step = step
        elif self.local is not None and step - self.start_step >= self.steps:
            self._stop(state, step)

    def close(self, state, step: int) -> None:
        if self.local is not None and self.saved is None:
            self._stop(state, step)

    def _stop(self, state, step: int) -> None:
        jax.block_until_ready(state)  # the traced calls must finish inside the trace
        jax.profiler.stop_trace()
        for f in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = f.relative_to(self.local)
            dest = self.workdir / str(rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
            self.saved = dest.parent
        shutil.rmtree(self.local, ignore_errors=True)
        self.saved = self.saved or self.workdir
        self.say(f"profile of steps {self.start_step}-{step - 1} written to {self.saved} "
                 f"(tensorboard --logdir {self.workdir}: Profile tab)")
