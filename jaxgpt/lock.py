"""One run per workdir: process 0 holds WORKDIR/run.lock while it trains.

Two runs on one workdir (a command sent twice to a pod slice, a forgotten tmux pane) would both
resume from the same checkpoint and interleave their checkpoints and metrics. The lock is taken
before the run writes anything and released on every exit path (training.train's ExitStack).

The lock is a small JSON file: {host, pid, started, heartbeat, token}, created only if absent:
  local disk  os.link of a complete file: the file system decides atomically who made it;
  gs://       an upload with the precondition ifGenerationMatch=0 (gcsfs's mode="create", a
              multipart upload): GCS answers 412 to every creator but the first.
A lock left by a run that died without releasing it (kill -9, a VM that vanished) must not
block the next run: on the same host, a holder whose pid is gone is taken over with a warning;
from anywhere, a lock whose heartbeat (refreshed by the holder every HEARTBEAT_SECS) is older
than STALE_SECS is taken over; `--config.take_over_lock=True` takes over any lock (for a run
you know is gone).
"""

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid

import fsspec
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxgpt import parallel
from jaxgpt.errors import UserError
from jaxgpt.workdir import is_remote

LOCK_FILE = "run.lock"
HEARTBEAT_SECS = 60.0
STALE_SECS = 600.0  # ten missed heartbeats: the holder is gone (or cut off from the workdir)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
            f"{holder.get('started', '?')}, last heartbeat {holder.get('heartbeat', '?')}")


class RunLock:
    """`with RunLock(workdir, take_over=...)`: held inside, released on exit."""

    def __init__(self, workdir, *, take_over: bool = False, warn=None,
                 heartbeat_secs: float = HEARTBEAT_SECS, stale_secs: float = STALE_SECS):
        self.path = epath.Path(workdir) / LOCK_FILE
        self.remote = is_remote(self.path)
        self.take_over, self.heartbeat_secs, self.stale_secs = take_over, heartbeat_secs, stale_secs
        self.warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
                   "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread = None

    # -- the file, local or remote ------------------------------------------------------------

    def _content(self) -> bytes:
        return json.dumps({**self.me, "heartbeat": _now(), "beat": time.time()}).encode()

    def _create(self) -> bool:
        """Create the lock if absent; False if it exists."""
        if self.remote:
            fs, path = fsspec.core.url_to_fs(os.fspath(self.path))
            try:
                fs.pipe_file(path, self._content(), mode="create")  # ifGenerationMatch=0
            except FileExistsError:  # gcsfs's name for 412 Precondition Failed
                return False
            return True
        # written beside, then hard-linked into place: link() fails if the name exists, and a
        # reader never sees the lock empty (an O_EXCL create is visible before its write)
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
        tmp.write_bytes(self._content())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True

    def _read(self) -> dict | None:
        """The holder's record; None if the lock is gone; {} if it cannot be parsed."""
        try:
            return json.loads(self.path.read_bytes() or b"{}")
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # damaged: no holder to wait for (its heartbeat reads as long silent)

    def _remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    # -- acquire / release --------------------------------------------------------------------

    def _why_stale(self, holder: dict) -> str | None:
        """Why the holder is gone, or None if it may be alive."""
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"]):
                return "its process is gone"
            return None  # alive on this host: a heartbeat gap is a pause, not a death
        silent = time.time() - float(holder.get("beat", 0) or 0)
        if silent > self.stale_secs:
            return f"no heartbeat for {silent:.0f} s (> {self.stale_secs:.0f} s)"
        return None

    def acquire(self) -> None:
        for _ in range(3):  # a takeover races with other starters: create again, exclusively
            if self._create():
                self._start_heartbeat()
                return
            holder = self._read()
            if holder is None:
                continue  # released in between
            why = "take_over_lock=True" if self.take_over else self._why_stale(holder)
            if why is None:
                raise UserError(
                    f"{self.path.parent} is in use by another run ({_describe(holder)}): wait "
                    f"for it to finish or stop it, or use another --workdir; if that run is "
                    f"gone, pass --config.take_over_lock=True (a lock without heartbeat is "
                    f"taken over after {self.stale_secs:.0f} s)")
            self.warn(f"taking over the lock of {self.path.parent} ({_describe(holder)}): {why}")
            # only the record judged stale: another starter may have taken it over already
            # (a window of one read, not closed: the takeover of a dead run's lock is rare)
            again = self._read()
            if again is not None and again.get("token") == holder.get("token"):
                self._remove()
        raise UserError(f"could not take the lock {self.path}: other runs keep taking it; "
                        "start only one run on this --workdir")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder is not None and holder.get("token") == self.me["token"]:
            self._remove()  # never a lock another run took over

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    # -- heartbeat ----------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_secs):
            try:
                holder = self._read()
                if holder is not None and holder.get("token") != self.me["token"]:
                    self.warn(f"another run took over the lock {self.path} ({_describe(holder)})")
                    return
                data = self._content()
                if self.remote:
                    self.path.write_bytes(data)
                else:  # written beside and renamed: a reader never sees half a file
                    tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
                    tmp.write_bytes(data)
                    tmp.replace(self.path)
            except OSError as e:  # a full disk: the run reports its own write failures
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    self.warn(f"cannot refresh the lock {self.path} ({e})")


def hold(workdir, take_over: bool, stack: contextlib.ExitStack) -> None:
    """Process 0 takes the workdir's lock (released when `stack` closes); the others only
    learn whether it could, so a refused multi-host run stops in every process at once."""
    error = None
    if parallel.is_main_process():
        try:
            stack.enter_context(RunLock(workdir, take_over=take_over))
        except UserError as e:
            error = e
    if jax.process_count() > 1:
        locked = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not locked and error is None:
            raise UserError(f"process 0 could not lock --workdir {workdir}: see its message")
    if error is not None:
        raise error
