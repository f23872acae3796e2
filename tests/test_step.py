"""jaxgpt.step, the compiled side: gradient accumulation, remat, the scanned call of several
steps, the eval losses; each against an independent computation (one big batch, the same model
without remat, steps called one by one, a numpy cross-entropy). float16's loss scale:
test_dtype.py; the step against optax on jax.grad: test_training.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import batches, parallel
from jaxgpt import step as step_lib
from jaxgpt.model import GPT, GPTConfig, make_model
from tests.conftest import fresh_state, tiny


def np_cross_entropy(logits, targets) -> float:
    """Mean -log softmax(logits)[target], in float64 numpy."""
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, np.asarray(targets)[..., None], -1).mean())


def test_gradient_accumulation_k_by_b_equals_one_batch_of_k_times_b(tiny_config):
    """nanoGPT's semantics: 4 micro-batches of 2 step exactly like one batch of 8."""
    dataset, _, _, state = fresh_state(tiny_config)
    x, y = batches.get_batch(jnp.asarray(dataset.train), jax.random.PRNGKey(0), 8, 16)  # (8, T)
    step = jax.jit(step_lib.train_step)
    key = jax.random.PRNGKey(1)
    big, big_m = step(state, (x[None], y[None]), key)  # (1, 8, T)
    acc, acc_m = step(state, (x.reshape(4, 2, 16), y.reshape(4, 2, 16)), key)  # (4, 2, T)
    np.testing.assert_allclose(acc_m["loss"], big_m["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc_m["grad_norm"], big_m["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_remat_gives_the_same_grads():
    base = dict(block_size=16, vocab_size=23, n_layer=2, n_head=4, n_embd=32)
    plain, remat = GPT(GPTConfig(**base)), GPT(GPTConfig(remat=True, **base))
    idx = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 23)  # (B, T)
    params = plain.init(jax.random.PRNGKey(1), idx)["params"]

    def grads(model):
        loss = lambda p: step_lib.cross_entropy(model.apply({"params": p}, idx), idx)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    for g1, g2 in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat))):
        np.testing.assert_allclose(g2, g1, atol=1e-6)


def test_one_call_of_n_steps_is_n_steps_each_with_its_own_keys(text_file):
    """train_steps scans train_step; step s draws its batch and its dropout from
    fold_in(root, s), so the steps of one call are the steps called one by one."""
    config = tiny(text_file, n_layer=1, n_head=2, n_embd=16, block_size=8,
                  dropout=0.1)  # the dropout keys matter too
    dataset, _, _, state = fresh_state(config)
    data = jnp.asarray(dataset.train)

    def train_batch(data, i, key):
        x, y = batches.get_batch(data, key, 4, 8)  # (B, T)
        return x[None], y[None]  # (1, B, T)

    scanned, metrics = jax.jit(functools.partial(
        step_lib.train_steps, train_batch=train_batch, num_steps=3))(state, data)
    one = jax.jit(step_lib.train_step)
    losses = []
    for _ in range(3):
        data_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        state, m = one(state, train_batch(data, 0, data_key), dropout_key)
        losses.append(float(m["loss"]))
    assert int(scanned.step) == int(state.step) == 3
    np.testing.assert_allclose(metrics["loss"], losses, rtol=1e-5)
    assert len(set(losses)) == 3  # three different batches
    for a, b in zip(jax.tree.leaves(scanned.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_eval_loss_is_the_mean_over_its_batches_without_dropout():
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8,
                          dropout=0.5))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    data = jnp.asarray(np.random.default_rng(0).integers(0, 11, 200), jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)

    def eval_batch(data, i, key):
        return batches.get_batch(data, key, 4, 8)  # (B, T) each

    got = step_lib.jit_eval_loss(model.apply, eval_batch)(params, data, keys)
    want = []
    for key in keys:
        x, y = jax.jit(eval_batch)(data, 0, key)
        logits = jax.jit(model.apply)({"params": params}, x)  # deterministic by default
        want.append(np_cross_entropy(logits, y))
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)


def test_heldout_loss_is_the_mean_over_every_window():
    """heldout_loss (bench's figure) = a numpy cross-entropy averaged over each
    non-overlapping window."""
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    tokens = np.random.default_rng(0).integers(0, 11, 8 * 5 + 3)  # 5 windows, a ragged tail
    losses = []
    for w in range(5):
        x, y = tokens[8 * w:8 * w + 8], tokens[8 * w + 1:8 * w + 9]
        logits = np.asarray(model.apply({"params": params}, x[None]))[0].astype(np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        losses.append(-logp[np.arange(8), y].mean())
    np.testing.assert_allclose(step_lib.heldout_loss(model, params, tokens, 8, batch_size=2),
                               np.mean(losses), rtol=1e-5)


def test_the_init_at_llvm_o1_is_the_init_at_the_default_level(monkeypatch):
    """A CPU compiles the state's init at -O1 (init_compiler_options): the same state, bit for
    bit, as XLA's default -O2 gives (one layer of the lecture's per-head model; the fused GPT
    with Muon's state)."""
    monkeypatch.setenv("XLA_FLAGS", "")  # as a run outside the suite (which sets -O0)
    for overrides in ({"attention": "heads", "n_layer": 1}, {"optimizer": "muon", "n_layer": 1}):
        c = tiny(**overrides)
        model = make_model(c, vocab_size=40)
        mesh = parallel.make_mesh(c)
        assert step_lib.init_compiler_options(mesh) == {"xla_backend_optimization_level": 1}
        init, keys = step_lib._init_fn(c, model)
        lowered = jax.jit(init).lower(*keys)
        states = [lowered.compile({"xla_backend_optimization_level": level})(*keys)
                  for level in (1, 2)]
        for a, b in zip(*map(jax.tree.leaves, states)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
