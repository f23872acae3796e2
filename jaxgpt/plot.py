"""Pictures of a run: train/val loss and learning rate against step, from WORKDIR/metrics.jsonl.

    python -m jaxgpt.plot WORKDIR [WORKDIR ...] [--out PNG]

Several workdirs are overlaid, one colour each, labelled by their directory name. The PNG goes
to `loss.png` in the first workdir unless `--out` names another path. Needs matplotlib
(`pip install -e ".[plot]"`).
"""

import argparse
import json
import sys
from pathlib import Path

from jaxgpt.errors import UserError


def read_metrics(workdir) -> dict:
    """{"eval": {...}, "train": {...}}: each a dict of equal-length lists, one per field.

    eval: step, train_loss, val_loss, lr (every eval_interval); train: step, loss, lr (every
    log_interval). A resumed run repeats no step, so the lists are in step order as written.
    """
    path = Path(workdir) / "metrics.jsonl"
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
    names = [Path(w).resolve().name for w in workdirs]
    return names if len(set(names)) == len(names) else [str(w) for w in workdirs]


def figure(workdirs, labels=None):
    """A matplotlib Figure: loss (top) and learning rate (bottom) against step, one colour a run.

    Per-step training loss is drawn thin and faint; the eval's train loss dashed and its val
    loss solid, with markers.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

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


def save(workdirs, out=None, dpi: int = 80) -> Path:
    """Draw `workdirs` and write the PNG (default: loss.png in the first workdir)."""
    out = Path(out) if out else Path(workdirs[0]) / "loss.png"
    fig = figure(workdirs)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)  # a pyplot-free Figure saves through the Agg canvas
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt.plot", description=__doc__.split("\n")[0])
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
    parser.add_argument("--out", help="the PNG to write (default: WORKDIR/loss.png, first one)")
    args = parser.parse_args(argv)
    try:
        print(save(args.workdirs, args.out))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("matplotlib"):
            raise
        print('error: plotting needs matplotlib: pip install -e ".[plot]"', file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
