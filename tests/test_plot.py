"""jaxgpt.plot: the curves drawn are the numbers in metrics.jsonl; the CLI writes a real PNG;
workdirs are read through etils.epath (a local path or gs://)."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from etils import epath

pytest.importorskip("matplotlib")
from matplotlib.image import imread

from jaxgpt import plot
from jaxgpt.errors import UserError
from jaxgpt.training import train
from tests.conftest import tiny

ROOT = Path(__file__).resolve().parent.parent


def run_plot(*args):
    """`python -m jaxgpt.plot ARGS` as a user types it."""
    return subprocess.run([sys.executable, "-m", "jaxgpt.plot", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(r):
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


def write_metrics(workdir, seed):
    """A metrics.jsonl in train.py's format with random numbers; returns them by field."""
    rng = np.random.default_rng(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    ev = {"step": [0, 10, 20], "train_loss": rng.uniform(1, 4, 3).tolist(),
          "val_loss": rng.uniform(1, 4, 3).tolist(), "lr": rng.uniform(0, 1e-3, 3).tolist()}
    tr = {"step": list(range(0, 20, 2)), "loss": rng.uniform(1, 4, 10).tolist(),
          "lr": rng.uniform(0, 1e-3, 10).tolist()}
    lines = []
    for i, s in enumerate(tr["step"]):
        if s % 10 == 0:
            j = s // 10
            lines.append({"event": "eval", "step": s, "train_loss": ev["train_loss"][j],
                          "val_loss": ev["val_loss"][j], "lr": ev["lr"][j]})
        lines.append({"event": "train", "step": s, "loss": tr["loss"][i], "grad_norm": 1.0,
                      "lr": tr["lr"][i], "step_ms": 5.0, "tokens_per_sec": 1e4})
    lines.append({"event": "eval", "step": 20, "train_loss": ev["train_loss"][2],
                  "val_loss": ev["val_loss"][2], "lr": ev["lr"][2]})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return ev, tr


def lines_by_label(ax):
    return {line.get_label(): np.asarray(line.get_xydata()) for line in ax.get_lines()}


def test_figure_draws_the_files_numbers_one_colour_per_run(tmp_path):
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    (ev_a, tr_a), (ev_b, tr_b) = write_metrics(a, 0), write_metrics(b, 1)
    fig = plot.figure([a, b])
    ax_loss, ax_lr = fig.axes
    loss, lr = lines_by_label(ax_loss), lines_by_label(ax_lr)
    for name, ev, tr in (("run_a", ev_a, tr_a), ("run_b", ev_b, tr_b)):
        np.testing.assert_array_equal(loss[f"{name}: val loss"], np.c_[ev["step"], ev["val_loss"]])
        np.testing.assert_array_equal(loss[f"{name}: train loss (eval)"],
                                      np.c_[ev["step"], ev["train_loss"]])
        np.testing.assert_array_equal(loss[f"{name}: train loss (per step)"],
                                      np.c_[tr["step"], tr["loss"]])
        np.testing.assert_array_equal(lr[name], np.c_[tr["step"], tr["lr"]])
    colours = {line.get_label().split(":")[0]: line.get_color() for line in ax_loss.get_lines()}
    assert colours["run_a"] != colours["run_b"]
    assert {t.get_text() for t in ax_loss.get_legend().get_texts()} == set(loss)


def test_cli_writes_a_png_into_the_first_workdir(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_metrics(a, 0), write_metrics(b, 1)
    r = run_plot(a, b)
    assert r.returncode == 0, r.stderr
    out = a / "loss.png"
    assert r.stdout.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(out)  # decodes: a real image, not just a header
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0  # something drawn on it
    r = run_plot(a, "--out", tmp_path / "pics" / "x.png")
    assert r.returncode == 0, r.stderr
    assert imread(tmp_path / "pics" / "x.png").shape == image.shape


def test_cli_needs_a_workdir():
    r = run_plot()
    assert_one_line_error(r)
    assert "expected WORKDIR..." in r.stderr


def test_plots_a_real_training_run(tmp_path, text_file):
    workdir = tmp_path / "run"
    train(tiny(text_file, max_iters=10, eval_interval=5, log_interval=2), workdir)
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 5, 10]
    loss = lines_by_label(plot.figure([workdir]).axes[0])
    np.testing.assert_array_equal(loss["run: val loss"],
                                  [[e["step"], e["val_loss"]] for e in evals])


def test_cut_lines_are_skipped_with_one_warning(tmp_path, capsys):
    """A line cut short by a write that never finished (a disk that filled) with the next
    run's record glued onto it, and a cut last line: the rest is drawn, with one warning."""
    ev, tr = write_metrics(tmp_path, seed=2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(lines[i])["step"] for i in (2, 3)] == [2, 4]  # two train records
    damaged = lines[:2] + [lines[2][:30] + lines[3]] + lines[4:] + [lines[-1][:25]]
    (tmp_path / "metrics.jsonl").write_text("\n".join(damaged))
    m = plot.read_metrics(tmp_path)
    assert m["eval"] == ev
    kept = [i for i, s in enumerate(tr["step"]) if s not in (2, 4)]
    assert m["train"] == {k: [v[i] for i in kept] for k, v in tr.items()}
    assert capsys.readouterr().err.count("skipped 2 lines of") == 1
    loss = lines_by_label(plot.figure([tmp_path]).axes[0])
    np.testing.assert_array_equal(loss[f"{tmp_path.name}: val loss"][:, 1], ev["val_loss"])


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_missing_or_empty_metrics_is_one_line(tmp_path, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(UserError, match="metrics.jsonl"):
        plot.read_metrics(tmp_path)
    r = run_plot(tmp_path)
    assert_one_line_error(r)
    assert "metrics.jsonl" in r.stderr
    assert not (tmp_path / "loss.png").exists()


def test_missing_matplotlib_is_a_user_error(tmp_path, monkeypatch):
    write_metrics(tmp_path, 0)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import -> ModuleNotFoundError
    with pytest.raises(UserError, match=r"needs matplotlib: pip install"):
        plot.figure([tmp_path])


def test_workdir_as_str_or_epath(tmp_path):
    ev, _ = write_metrics(tmp_path / "run", 0)
    for workdir in (str(tmp_path / "run"), epath.Path(tmp_path / "run")):
        assert plot.read_metrics(workdir)["eval"]["val_loss"] == ev["val_loss"]
    out = plot.save([epath.Path(tmp_path / "run")])
    assert isinstance(out, epath.Path) and out == epath.Path(tmp_path / "run" / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reads_and_writes_a_gcs_workdir(gcs):
    workdir = epath.Path("gs://test-bucket/plot/run")
    ev, _ = write_metrics(workdir, 0)
    assert plot.read_metrics("gs://test-bucket/plot/run")["eval"]["val_loss"] == ev["val_loss"]
    out = plot.save(["gs://test-bucket/plot/run"])
    assert str(out) == "gs://test-bucket/plot/run/loss.png"
    assert "plot/run/loss.png" in gcs.objects("plot/")
    image = imread(io.BytesIO(out.read_bytes()))
    assert image.ndim == 3 and image[..., :3].std() > 0
    assert not Path("gs:").exists()  # nothing went to a local directory named gs:


# ---------------------------------------------------------------------------------------------
# --attention: heat maps of a trained model's heads


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny trained char-level workdirs, 2 and 4 heads, on the same text."""
    from tests.conftest import synthetic_text

    root = tmp_path_factory.mktemp("attention")
    (root / "input.txt").write_text(synthetic_text(20000))
    runs = {}
    for n_head in (2, 4):
        runs[n_head] = root / f"heads{n_head}"
        train(tiny(root / "input.txt", n_head=n_head, max_iters=4, eval_interval=2,
                   steps_per_call=2), runs[n_head])
    return runs


def test_attention_draws_attention_maps(trained):
    from jaxgpt.pretrained import load_run

    text = "the cat sat on a mat.\n"  # 22 characters: clipped to block_size=16, the last kept
    maps, labels, layers = plot.attention(trained[4], text)
    run = load_run(trained[4])
    ids = run.tokenizer.encode(text[-16:])
    np.testing.assert_array_equal(maps, plot.attention_maps(run.model, run.params,
                                                            np.asarray(ids)))
    assert maps.shape == (2, 4, 16, 16) and layers == [0, 1]
    assert labels == [c.replace(" ", "\u00b7").replace("\n", "\\n") for c in text[-16:]]
    one, _, layers = plot.attention(trained[4], text, layer=1)
    assert layers == [1]
    np.testing.assert_array_equal(one, maps[1:])
    fig = plot.attention_figure(maps, labels, [0, 1])
    drawn = [ax for ax in fig.axes if ax.get_images()][: 2 * 4]
    for i, ax in enumerate(drawn):  # row-major: layer i // 4, head i % 4
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), maps[i // 4, i % 4])
        assert [t.get_text() for t in ax.get_xticklabels()] == labels


def test_attention_cli_writes_a_png_that_grows_with_heads(trained, tmp_path):
    sizes = {}
    for n_head, workdir in trained.items():
        r = run_plot(workdir, "--attention", "the dog ran home.")
        assert r.returncode == 0, r.stderr
        out = workdir / "attention.png"
        assert r.stdout.strip() == str(out)
        sizes[n_head] = imread(out).shape
        assert imread(out)[..., :3].std() > 0
    assert sizes[4][1] > sizes[2][1]  # wider: one column per head
    assert sizes[4][0] == sizes[2][0]  # as tall: one row per layer, both have 2
    r = run_plot(trained[2], "--attention", "the dog", "--layer", "1", "--out",
                 tmp_path / "one.png")
    assert r.returncode == 0, r.stderr
    assert imread(tmp_path / "one.png").shape[0] < sizes[2][0]  # one row of maps, not two


@pytest.mark.parametrize("args, message", [
    (["--attention", "the cat \u00e9"], "outside the vocabulary"),
    (["--attention", ""], "--attention is empty"),
    (["--attention", "the", "--layer", "2"], "--layer=2"),
    (["--layer", "0"], "--layer needs --attention"),
])
def test_attention_bad_input_is_one_line(trained, args, message):
    r = run_plot(trained[2], *args)
    assert_one_line_error(r)
    assert message in r.stderr


def test_bpe_tick_labels_are_decoded_tokens():
    from jaxgpt.tokenizer import BPETokenizer
    from tests.conftest import byte_encoding

    tokenizer = BPETokenizer(byte_encoding())  # byte-level: one token a byte
    ids = tokenizer.encode("hi there\n")
    assert plot.token_labels(tokenizer, ids) == ["h", "i", "\u00b7", "t", "h", "e", "r", "e",
                                                 "\\n"]
