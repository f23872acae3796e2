"""Where a run's metrics go: WORKDIR/metrics.jsonl, TensorBoard event files beside it, and
Weights & Biases when `wandb_log` is set. Only process 0 writes.

Every file goes through etils.epath, so a `gs://` workdir works like a local one. Object stores
cannot append to an object: there a growing file is re-uploaded whole at each flush (as
TensorFlow's GCS writer does), and flushes are spaced out unless forced (after each eval and at
the end of the run).

TensorBoard: tensorboardX's EventsWriter (framework-free: numpy + protobuf, no TensorFlow) writes
the event records synchronously; its file layer has a hook per URL scheme
(`register_writer_factory`), through which `gs://`, `s3://` and `az://` files go to epath. The
`tensorboard` package's own writer is marked experimental and, through fsspec, appends with
mode "a", which gcsfs turns into an overwrite.

A line cut short (a disk that filled, a machine that vanished mid-write) is never continued: a
resumed run starts a new line first, and `read` skips any line that is not a JSON object, saying
once how many it skipped.
"""

import itertools
import json
import os
import secrets
import sys
import time

from etils import epath

from jaxgpt.errors import UserError
from jaxgpt.workdir import as_path, is_remote

REMOTE_FLUSH_SECS = 30.0  # at most one re-upload of a growing remote file per this many seconds
METRICS_FILE = "metrics.jsonl"
_URL_SCHEMES = ("gs", "s3", "az")  # epath's object stores
_event_files = itertools.count()


class AppendFile:
    """A file that only grows, written through etils.epath (bytes in, `flush` makes them visible).

    Local: each flush appends. Remote: each flush rewrites the object with everything written so
    far, including what the file held when it was opened (a resumed run's earlier lines).
    """

    def __init__(self, path):
        self.path = epath.Path(path)
        self.remote = is_remote(path)
        self.content = (self.path.read_bytes() if self.remote and self.path.exists() else b"")
        self.pending = b""
        self.last_flush = -REMOTE_FLUSH_SECS
        self.closed = False

    def write(self, data: bytes) -> None:
        self.pending += data

    def ends_mid_line(self) -> bool:
        """Whether what the file holds does not end with a newline (a line cut short)."""
        if self.remote:
            return bool(self.content) and not self.content.endswith(b"\n")
        if not self.path.exists():
            return False
        with self.path.open("rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"

    def flush(self, force: bool = True) -> None:
        if not self.pending:
            return
        if self.remote:
            if not force and time.monotonic() - self.last_flush < REMOTE_FLUSH_SECS:
                return
            self.path.write_bytes(self.content + self.pending)
            self.content += self.pending
        else:
            with self.path.open("ab") as f:
                f.write(self.pending)
        self.pending = b""
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        self.closed = True


class _EpathFiles:
    """tensorboardX's writer factory for a URL scheme: event files through epath."""

    def open(self, path):
        return AppendFile(path)

    def directory_check(self, path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _tensorboard(workdir):
    from tensorboardX import record_writer
    from tensorboardX.event_file_writer import EventsWriter

    for scheme in _URL_SCHEMES:
        record_writer.register_writer_factory(scheme, _EpathFiles())
    # a new file per start, named by the second, the host, the process id and a count (two starts
    # in one second must not share a file): TensorBoard reads every events.out.tfevents.* file
    suffix = f".{os.getpid()}.{next(_event_files)}"
    return EventsWriter(os.path.join(os.fspath(workdir), "events"), suffix)


def check_wandb(config) -> None:
    """UserError before anything compiles if W&B is asked for but not installed."""
    if config.get("wandb_log", False):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("wandb_log=True needs the wandb package: pip install "
                            "'jaxgpt[wandb]' (or drop --config.wandb_log)") from None


WANDB_ID_FILE = "wandb_run_id"


def _wandb(workdir, config):
    import wandb

    # the run id lives in the workdir, so a resumed run (train.py again on the same workdir)
    # continues the same W&B run instead of starting a new one
    id_file = workdir / WANDB_ID_FILE
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(8)  # wandb.util.generate_id is gone from recent wandb
        id_file.write_text(run_id)
    return wandb.init(project=config.wandb_project, name=config.wandb_run_name or None,
                      config=config.to_dict(), id=run_id, resume="allow")


class Metrics:
    """One call per event, `write(event, step, **values)`: a metrics.jsonl line
    `{"event", "step", **values}`, TensorBoard scalars tagged `event/key`, and the same keys to
    W&B. `enabled=False` (processes other than 0) writes nothing."""

    def __init__(self, workdir, config, enabled: bool = True):
        check_wandb(config)
        self.enabled = enabled
        if not enabled:
            return
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl = AppendFile(workdir / METRICS_FILE)
        if self.jsonl.ends_mid_line():  # an earlier run stopped mid-write: never continue its line
            print(f"warning: the last line of {self.jsonl.path} was cut short (an earlier run "
                  "stopped mid-write); this run's lines start on a new line", file=sys.stderr)
            self.jsonl.write(b"\n")
        self.events = _tensorboard(workdir)
        self.wandb = _wandb(workdir, config) if config.get("wandb_log", False) else None

    def write(self, event: str, step: int, **values) -> None:
        if not self.enabled:
            return
        from tensorboardX import summary
        from tensorboardX.proto.event_pb2 import Event

        self.jsonl.write((json.dumps({"event": event, "step": step, **values}) + "\n").encode())
        self.jsonl.flush(force=False)
        scalars = {f"{event}/{k}": float(v) for k, v in values.items()}
        for tag, value in scalars.items():
            self.events.write_event(Event(wall_time=time.time(), step=step,
                                          summary=summary.scalar(tag, value)))
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def flush(self) -> None:
        """Everything written so far visible (local and remote)."""
        if self.enabled:
            self.jsonl.flush()
            self.events.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.events.close()
            if self.wandb is not None:
                self.wandb.finish()


def read(workdir) -> list[dict]:
    """Every record of WORKDIR/metrics.jsonl, in the order written. A line that is not a JSON
    object (cut short by a write that never finished) is skipped, and how many were is said
    once on stderr; blank lines are ignored. FileNotFoundError if there is no such file."""
    path = as_path(workdir) / METRICS_FILE
    records, cut = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            cut += 1
    if cut:
        print(f"warning: skipped {cut} line{'s' if cut > 1 else ''} of {path} that "
              f"{'are' if cut > 1 else 'is'} not JSON (cut short by a write that never "
              "finished)", file=sys.stderr)
    return records
