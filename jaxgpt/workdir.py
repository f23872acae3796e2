"""A run's workdir: a local directory or a cloud URL (`gs://bucket/run`, any etils.epath
scheme). Every file under it goes through etils.epath, never pathlib: orbax's arrays through
tensorstore, the rest through epath (gcsfs for gs://, `pip install 'jaxgpt[gcs]'`).
"""

import os
from pathlib import Path

import jax
from etils import epath

from jaxgpt.errors import UserError

RUNS_DIR = "runs"


def is_remote(path) -> bool:
    return "://" in os.fspath(path)


def as_path(workdir) -> epath.Path:
    """An epath.Path; local paths made absolute (orbax asks for absolute directories)."""
    if is_remote(workdir):
        return epath.Path(workdir)
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(workdir))))


def default(config_file: str) -> str:
    """runs/<config file stem>: `train.py --config configs/shakespeare.py` -> runs/shakespeare."""
    return os.path.join(RUNS_DIR, Path(config_file.split(":")[0]).stem)


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def prepare(workdir) -> epath.Path:
    """Create the workdir (if needed) and check that this process can write in it; a one-line
    UserError otherwise (an existing file, a missing bucket, no permission, no gcsfs)."""
    path = as_path(workdir)
    hint = ("check that the bucket exists and this machine may write to it "
            f"(gcloud storage ls {'/'.join(os.fspath(path).split('/')[:3])})"
            if is_remote(workdir) else "choose a directory you can write to")
    try:
        if path.is_file():
            raise UserError(f"--workdir {workdir} is a file, not a directory: pass a directory "
                            "(a new one starts a run, an existing one resumes it)")
        path.mkdir(parents=True, exist_ok=True)
        # object stores create nothing on mkdir: only a write shows that the bucket exists (each
        # process probes: orbax writes every process's share of a checkpoint)
        probe = path / f".write-test-{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except UserError:
        raise
    except ImportError as e:
        raise UserError(f"--workdir {workdir}: {e} (pip install 'jaxgpt[gcs]')") from None
    except Exception as e:  # noqa: BLE001  each storage client raises its own types
        raise UserError(f"cannot write to --workdir {workdir} ({_reason(e)}): {hint}") from None
    return path
