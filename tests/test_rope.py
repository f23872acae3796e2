"""Rotary positions (position="rope") and the rolling KV cache they allow past block_size,
against a numpy forward of the whole sequence with a banded causal mask of width block_size."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import sampling, training
from jaxgpt.convert import fused
from jaxgpt.errors import UserError
from jaxgpt.model import GPT, GPTConfig
from jaxgpt.sampling import decode, init_cache
from tests.conftest import tiny

CFG = GPTConfig(block_size=8, vocab_size=13, n_layer=2, n_head=2, n_embd=16, activation="relu",
                position="rope")


def numpy_rope(x, positions):
    """RoPE as complex numbers: channel pair (i, i + hs/2) is x_i + 1j x_{i+hs/2}, multiplied
    by exp(1j * position * 10000^(-2i/hs))."""
    half = x.shape[-1] // 2
    theta = 10000.0 ** (-np.arange(half) * 2 / x.shape[-1])
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[:, None] * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def numpy_forward(params, idx, config, band):
    """The fused rope GPT over idx (B, L), any L, each query seeing the last `band` positions."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    B, L = idx.shape
    nh, C = config.n_head, config.n_embd
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    mask = (j <= i) & (j > i - band)  # (L, L) causal, width `band`

    def norm(x, q):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * q["scale"] + q["bias"]

    dense = lambda x, q: x @ q["kernel"] + q["bias"]  # noqa: E731
    x = p["wte"]["embedding"][idx]  # (B, L, C): no position embedding
    for n in range(config.n_layer):
        h = p[f"h_{n}"]
        qkv = dense(norm(x, h["ln_1"]), h["attn"]["c_attn"])
        q, k, v = (t.reshape(B, L, nh, C // nh).transpose(0, 2, 1, 3)
                   for t in np.split(qkv, 3, axis=-1))
        q, k = numpy_rope(q, np.arange(L)), numpy_rope(k, np.arange(L))
        att = np.where(mask, q @ k.transpose(0, 1, 3, 2) / np.sqrt(C // nh), -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        y = (att / att.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3).reshape(B, L, C)
        x = x + dense(y, h["attn"]["c_proj"])
        x = x + dense(np.maximum(dense(norm(x, h["ln_2"]), h["mlp"]["c_fc"]), 0),
                      h["mlp"]["c_proj"])
    return norm(x, p["ln_f"]) @ p["wte"]["embedding"].T  # (B, L, V)


def init(config, seed=0):
    params = GPT(config).init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    # larger weights than GPT-2's init: decisive logits, so greedy choices have clear margins
    return jax.tree.map(lambda a: a * 8 if a.ndim == 2 else a, params)


def test_rope_forward_is_the_numpy_one():
    params = init(CFG)
    idx = np.random.default_rng(0).integers(0, 13, (2, 8))
    np.testing.assert_allclose(GPT(CFG).apply({"params": params}, idx),
                               numpy_forward(params, idx, CFG, band=8), atol=2e-4, rtol=2e-4)


def test_rope_scores_depend_on_relative_positions_only():
    """q at m, k at n score as q at m + s, k at n + s: the premise of the rolling cache."""
    from jaxgpt.attention import rope

    q, k = np.random.default_rng(0).normal(size=(2, 1, 16)).astype(np.float32)
    score = lambda m, n: float(rope(q, jnp.array([m]))[0] @ rope(k, jnp.array([n]))[0])  # noqa
    assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
    assert "wpe" not in init(CFG)  # no position table at all


@pytest.mark.parametrize("prompt_len", [1, 5, 8])
def test_rolling_cache_is_sliding_window_attention(prompt_len):
    """Past block_size (3 windows), against a full numpy forward of the whole sequence with a
    banded causal mask of width block_size: generate's greedy tokens are its argmax, and the
    cached decode's logits, one token at a time into the ring, are its logits."""
    params, model, S = init(CFG), GPT(CFG), CFG.block_size
    rng = np.random.default_rng(prompt_len)
    prompt = rng.integers(0, 13, (2, prompt_len))
    out = np.asarray(sampling.generate(model, params, prompt, 3 * S, rng=jax.random.PRNGKey(0),
                                       temperature=0.0))  # (2, P + 3S)
    L = out.shape[1]
    want = numpy_forward(params, out, CFG, band=S)  # (2, L, V)
    np.testing.assert_array_equal(out[:, prompt_len:], want[:, prompt_len - 1:L - 1].argmax(-1))
    # a random model's greedy text soon repeats one token; sampled text varies: token i is
    # drawn with fold_in(key, i) from the banded forward's logits
    key = jax.random.PRNGKey(7)
    out = np.asarray(sampling.generate(model, params, prompt, 3 * S, rng=key, temperature=1.0))
    assert len(np.unique(out[:, prompt_len:])) > 3
    want = numpy_forward(params, out, CFG, band=S)
    for i in range(3 * S):
        tok = sampling.sample_token(jnp.asarray(want[:, prompt_len - 1 + i], jnp.float32),
                                    jax.random.fold_in(key, i),
                                    sampling.as_settings(1.0, None, None))
        np.testing.assert_array_equal(out[:, prompt_len + i], tok)

    seq = rng.integers(0, 13, (2, L))  # varied tokens: every logit depends on the window
    want = numpy_forward(params, seq, CFG, band=S)
    step = jax.jit(lambda p, tok, cache, pos: decode(model, p, tok, cache, pos))
    logits, cache = decode(model, params, seq[:, :prompt_len], init_cache(model, 2), 0)
    got = [logits]
    for t in range(prompt_len, L):
        logits, cache = step(params, seq[:, t:t + 1], cache, t)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=5e-4, rtol=5e-4)
    unbanded = numpy_forward(params, seq, CFG, band=L)  # the band matters past the window
    assert np.abs(unbanded[:, S:] - want[:, S:]).max() > 1e-2


def test_heads_with_rope_equal_fused():
    """The lecture's Head rotates q and k the same way: the heads model equals its fused form."""
    config = dataclasses.replace(CFG, attention="heads")
    model = GPT(config)
    params = model.init(jax.random.PRNGKey(2), jnp.zeros((1, 8), jnp.int32))["params"]
    idx = np.random.default_rng(3).integers(0, 13, (2, 8))
    fmodel, fparams = fused(model, params)
    np.testing.assert_allclose(model.apply({"params": params}, idx),
                               fmodel.apply({"params": fparams}, idx), atol=1e-5, rtol=1e-5)


def test_learned_positions_keep_the_exact_window():
    """position=learned past block_size: nanoGPT's re-run of the cropped window, not the ring."""
    config = dataclasses.replace(CFG, position="learned")
    model = GPT(config)
    params = init(config)
    out = np.asarray(sampling.generate(model, params, np.array([[1]]), 20,
                                       rng=jax.random.PRNGKey(0), temperature=0.0))
    forward = jax.jit(model.apply)  # one compile per context length, not one per op
    for t in range(1, 21):  # each new token: argmax of a forward of the last 8 tokens
        context = out[:, max(0, t - 8):t]
        logits = forward({"params": params}, context)[:, -1]
        assert int(np.argmax(logits)) == out[0, t]


def test_rope_trains(text_file, tmp_path):
    c = tiny(text_file, position="rope", max_iters=10)
    state = training.train(c, tmp_path)
    assert "wpe" not in state.params


def test_rope_needs_an_even_head_size():
    with pytest.raises(UserError, match="must be even"):
        GPTConfig(n_embd=12, n_head=4, position="rope")
    with pytest.raises(UserError, match="position"):
        GPTConfig(position="alibi")
