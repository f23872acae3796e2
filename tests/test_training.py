"""The training loop: it learns, it is reproducible, it logs, and it fails clearly."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt import batches, datasets, optim, pretrained, training
from jaxgpt import step as step_lib
from jaxgpt.errors import UserError
from jaxgpt.model import make_model
from jaxgpt.parallel import make_mesh
from tests.conftest import tiny
from tests.test_optim import nanogpt_get_lr

ROOT = Path(__file__).resolve().parents[1]


def _events(workdir, kind):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def test_a_few_steps_learn_a_repeated_text(tmp_path):
    path = tmp_path / "rep.txt"
    path.write_text("hello world! " * 400)
    c = tiny(path, max_iters=30, eval_interval=30, learning_rate=1e-2)
    training.train(c, tmp_path / "run")
    evals = _events(tmp_path / "run", "eval")
    assert [e["step"] for e in evals] == [0, 30]
    assert evals[0]["val_loss"] > math.log(9) - 0.3  # ~uniform over 9 chars at init
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"]


def test_same_seed_same_losses_whatever_steps_per_call(tmp_path, text_file):
    """With dropout (the most randomness a step draws): the same seed gives the same losses
    bit for bit, another seed others, and k steps in one scanned call are the same k steps as
    k separate calls."""
    def losses(name, **overrides):
        training.train(tiny(text_file, max_iters=6, dropout=0.1, **overrides), tmp_path / name)
        return [e["loss"] for e in _events(tmp_path / name, "train")]

    a = losses("a", steps_per_call=3)
    assert len(a) == 6 and losses("b", steps_per_call=3) == a
    assert losses("c", steps_per_call=3, seed=7) != a
    np.testing.assert_allclose(losses("d", steps_per_call=1), a, rtol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(dropout=0.1, gradient_accumulation_steps=2)])
def test_losses_equal_a_loop_written_out(tmp_path, text_file, overrides):
    """train() gives, for the same seed, the losses of a plain loop spelled out here: the seed
    split into init and run keys, step s's batch and dropout keys from fold_in(run key, s), the
    lecture's get_batch, the mean of A micro-batch gradients, one optax update. A change to the
    randomness, the data order, the loss or the update fails it."""
    c = tiny(text_file, max_iters=6, **overrides)
    training.train(c, tmp_path)
    got = [e["loss"] for e in _events(tmp_path, "train")]

    dataset = datasets.load(c)
    model = make_model(c, dataset.tokenizer.vocab_size)
    init_rng, run_rng = jax.random.split(jax.random.PRNGKey(c.seed))
    params = model.init(init_rng, jnp.zeros((1, c.block_size), jnp.int32))["params"]
    tx = optim.make_optimizer(c)
    opt_state = tx.init(params)
    A, B = c.gradient_accumulation_steps, c.batch_size

    def loss(p, x, y, key):
        logits = model.apply({"params": p}, x, deterministic=False, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit  # compiled once: op by op, this loop took most of the test's time
    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    grad_fn = jax.jit(jax.value_and_grad(loss))
    want = []
    for step in range(c.max_iters):
        data_key, dropout_key = jax.random.split(jax.random.fold_in(run_rng, step))
        x, y = batches.get_batch(jnp.asarray(dataset.train), data_key, A * B, c.block_size)
        keys = jax.random.split(dropout_key, A)
        outs = [grad_fn(params, x[a * B:(a + 1) * B], y[a * B:(a + 1) * B], keys[a])
                for a in range(A)]
        grads = jax.tree.map(lambda *g: sum(g) / A, *[g for _, g in outs])
        params, opt_state = update(grads, opt_state, params)
        want.append(float(np.mean([v for v, _ in outs])))
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_metrics_jsonl_has_the_contracted_keys_and_nanogpts_lr(tmp_path, text_file, capsys):
    """One run of nanoGPT's loop: the contracted keys, an eval every eval_interval and after
    the last step, a train line per step, the logged lr = nanoGPT's get_lr, nanoGPT's
    parameter count printed, the final state kept."""
    c = tiny(text_file, max_iters=20, warmup_iters=4, lr_decay_iters=None, steps_per_call=4)
    state = training.train(c, tmp_path)
    train, evals = _events(tmp_path, "train"), _events(tmp_path, "eval")
    assert {"step", "loss", "lr", "step_ms", "tokens_per_sec"} <= train[0].keys()
    assert {"step", "train_loss", "val_loss"} <= evals[0].keys()
    assert [e["step"] for e in evals] == [0, 10, 20]
    assert [e["step"] for e in train] == list(range(20)) and int(state.step) == 20
    for e in train + evals:
        want = nanogpt_get_lr(e["step"], c.learning_rate, 4, 20, c.min_lr)  # decay: max_iters
        assert e["lr"] == pytest.approx(want, rel=1e-5)
    out = capsys.readouterr()
    assert "number of parameters: 0.03M (devices" in out.out + out.err
    assert pretrained.load_run(tmp_path, "latest").step == 20


def test_train_step_is_optax_on_jax_grad(text_file):
    """train_step's update equals optax applied by hand to jax.grad of the loss."""
    c = tiny(text_file, grad_clip=0.0)
    model = make_model(c, vocab_size=20)
    state = step_lib.create_train_state(c, model, make_mesh(c))
    x = jax.random.randint(jax.random.PRNGKey(0), (1, 4, 16), 0, 20)
    y = jnp.roll(x, -1, axis=-1)
    key = jax.random.PRNGKey(1)
    def loss(params):  # loss_fn returns (scaled loss, loss): float32 has no scaling
        return step_lib.loss_fn(params, state.apply_fn, x[0], y[0], jax.random.split(key, 1)[0])[1]

    grads = jax.jit(jax.grad(loss))(state.params)
    want = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
    got, metrics = jax.jit(step_lib.train_step)(state, (x, y), key)
    for a, b in zip(jax.tree.leaves(got.opt_state), jax.tree.leaves(want.opt_state)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)  # Adam's moments: linear in g
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        # the first Adam step is lr * g / (|g| + eps): where |g| ~ eps, float noise shows
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert int(got.step) == 1 and np.isfinite(metrics["loss"])


def test_nan_loss_stops_with_advice(tmp_path, text_file):
    c = tiny(text_file, learning_rate=1e9, grad_clip=0.0, warmup_iters=0, max_iters=20)
    with pytest.raises(UserError, match="diverged.*learning_rate"):
        training.train(c, tmp_path)


def test_bad_values_fail_before_compiling(tmp_path, text_file):
    with pytest.raises(UserError, match="attention"):
        training.train(tiny(text_file, attention="flash"), tmp_path)
    with pytest.raises(UserError, match="not divisible"):
        training.train(tiny(text_file, n_embd=30), tmp_path)
    with pytest.raises(UserError, match="batch_size"):
        training.train(tiny(text_file, batch_size=0), tmp_path)


def _cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_rejects_misspelled_and_mistyped_overrides(tmp_path):
    r = _cli("--config", "configs/shakespeare_cpu.py", "--workdir", str(tmp_path),
             "--config.n_embed=64")
    assert r.returncode != 0 and "n_embed" in r.stderr and "Traceback" not in r.stderr
    r = _cli("--config", "configs/shakespeare_cpu.py", "--workdir", str(tmp_path),
             "--config.n_layer=four")
    assert r.returncode != 0 and "n_layer" in r.stderr and "Traceback" not in r.stderr


def test_cli_missing_data_is_one_line(tmp_path):
    r = _cli("--config", "configs/shakespeare_cpu.py", "--workdir", str(tmp_path),
             f"--config.data_path={tmp_path}/missing.txt")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: config.data_path=")


def test_cli_trains(tmp_path, text_file):
    r = _cli("--config", "configs/shakespeare_cpu.py", "--workdir", str(tmp_path),
             f"--config.data_path={text_file}", "--config.max_iters=4", "--config.eval_iters=2",
             "--config.n_layer=1", "--config.block_size=16", "--config.batch_size=4")
    assert r.returncode == 0, r.stderr
    assert "step 4: train loss" in r.stdout + r.stderr
    assert "number of parameters" in r.stdout + r.stderr
