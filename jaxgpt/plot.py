"""Pictures of a run: train/val loss and learning rate against step, from WORKDIR/metrics.jsonl;
or where a trained model's heads look, on a text of your own.

    python -m jaxgpt.plot WORKDIR [WORKDIR ...] [--out PNG]
    python -m jaxgpt.plot WORKDIR --attention TEXT [--layer L] [--out PNG]

Loss: several workdirs are overlaid, one colour each, labelled by their directory name. The PNG
goes to `loss.png` in the first workdir unless `--out` names another path.

Attention: TEXT is encoded with the run's tokenizer (its last block_size tokens kept) and run
through the best checkpoint; each head's softmax weights (`model.attention_maps`) are drawn as a
heat map, row t the weights query token t puts on tokens 0..t: one row of maps per layer (only
layer L with --layer), one column per head, the tokens as tick labels. The PNG goes to
`attention.png` in the workdir unless `--out` names another path.

A workdir or `--out` may be a cloud URL (gs://bucket/run). Needs matplotlib
(`pip install -e ".[plot]"`).
"""

import dataclasses
import io

import jax
import jax.numpy as jnp
from absl import flags, logging
from etils import epath

from jaxgpt import cli, pretrained
from jaxgpt import metrics as metrics_lib
from jaxgpt import model as model_lib
from jaxgpt.errors import UserError
from jaxgpt.workdir import as_path


def define_flags() -> None:
    """The command line's flags: defined only when run as a command, so importing this
    module defines none (two commands' flags of the same name would clash)."""
    flags.DEFINE_string("out", None, "The PNG to write (default: loss.png in the first WORKDIR, "
                        "attention.png with --attention).")
    flags.DEFINE_string("attention", None, "Draw the attention weights of every head on this "
                        "text instead of the loss curves (one WORKDIR).")
    flags.DEFINE_integer("layer", None, "With --attention: only this layer (0-based; default: "
                         "every layer, one row each).")


def read_metrics(workdir) -> dict:
    """{"eval": {...}, "train": {...}}: each a dict of equal-length lists, one per field.

    eval: step, train_loss, val_loss, lr (every eval_interval); train: step, loss, lr (every
    log_interval). A resumed run repeats no step, so the lists are in step order as written.
    """
    path = as_path(workdir) / metrics_lib.METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass the --workdir of a train.py run")
    fields = {"eval": ("step", "train_loss", "val_loss", "lr"), "train": ("step", "loss", "lr")}
    out = {kind: {f: [] for f in names} for kind, names in fields.items()}
    for event in metrics_lib.read(workdir):  # a line cut short is skipped, with a warning
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


def _figure_class():
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("matplotlib"):
            raise
        raise UserError('plotting needs matplotlib: pip install -e ".[plot]"') from None
    return Figure


def figure(workdirs, labels=None):
    """A matplotlib Figure: loss (top) and learning rate (bottom) against step, one colour a run.

    Per-step training loss is drawn thin and faint; the eval's train loss dashed and its val
    loss solid, with markers.
    """
    Figure = _figure_class()
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


def _write_png(fig, out: epath.Path, dpi: int) -> epath.Path:
    png = io.BytesIO()  # matplotlib writes local files only: the bytes go through epath
    fig.savefig(png, format="png", dpi=dpi)  # a pyplot-free Figure saves through Agg
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png.getvalue())
    return out


def save(workdirs, out=None, dpi: int = 80) -> epath.Path:
    """Draw `workdirs` and write the PNG (default: loss.png in the first workdir)."""
    out = as_path(out) if out else as_path(workdirs[0]) / "loss.png"
    return _write_png(figure(workdirs), out, dpi)


# ---------------------------------------------------------------------------------------------
# Attention heat maps


def token_labels(tokenizer, ids) -> list[str]:
    """One tick label a token: its character (char-level) or its decoded text (BPE), with
    whitespace made visible (space as a middle dot, newline as \\n)."""
    texts = [tokenizer.decode([i]) for i in ids]
    return [t.replace(" ", "\u00b7").replace("\n", "\\n").replace("\t", "\\t") or "?"
            for t in texts]


def attention_maps(model, params, idx) -> jax.Array:
    """The softmax weights of every head of `model` (a GPT) on idx (T,) or (1, T) token ids:
    (n_layer, n_head, T, T) float32, row t the weights query t puts on keys 0..t.

    The attention modules `sow` their weights into the "intermediates" collection, stored only
    when asked for (`mutable=["intermediates"]`), so training and sampling keep none. The fused
    kernels (attention_impl "xla", "cudnn") compute no weights: the model is applied with the
    explicit softmax instead, the same function. A `heads` model's heads are stacked in order.
    """
    if not isinstance(model, model_lib.GPT):
        raise UserError("attention maps need a GPT: the bigram model has no attention")
    idx = jnp.asarray(idx).reshape(1, -1)  # (1, T)
    model = model_lib.GPT(dataclasses.replace(model.config, attention_impl="softmax"))
    _, state = model.apply({"params": params}, idx, mutable=["intermediates"])
    layers = [state["intermediates"][f"h_{i}"]["attn"] for i in range(model.config.n_layer)]
    if model.config.attention == "heads":  # one (1, T, T) per head
        maps = [jnp.stack([l[f"heads_{h}"]["attention"][0][0] for h in range(model.config.n_head)])
                for l in layers]  # n_layer x (nh, T, T)
    else:  # one (1, nh, T, T) per layer
        maps = [l["attention"][0][0] for l in layers]  # n_layer x (nh, T, T)
    return jnp.stack(maps).astype(jnp.float32)  # (n_layer, nh, T, T)


def attention(workdir, text: str, layer: int | None = None):
    """(maps, labels, layers) drawn for `text` on the best checkpoint of `workdir`: maps
    (len(layers), n_head, T, T) numpy float32 from `attention_maps`, T the text's tokens
    (its last block_size), labels one string a token, layers the layer indices shown."""
    import numpy as np

    if not text:
        raise UserError("--attention is empty: give the text to look at")
    run = pretrained.load_run(workdir)
    ids = run.tokenizer.encode(text)[-run.model.config.block_size:]  # one line if unknown chars
    n_layer = run.model.config.n_layer
    if layer is not None and not 0 <= layer < n_layer:
        raise UserError(f"--layer={layer}: the model has layers 0..{n_layer - 1}")
    maps = np.asarray(attention_maps(run.model, run.params, np.asarray(ids)))
    layers = list(range(n_layer)) if layer is None else [layer]
    return maps[layers], token_labels(run.tokenizer, ids), layers  # (L, nh, T, T)


def attention_figure(maps, labels, layers):
    """A Figure of heat maps (len(layers), n_head): row = layer, column = head, each (T, T)
    with the query tokens down the side and the key tokens along the bottom."""
    Figure = _figure_class()
    n_rows, n_cols, T = maps.shape[0], maps.shape[1], maps.shape[-1]
    cell = 1.2 + 0.16 * T  # inches a map: room for T tick labels
    fig = Figure(figsize=(n_cols * cell + 0.8, n_rows * cell + 0.4), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    rotation = 0 if max(map(len, labels)) <= 2 else 90  # characters upright, BPE words turned
    for r, l in enumerate(layers):
        for h in range(n_cols):
            ax = axes[r][h]
            image = ax.imshow(maps[r, h], vmin=0.0, vmax=1.0, cmap="viridis")  # (T, T)
            ax.set_title(f"layer {l} head {h}", fontsize=8)
            ax.set_xticks(range(T), labels, fontsize=7, rotation=rotation)
            ax.set_yticks(range(T), labels, fontsize=7)
        axes[r][0].set_ylabel("query", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("key", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    return fig


def save_attention(workdir, text: str, layer: int | None = None, out=None,
                   dpi: int = 80) -> epath.Path:
    """Draw the attention of `workdir`'s model on `text` and write the PNG (default:
    attention.png in the workdir)."""
    out = as_path(out) if out else as_path(workdir) / "attention.png"
    fig = attention_figure(*attention(workdir, text, layer))
    return _write_png(fig, out, dpi)


def main(argv):
    f = flags.FLAGS
    if f.attention is None:
        if f.layer is not None:
            raise UserError("--layer needs --attention TEXT")
        print(save(argv[1:], f.out))
    elif len(argv) != 2:
        raise UserError(f"--attention draws one WORKDIR (got {len(argv) - 1})")
    else:
        if not f["verbosity"].present:
            logging.set_verbosity(logging.ERROR)  # hide orbax's read-only notices
        print(save_attention(argv[1], f.attention, f.layer, f.out))


if __name__ == "__main__":
    define_flags()
    cli.run(main, positional=("WORKDIR...",))
