"""The lecture's exercise 2 (jaxgpt/addition.py): problems, the masked loss, the accuracy."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import addition as addition_config
from jaxgpt import addition, batches, datasets, training
from jaxgpt import step as step_lib
from jaxgpt.errors import UserError
from jaxgpt.model import GPT, GPTConfig
from jaxgpt.pretrained import load_run
from jaxgpt.tokenizer import CharTokenizer
from tests.conftest import optimized_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("digits", [1, 3])
def test_problems_are_correct_sums(digits, reverse):
    ids = np.random.default_rng(0).integers(0, 10 ** (2 * digits), 200)
    tok = CharTokenizer(addition.CHARS)
    for i, seq in zip(ids, np.asarray(addition.encode(jnp.asarray(ids), digits, reverse))):
        text = tok.decode(seq)  # e.g. "03+45=048"
        a, rest = text.split("+")
        b, c = rest.split("=")
        assert len(a) == len(b) == digits and len(c) == digits + 1
        if reverse:
            c = c[::-1]
        assert int(a) + int(b) == int(c)
        assert int(a) * 10**digits + int(b) == i


def test_held_out_problems_are_never_trained_on():
    train, val = addition.problem_ids(2, 500, seed=3)
    assert len(val) == 500 and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(10_000))


def test_masked_targets_do_not_count():
    """cross_entropy = a numpy mean of -log softmax over the targets that are not -1."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 8, 12)).astype(np.float32)
    seq = addition.encode(jnp.asarray(rng.integers(0, 10_000, 3)), 2, True)
    _, y = addition.inputs_targets(seq, 2)
    y = np.asarray(y)
    assert (y[:, :5] == -1).all() and (y[:, 5:] >= 0).all()  # a, +, b, = masked; c scored
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = y != -1
    want = -np.take_along_axis(logp, np.where(keep, y, 0)[..., None], -1)[..., 0][keep].mean()
    np.testing.assert_allclose(step_lib.cross_entropy(jnp.asarray(logits), jnp.asarray(y)), want,
                               rtol=1e-6)
    # and the logits at masked positions get no gradient
    grad = jax.grad(lambda l: step_lib.cross_entropy(l, jnp.asarray(y)))(jnp.asarray(logits))
    assert not np.any(np.asarray(grad)[:, :5]) and np.any(np.asarray(grad)[:, 5:])


def positional_answer_model(answer):
    """A GPT that ignores the problem: at position p it outputs `answer[p]` (a dict), else 0.

    Blocks write nothing (zero output projections), tokens embed to 0, position p embeds to the
    one-hot e_p, and the untied head maps e_p to the digit wanted there."""
    config = GPTConfig(block_size=5, vocab_size=12, n_layer=1, n_head=1, n_embd=8,
                       tie_weights=False)
    model = GPT(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32))["params"]
    params = jax.tree.map(np.array, params)
    params["wte"]["embedding"][:] = 0
    params["wpe"]["embedding"][:] = np.eye(5, 8)
    for p in (params["h_0"]["attn"]["c_proj"], params["h_0"]["mlp"]["c_proj"]):
        p["kernel"][:], p["bias"][:] = 0, 0
    head = np.zeros((8, 12), np.float32)
    for pos, digit in answer.items():
        head[pos, digit] = 10.0
    params["lm_head"]["kernel"] = head
    return model, params


@pytest.mark.parametrize("reverse", [False, True])
def test_accuracy_agrees_with_a_hand_count(reverse):
    """1-digit problems, prompt `a+b=` (positions 0-3): the model answers "1" then "0" for
    every problem. Written as is that is c = 10 (9 problems: 1+9 ... 9+1); reversed, c = 01
    (2 problems: 0+1, 1+0)."""
    model, params = positional_answer_model({3: 1, 4: 0})
    ids = np.arange(100)
    a, b = ids // 10, ids % 10
    want = np.mean(a + b == (1 if reverse else 10))
    assert want == (0.02 if reverse else 0.09)
    assert addition.accuracy(model, params, ids, 1, reverse) == pytest.approx(want)


def small(tmp_path, **overrides):
    c = addition_config.get_config()
    c.n_layer, c.n_embd, c.batch_size, c.eval_iters = 1, 16, 16, 2
    c.max_iters, c.eval_interval, c.steps_per_call, c.log_interval = 10, 5, 5, 5
    c.addition.eval_problems = 50
    for k, v in overrides.items():
        c[k] = v
    return c


def test_training_reports_held_out_accuracy(tmp_path, capsys):
    c = small(tmp_path)
    training.train(c, tmp_path)
    evals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 5, 10]
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in evals)
    out = capsys.readouterr()
    assert "step 10: train loss" in out.out + out.err and ", accuracy " in out.out + out.err


def test_batches_are_problems_with_masked_targets(tmp_path):
    c = small(tmp_path)
    s = training.setup(c)
    assert isinstance(s.batches, batches.DeviceBatches) and s.batches.draw is s.dataset.draw
    x, y = s.batches.train_batch(s.batches.train_data(0, 1), 0, jax.random.PRNGKey(0))
    assert x.shape == y.shape == (1, 16, 8)  # (A, B, T)
    x, y = np.asarray(x[0]), np.asarray(y[0])
    a, b = x[:, 0] * 10 + x[:, 1], x[:, 3] * 10 + x[:, 4]
    c_digits = np.concatenate([x[:, 6:8], y[:, -1:]], axis=1)  # reversed: units first
    assert ((c_digits * [1, 10, 100]).sum(1) == a + b).all()


def test_bad_addition_settings_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="digits=4"):
        datasets.load(small(tmp_path, addition={"digits": 4, "reverse": True,
                                                    "eval_problems": 10}))
    with pytest.raises(UserError, match="block_size=5 is shorter"):
        datasets.load(small(tmp_path, block_size=5))


def greedy_sums(model, params, ids, digits: int) -> np.ndarray:
    """c of each problem, decoded greedily one digit at a time by full forward passes (no
    sampling code), reversed back to a number."""
    seq = np.asarray(addition.encode(jnp.asarray(ids), digits, True))[:, :2 * digits + 2]
    forward = jax.jit(model.apply)
    for _ in range(digits + 1):  # `a+b=` then c's digits, units first
        logits = forward({"params": params}, jnp.asarray(seq))  # (N, T, 12)
        seq = np.concatenate([seq, np.asarray(logits[:, -1].argmax(-1))[:, None]], axis=1)
    c = seq[:, 2 * digits + 2:]  # (N, digits+1), least significant first
    return (c * 10 ** np.arange(digits + 1)).sum(1)


def test_learns_to_add_the_held_out_problems(tmp_path):
    """configs/addition.py with 600 steps instead of 2000 and batches of 128 instead of 64 (same
    2-layer, 64-wide model, learning rate 3e-3) gets >= 95 % of the 500 held-out problems
    (5 % of the 10,000 two-digit problems, never trained on) exactly right.

    Measured on 2 CPU cores: ~17 s idle, ~40 s shared with other jobs. Seeds 0-5 and the
    default (1337) reached 99.8-100 % at step 600 (38-100 % at step 300), so 95 % leaves a
    margin. Checked by decoding outside the training loop, against Python's own sums. Trained
    by train.py compiled at XLA's default optimisation: 600 steps are mostly run time.
    """
    c = addition_config.get_config()
    c.max_iters, c.batch_size, c.learning_rate, c.min_lr = 600, 128, 3e-3, 3e-4
    c.warmup_iters, c.eval_interval, c.log_interval, c.steps_per_call = 50, 600, 100, 100
    overrides = [f"--config.{k}={c[k]}" for k in ("max_iters", "batch_size", "learning_rate",
                 "min_lr", "warmup_iters", "eval_interval", "log_interval", "steps_per_call")]
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/addition.py",
                        "--workdir", str(tmp_path), *overrides], cwd=ROOT, env=optimized_env(),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    reported = [e["accuracy"] for e in evals if e["event"] == "eval"][-1]
    run = load_run(tmp_path, "latest")
    _, held_out = addition.problem_ids(2, 500, c.seed)
    assert len(held_out) == 500 and len(held_out) / 10_000 == 0.05
    right = greedy_sums(run.model, run.params, held_out, 2) == held_out // 100 + held_out % 100
    assert right.mean() == pytest.approx(reported)  # the eval line's number is this one
    assert right.mean() >= 0.95, f"{right.mean():.3f} of the held-out problems right"
