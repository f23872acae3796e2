"""Pictures of a run: train/val loss and learning rate against step, from WORKDIR/metrics.jsonl.

    python -m jaxgpt.plot WORKDIR [WORKDIR ...] [--out PNG]

Several workdirs are overlaid, one colour each, labelled by their directory name. The PNG goes
to `loss.png` in the first workdir unless `--out` names another path. A workdir or `--out` may be
a cloud URL (gs://bucket/run). Needs matplotlib (`pip install -e ".[plot]"`).
"""

import io
import json

from absl import flags
from etils import epath

from jaxgpt import cli
from jaxgpt.errors import UserError
from jaxgpt.workdir import as_path


def define_flags() -> None:
    """The command line's flags: defined only when run as a command, so importing this
    module defines none (two commands' flags of the same name would clash)."""
    flags.DEFINE_string("out", None, "The PNG to write (default: loss.png in the first WORKDIR).")


def read_metrics(workdir) -> dict:
    """{"eval": {...}, "train": {...}}: each a dict of equal-length lists, one per field.

    eval: step, train_loss, val_loss, lr (every eval_interval); train: step, loss, lr (every
    log_interval). A resumed run repeats no step, so the lists are in step order as written.
    """
    path = as_path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass the --workdir of a train.py run")
    fields = {"eval": ("step", "train_loss", "val_loss", "lr"), "train": ("step", "loss", "lr")}
    out = {kind: {f: [] for f in names} for kind, names in fields.items()}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n} is not JSON; is it a metrics.jsonl of train.py?") from None
        kind = event.get("event")
        if kind in out:
            for f in fields[kind]:
                out[kind][f].append(event.get(f, float("nan")))
    if not out["eval"]["step"] and not out["train"]["step"]:
        raise UserError(f"{path} has no eval or train events yet; plot it after the first eval")
    return out


def _labels(workdirs) -> list[str]:
    """The directory names, or the whole paths where two runs share a name."""
    names = [as_path(w).name for w in workdirs]
    return names if len(set(names)) == len(names) else [str(w) for w in workdirs]


def figure(workdirs, labels=None):
    """A matplotlib Figure: loss (top) and learning rate (bottom) against step, one colour a run.

    Per-step training loss is drawn thin and faint; the eval's train loss dashed and its val
    loss solid, with markers.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("matplotlib"):
            raise
        raise UserError('plotting needs matplotlib: pip install -e ".[plot]"') from None

    runs = [read_metrics(w) for w in workdirs]  # read all first: a bad path fails before drawing
    labels = labels or _labels(workdirs)
    fig = Figure(figsize=(7, 5), layout="tight")
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for i, (m, label) in enumerate(zip(runs, labels)):
        color = f"C{i}"
        ev, tr = m["eval"], m["train"]
        if tr["step"]:
            ax_loss.plot(tr["step"], tr["loss"], color=color, alpha=0.25, lw=0.8,
                         label=f"{label}: train loss (per step)")
        if ev["step"]:
            ax_loss.plot(ev["step"], ev["train_loss"], "--", marker=".", color=color,
                         label=f"{label}: train loss (eval)")
            ax_loss.plot(ev["step"], ev["val_loss"], "-", marker="o", ms=3, color=color,
                         label=f"{label}: val loss")
        lr = tr if tr["step"] else ev  # the per-step lr where logged, else the eval's
        ax_lr.plot(lr["step"], lr["lr"], color=color, label=label)
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=7)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig


def save(workdirs, out=None, dpi: int = 80) -> epath.Path:
    """Draw `workdirs` and write the PNG (default: loss.png in the first workdir)."""
    out = as_path(out) if out else as_path(workdirs[0]) / "loss.png"
    fig = figure(workdirs)
    png = io.BytesIO()  # matplotlib writes local files only: the bytes go through epath
    fig.savefig(png, format="png", dpi=dpi)  # a pyplot-free Figure saves through Agg
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png.getvalue())
    return out


def main(argv):
    print(save(argv[1:], flags.FLAGS.out))


if __name__ == "__main__":
    define_flags()
    cli.run(main, positional=("WORKDIR...",))
