"""Checkpoint storage: an orbax CheckpointManager in WORKDIR/checkpoints, and the run's config
and tokenizer as JSON beside it, so a workdir is everything sample.py needs (loading a trained
workdir as a model to sample: pretrained.load_run).

Layout:  WORKDIR/config.json  WORKDIR/tokenizer.json  WORKDIR/checkpoints/<step>/...

A checkpoint holds the TrainState's arrays (step, params, opt_state, rng) and the val loss as
its metric. Kept: the `keep_best` lowest val losses plus the latest (for resume), counting the
steps of earlier runs of the workdir too (`retained`), so a run restarted any number of times
keeps what a straight run keeps. Orbax writes a step into a temporary directory and renames it
when complete, and old steps are deleted only after that, so a crash mid-write never destroys
the last good checkpoint; the temporary directory a crash leaves is removed at the next start.
A failed write (a full disk, a quota, a permission) ends the run with one line (`WriteFailed`).
"""

import errno
import json
import math
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from jaxgpt import config as config_lib
from jaxgpt import orbax_fix, parallel
from jaxgpt import tokenizer as tokenizers
from jaxgpt.errors import UserError
from jaxgpt.gpt_config import WEIGHT_KEYS
from jaxgpt.workdir import as_path, is_remote

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FIELDS = ("step", "params", "opt_state", "rng")


def _warn(message: str) -> None:
    if parallel.is_main_process():
        print(f"warning: {message}", file=sys.stderr)


def _val_loss(metrics) -> float:
    return metrics["val_loss"]


def make_manager(workdir, keep_best: int = 1, *, read_only: bool = False):
    """The orbax manager of WORKDIR/checkpoints: async saves, best `keep_best` + latest kept."""
    orbax_fix.apply()  # a failed write reported once, not by each of orbax's threads
    keep = policies.AnyPreservationPolicy([
        policies.LatestN(n=1),  # resume continues from here
        policies.BestN(get_metric_fn=_val_loss, reverse=True, n=keep_best),  # lowest val loss
    ])
    # lightweight_initialize: don't read every step's metrics at start-up (one damaged file
    # would make the whole directory unreadable); steps from earlier runs then have no metrics
    # in memory and orbax keeps them: RunCheckpoints.prune applies `retained` to them.
    # cleanup_tmp_directories: orbax's runs in a thread that close() does not wait for (a
    # traceback at exit when a run stops early): RunCheckpoints removes them itself, at once
    options = ocp.CheckpointManagerOptions(
        best_fn=_val_loss, best_mode="min", preservation_policy=keep, read_only=read_only,
        enable_async_checkpointing=True, cleanup_tmp_directories=False,
        lightweight_initialize=True, save_interval_steps=0 if read_only else 1,
        create=not read_only)
    return ocp.CheckpointManager(as_path(workdir) / CHECKPOINT_DIR, options=options)


def _as_manager(workdir_or_manager):
    if isinstance(workdir_or_manager, ocp.CheckpointManager):
        return workdir_or_manager
    directory = as_path(workdir_or_manager) / CHECKPOINT_DIR
    if not directory.is_dir():
        raise UserError(f"no checkpoint in {workdir_or_manager}: train one with "
                        f"python train.py --config ... --workdir {workdir_or_manager}")
    return make_manager(workdir_or_manager, read_only=True)


def _tree(state) -> dict:
    """The arrays of a TrainState that a checkpoint holds."""
    return {k: getattr(state, k) for k in STATE_FIELDS}


def abstract_like(state):
    """ShapeDtypeStructs carrying the shardings of a live state's checkpointed fields: a restore
    target. The rest (the float16 loss scale, which restarts on resume as nanoGPT's GradScaler
    does) stays the live state's."""
    return state.replace(**{k: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), getattr(state, k))
        for k in STATE_FIELDS})


@jax.jit
def _finite_norm(params) -> jax.Array:
    return jnp.isfinite(optax.tree.norm(params))  # one compiled call, not one per leaf


def is_finite(state) -> bool:
    return bool(_finite_norm(state.params))


def save(manager, state, val_loss: float | None) -> bool:
    """Start an async save of `state` at its step (returns once the arrays are on the host).

    Refuses non-finite states (a diverged run must not replace a good checkpoint) and steps
    that already exist (a resumed run re-reaching its start step). `val_loss=None` (a save on
    preemption, between evals) stores no metric: never the "best", kept while it is the latest.
    """
    step = int(state.step)
    if step in manager.all_steps():
        return False
    if (val_loss is not None and not math.isfinite(val_loss)) or not is_finite(state):
        _warn(f"not saving step {step}: its val loss or params are not finite")
        return False
    tree = _tree(state)
    if jax.devices()[0].platform == "cpu":
        # on CPU the "copy to host" is a view of the device buffer, and the next train step
        # donates (overwrites) it while the write is still running: save a copy instead
        tree = jax.tree.map(jnp.copy, tree)
    metrics = None if val_loss is None else {"val_loss": float(val_loss)}
    return manager.save(step, args=ocp.args.StandardSave(tree), metrics=metrics, force=True)


def restore(workdir_or_manager, abstract_state, step: int | None = None):
    """Restore the latest (or the given) step into `abstract_state`'s shapes and shardings.

    `abstract_state` is a TrainState of arrays or ShapeDtypeStructs with `.sharding`
    (jax.eval_shape + parallel.state_sharding, or `abstract_like(state)`): a checkpoint
    written on 8 devices restores onto 1 and back. An unreadable step falls back to the next
    newest one with a warning. Returns (state, step).
    """
    manager = _as_manager(workdir_or_manager)
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise UserError(f"{manager.directory} holds no checkpoint: is it a jaxgpt workdir's "
                        "checkpoints directory?")
    if step is not None:
        if step not in steps:
            raise UserError(f"no checkpoint for step {step} in {manager.directory} "
                            f"(have: {', '.join(map(str, sorted(steps)))})")
        steps = [step] + [s for s in steps if s != step]
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # when none is given
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, "sharding", None) or one_device),
        _tree(abstract_state))
    for i, s in enumerate(steps):
        try:
            tree = manager.restore(s, args=ocp.args.StandardRestore(target))
        except Exception as e:  # orbax raises many types for a damaged step directory
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if i + 1 == len(steps):
                raise UserError(f"checkpoint {manager.directory / str(s)} cannot be read "
                                f"({reason}); no older good checkpoint to fall back to") from e
            _warn(f"checkpoint step {s} cannot be read ({reason}); falling back to step "
                  f"{steps[i + 1]}")
            continue
        return abstract_state.replace(**tree), s


def restore_for_eval(config, workdir, state):
    """(state, step or None) that eval_only evaluates: this workdir's latest checkpoint if
    init_from asks for it (resume, or auto with one), else `state` as it is."""
    has_checkpoint = (as_path(workdir) / CHECKPOINT_DIR).is_dir()
    if config.init_from == "resume" or (config.init_from == "auto" and has_checkpoint):
        return restore(workdir, abstract_like(state))
    return state, None


DAMAGED = "damaged"  # a step whose metrics cannot be read


def read_metrics(manager) -> dict:
    """{step: val loss, None (saved without one: on preemption) or DAMAGED} of every step."""
    out = {}
    for step in manager.all_steps():
        try:
            metrics = manager.metrics(step)
            out[step] = None if metrics is None else float(_val_loss(metrics))
        except Exception:  # noqa: BLE001  a missing or half-written metrics file
            out[step] = DAMAGED
    return out


def val_losses(workdir_or_manager) -> dict:
    """{step: val loss} of the checkpoints whose metrics can be read."""
    metrics = read_metrics(_as_manager(workdir_or_manager))
    return {s: v for s, v in metrics.items() if isinstance(v, float)}


def retained(metrics: dict, keep_best: int) -> set:
    """The steps to keep of {step: val loss | None | DAMAGED}: the `keep_best` lowest val
    losses and the newest step; when the newest is damaged, also the newest undamaged one
    (what restore falls back to). A damaged step is kept only while it is the newest."""
    steps = sorted(metrics, reverse=True)
    keep = set(steps[:1])
    if steps and metrics[steps[0]] == DAMAGED:
        keep.update(next(([s] for s in steps if metrics[s] != DAMAGED), []))
    losses = {s: v for s, v in metrics.items() if isinstance(v, float)}
    keep.update(sorted(losses, key=losses.get)[:keep_best])
    return keep


def remove_partial_steps(workdir) -> list[str]:
    """Delete the step directories a crash left half-written (`<step>.orbax-checkpoint-tmp*`
    on local disks, steps without a commit marker on object stores). Process 0 only."""
    directory = as_path(workdir) / CHECKPOINT_DIR
    if not parallel.is_main_process() or not directory.is_dir():
        return []
    names = ocp.path.step.tmp_checkpoints(directory)
    for name in names:
        (directory / name).rmtree()
    return names


def latest_step(workdir) -> int | None:
    """The newest step in WORKDIR/checkpoints, None if there is none (reads only)."""
    if not (as_path(workdir) / CHECKPOINT_DIR).is_dir():
        return None
    return make_manager(workdir, read_only=True).latest_step()


def best_step(workdir_or_manager) -> int | None:
    """The step with the lowest val loss (sample.py's default), None if there is none."""
    losses = val_losses(workdir_or_manager)
    return min(losses, key=losses.get) if losses else None


# ---------------------------------------------------------------------------------------------
# The run's config and tokenizer, beside the checkpoints


def _write_atomic(path: epath.Path, text: str) -> None:
    """Never a half-written file where a good one was: a local file is written beside and
    renamed; an object store's upload (gs://) is atomic already."""
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_run_info(workdir, config, tokenizer) -> None:
    if parallel.is_main_process():
        workdir = as_path(workdir)
        _write_atomic(workdir / CONFIG_FILE, config.to_json(indent=2))
        _write_atomic(workdir / TOKENIZER_FILE, json.dumps(tokenizer.to_dict()))


def load_config(workdir) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (keys added since take their defaults)."""
    path = as_path(workdir) / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no {CONFIG_FILE} in {workdir}: is it a jaxgpt workdir (made by "
                        "train.py --workdir)?") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    config = config_lib.base_config()
    for key, value in saved.items():
        config[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    return config


def load_tokenizer(workdir):
    return tokenizers.load(as_path(workdir) / TOKENIZER_FILE)


def _plain(value):
    # a locked ConfigDict (train.py's --config) never equals an unlocked one with the same keys
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def check_compatible(workdir, config, tokenizer) -> None:
    """UserError naming the keys when `config` cannot continue the workdir's checkpoints."""
    saved = load_config(workdir)
    differ = [f"{k} ({saved[k]!r} -> {config[k]!r})" for k in WEIGHT_KEYS
              if saved.get(k) != config.get(k)]
    if (saved.grad_clip > 0) != (config.grad_clip > 0):  # clipping adds an optimizer state
        differ.append(f"grad_clip ({saved.grad_clip} -> {config.grad_clip})")
    if saved.optimizer != config.optimizer:  # another optimizer state
        differ.append(f"optimizer ({saved.optimizer!r} -> {config.optimizer!r})")
    if load_tokenizer(workdir).to_dict() != tokenizer.to_dict():
        differ.append("the dataset's vocabulary (tokenizer)")
    if differ:
        raise UserError(f"cannot resume from {workdir}: the config differs from its checkpoint "
                        f"in {'; '.join(differ)}; use the same model config, or a new --workdir")
    changed = [k for k in config.keys() if k not in WEIGHT_KEYS and k != "init_from"
               and _plain(saved.get(k)) != _plain(config.get(k))]
    if changed:
        _warn(f"resuming with changed settings: {', '.join(changed)}")


# ---------------------------------------------------------------------------------------------
# The training loop's hooks


class WriteFailed(UserError):
    """A checkpoint could not be written: one line saying what, the newest good step, and
    what to do (the run's data is safe: the previous checkpoint stays as it was)."""


# what a full disk, a quota or a permission raises from a write
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO,
                errno.EFBIG)


def _reason(e: Exception) -> str:
    """The OS's words when a long storage message holds them ("No space left on device")."""
    text = " ".join(str(e).split())
    for code in (getattr(e, "errno", None), *WRITE_ERRNOS):
        if code and os.strerror(code) in text:
            return os.strerror(code)
    return (text[:300] + "...") if len(text) > 300 else text or type(e).__name__


def write_failure(what: str, e: Exception, directory, good_step: int | None,
                  reason: str | None = None) -> str:
    """The one line of a failed write: what failed, why, the newest good checkpoint, what to do."""
    good = (f"the newest good checkpoint is step {good_step}" if good_step is not None
            else "no checkpoint was written yet")
    return (f"{what} failed ({reason or _reason(e)}); {good} in {directory}: free space or fix the "
            "quota or permission, then run the same command to resume (or point --workdir "
            "at another place)")


class RunCheckpoints:
    """What train() needs: resume or start, then save after each eval, then wait for writes.

    nanoGPT's `always_save_checkpoint`: True saves at every eval; False saves only evals that
    improve the val loss, plus the final step (so a finished run can be extended exactly).
    Retention (`retained`) is applied at start and after each write completes, over every
    step in the directory, whichever run wrote it.
    """

    def __init__(self, config, workdir):
        self.config = config
        self.workdir = as_path(workdir)
        removed = remove_partial_steps(workdir)
        if removed:
            _warn(f"removed {', '.join(removed)}: half-written by a run that stopped mid-save")
        self.manager = make_manager(workdir, config.keep_best)
        self.metrics = read_metrics(self.manager)
        self.good_step = self.manager.latest_step()  # the newest completely written step
        self.writing = None  # the step whose async write is in flight
        self.evaluated = None  # the resumed step, if its eval is saved (`start`)
        self.failed = False
        self.best_val = min((v for v in self.metrics.values() if isinstance(v, float)),
                            default=math.inf)

    def _guard(self, call, *args, **kwargs):
        """Call the manager; a failed write (this one or the one in flight) -> WriteFailed."""
        try:
            return call(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  orbax and tensorstore raise ValueError, OSError
            self.failed = True
            step = self.writing if self.writing is not None else "?"
            raise WriteFailed(write_failure(f"writing checkpoint step {step}", e,
                                            self.manager.directory, self.good_step)) from None

    def wait(self) -> None:
        """Until the write in flight is on storage; then apply retention."""
        self._guard(self.manager.wait_until_finished)
        if self.writing is not None:
            self.good_step = self.writing
            self.writing = None
            self.prune()

    def prune(self) -> None:
        """Delete the steps `retained` does not keep (the same decision in every process: each
        reads the same metrics files)."""
        steps = self.manager.all_steps()
        known = {s: self.metrics[s] if s in self.metrics else DAMAGED for s in steps}
        for s in sorted(set(steps) - retained(known, self.config.keep_best)):
            self._guard(self.manager.delete, s)
            self.metrics.pop(s, None)

    def _check_room(self, step: int) -> None:
        """Refuse a save the local disk has no room for before orbax starts it: a write that
        fails midway leaves half a step and its threads' errors behind. A checkpoint's size is
        the newest one's (the same arrays); a first save, gs:// and multi-host runs (a decision
        every process must share) are left to the write itself."""
        if self.good_step is None or is_remote(self.workdir) or jax.process_count() > 1:
            return
        directory = os.fspath(self.manager.directory)
        newest = os.path.join(directory, str(self.good_step))
        need = sum(os.stat(os.path.join(root, f)).st_blocks * 512
                   for root, _, files in os.walk(newest) for f in files)
        free = shutil.disk_usage(directory).free
        if free < need:
            self.failed = True
            mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
            raise WriteFailed(write_failure(
                f"writing checkpoint step {step}", None, directory, self.good_step,
                reason=f"{os.strerror(errno.ENOSPC)}: {mb(free)} free, a checkpoint takes "
                       f"{mb(need)}"))

    def _save(self, state, val_loss) -> bool:
        self.wait()  # orbax's save waits for the previous write too: fail here, with its step
        step = int(state.step)
        if step in self.manager.all_steps():
            return False  # a resumed run re-reaching its start step
        self._check_room(step)
        self.writing = step
        saved = self._guard(save, self.manager, state, val_loss)
        if saved:
            self.metrics[step] = None if val_loss is None else float(val_loss)
        else:
            self.writing = None
        return saved

    def start(self, state, tokenizer):
        """The state to train from: restored (init_from resume / auto with a checkpoint) or
        the fresh `state`. Returns (state, resumed step or None)."""
        latest = self.manager.latest_step()
        init_from = self.config.init_from
        if init_from == "scratch" and latest is not None:
            raise UserError(f"{self.workdir} already holds a checkpoint (step {latest}) and "
                            "init_from=scratch would overwrite it: resume with "
                            "--config.init_from=resume, or use a new --workdir")
        if init_from == "resume" and latest is None:
            raise UserError(f"init_from=resume but {self.workdir} holds no checkpoint: train "
                            "from scratch first (init_from=scratch or auto)")
        resumed = None
        if latest is not None:
            check_compatible(self.workdir, self.config, tokenizer)
            self.prune()  # what earlier runs left beyond keep_best + the latest
            state, resumed = restore(self.manager, abstract_like(state))
        # a resumed step with a val loss was evaluated and saved already: not evaluated again
        self.evaluated = resumed if isinstance(self.metrics.get(resumed), float) else None
        write_run_info(self.workdir, self.config, tokenizer)
        return state, resumed

    def after_eval(self, state, losses: dict, *, final: bool) -> bool:
        """Save per always_save_checkpoint (never step 0, as nanoGPT); True if it saved."""
        val = losses["val"]
        improved = val < self.best_val
        if int(state.step) == 0 or not (self.config.always_save_checkpoint or improved or final):
            return False
        saved = self._save(state, val)
        if saved and improved:
            self.best_val = val
        return saved

    def save_now(self, state) -> bool:
        """The save on preemption: this step, whatever the eval schedule, written completely
        before returning. True if the step is on storage (saved now or earlier)."""
        step = int(state.step)
        if step == 0:
            return False  # nothing trained yet
        saved = step in self.manager.all_steps() or self._save(state, None)
        self.wait()
        return saved

    def close(self):
        """Wait for the write in flight (WriteFailed if it failed and nobody was told yet),
        then close the manager's threads."""
        try:
            if not self.failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001  close waits again, re-raising a reported failure
                pass
