"""The lecture's claims about the model, one test each."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shakespeare
from jaxgpt.errors import UserError
from jaxgpt.model import (
    GPT,
    BigramLanguageModel,
    Block,
    CausalSelfAttention,
    FeedForward,
    GPTConfig,
    Head,
    MultiHeadAttention,
    count_params,
    make_model,
    weighted_average,
)

CFG = GPTConfig(block_size=16, vocab_size=23, n_layer=2, n_head=4, n_embd=32)


def _init(module, x, seed=0):
    return module.init(jax.random.PRNGKey(seed), x)


def test_weighted_average_equals_the_lectures_loop():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 3))  # (B, T, C)
    xbow = np.zeros(x.shape)  # version 1 of the lecture: a loop over the past
    for b in range(2):
        for t in range(7):
            xbow[b, t] = np.asarray(x[b, : t + 1]).mean(0)
    np.testing.assert_allclose(weighted_average(x), xbow, rtol=1e-5, atol=1e-6)


def test_head_is_softmax_of_scaled_affinities():
    """Head against a numpy transcription of the lecture's Head.forward."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, CFG.n_embd))
    head = Head(CFG)
    variables = _init(head, x)
    p = {k: np.asarray(v["kernel"]) for k, v in variables["params"].items()}
    xn = np.asarray(x)
    k, q, v = xn @ p["key"], xn @ p["query"], xn @ p["value"]  # (B, T, hs)
    wei = q @ k.transpose(0, 2, 1) * CFG.head_size**-0.5  # (B, T, T)
    wei = np.where(np.tril(np.ones((5, 5))) == 0, -np.inf, wei)
    wei = np.exp(wei - wei.max(-1, keepdims=True))
    wei /= wei.sum(-1, keepdims=True)
    np.testing.assert_allclose(head.apply(variables, x), wei @ v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", [Head, MultiHeadAttention, CausalSelfAttention,
                                    FeedForward, Block])
def test_module_shapes(module):
    x = jnp.ones((3, 7, CFG.n_embd))
    variables = _init(module(CFG), x)
    out = jax.jit(module(CFG).apply)(variables, x)
    if module in (CausalSelfAttention, Block):  # the layers that carry the KV cache
        out, cache = out  # (y, cache): training passes no cache and gets none back
        assert cache is None
    width = CFG.head_size if module is Head else CFG.n_embd
    chex.assert_shape(out, (3, 7, width))
    chex.assert_tree_all_finite(out)


ATTENTION_VARIANTS = [dict(attention="fused"), dict(attention="heads"),
                      dict(attention="fused", attention_impl="xla")]


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_gpt_is_causal(variant):
    """Changing token t+1 never changes the logits at positions <= t."""
    cfg = GPTConfig(**{**CFG.__dict__, **variant})
    model = GPT(cfg)
    idx = jax.random.randint(jax.random.PRNGKey(2), (2, cfg.block_size), 0, cfg.vocab_size)
    params = _init(model, idx)
    logits = model.apply(params, idx)
    chex.assert_shape(logits, (2, cfg.block_size, cfg.vocab_size))
    for t in (0, 5, cfg.block_size - 2):
        changed = idx.at[:, t + 1].set((idx[:, t + 1] + 1) % cfg.vocab_size)
        new = model.apply(params, changed)
        np.testing.assert_allclose(new[:, : t + 1], logits[:, : t + 1], rtol=1e-5, atol=1e-5)
        assert not np.allclose(new[:, t + 1], logits[:, t + 1])  # and the future does see it


def test_fused_heads_equal_multi_head_attention():
    """The lecture's exercise 1: all heads in one (C, 3C) matmul is the same computation."""
    cfg = GPTConfig(**{**CFG.__dict__, "bias": False})
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 9, cfg.n_embd))
    mha = _init(MultiHeadAttention(cfg), x)["params"]
    cols = {name: np.concatenate([mha[f"heads_{h}"][name]["kernel"] for h in range(cfg.n_head)],
                                 axis=1) for name in ("query", "key", "value")}  # (C, C) each
    fused = {"c_attn": {"kernel": np.concatenate([cols["query"], cols["key"], cols["value"]],
                                                 axis=1)},  # (C, 3C)
             "c_proj": mha["c_proj"]}
    want = MultiHeadAttention(cfg).apply({"params": mha}, x)
    got, _ = CausalSelfAttention(cfg).apply({"params": fused}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fused_kernel_equals_explicit_softmax():
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 9, CFG.n_embd))
    variables = _init(CausalSelfAttention(CFG), x)
    xla = GPTConfig(**{**CFG.__dict__, "attention_impl": "xla"})
    np.testing.assert_allclose(CausalSelfAttention(xla).apply(variables, x)[0],
                               CausalSelfAttention(CFG).apply(variables, x)[0], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("model", ["gpt", "bigram"])
def test_loss_at_init_is_about_ln_vocab(model):
    """At init every token is about equally likely: loss ~ -ln(1/vocab) (the lecture's check)."""
    from jaxgpt.config import base_config
    from jaxgpt.step import cross_entropy
    c = base_config()
    c.update(model=model, block_size=32, n_layer=2, n_head=2, n_embd=32)
    m = make_model(c, vocab_size=65)
    idx = jax.random.randint(jax.random.PRNGKey(5), (8, 33), 0, 65)
    params = _init(m, idx[:, :-1])
    loss = float(cross_entropy(m.apply(params, idx[:, :-1]), idx[:, 1:]))
    # GPT's 0.02 init gives near-uniform logits; the bigram's N(0, 1) table adds ~0.5 (lecture)
    assert abs(loss - math.log(65)) < (0.1 if model == "gpt" else 1.0)


def test_dropout_only_when_not_deterministic():
    cfg = GPTConfig(**{**CFG.__dict__, "dropout": 0.5})
    model = GPT(cfg)
    idx = jnp.zeros((2, 8), jnp.int32)
    params = _init(model, idx)
    a = model.apply(params, idx, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    b = model.apply(params, idx, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply(params, idx), model.apply(params, idx))


def test_bigram_reads_logits_off_the_table():
    model = BigramLanguageModel(CFG)
    idx = jnp.array([[3, 1, 4]])
    params = _init(model, idx)
    table = params["params"]["token_embedding_table"]["embedding"]
    np.testing.assert_array_equal(model.apply(params, idx)[0], table[np.array([3, 1, 4])])


def test_parameter_count_matches_nanogpt():
    """configs/shakespeare.py: 12C^2 + 2C per block (no biases), V*C tied embedding, ln_f."""
    c = shakespeare.get_config()
    model = make_model(c, vocab_size=65)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    C, L, V = c.n_embd, c.n_layer, 65
    assert count_params(shapes["params"]) == L * (12 * C * C + 2 * C) + V * C + C
    assert f"{count_params(shapes['params']) / 1e6:.2f}" == "10.65"  # nanoGPT's printout


def test_residual_projections_have_scaled_init():
    params = _init(GPT(CFG), jnp.zeros((1, 8), jnp.int32))["params"]
    std_proj = float(np.std(params["h_0"]["mlp"]["c_proj"]["kernel"]))
    std_fc = float(np.std(params["h_0"]["mlp"]["c_fc"]["kernel"]))
    assert abs(std_fc - 0.02) < 0.003
    assert abs(std_proj - 0.02 / math.sqrt(2 * CFG.n_layer)) < 0.002


def test_too_long_input_is_a_clear_error():
    model = GPT(CFG)
    params = _init(model, jnp.zeros((1, CFG.block_size), jnp.int32))
    with pytest.raises(UserError, match="block_size is only 16"):
        model.apply(params, jnp.zeros((1, CFG.block_size + 1), jnp.int32))


def test_indivisible_heads_fail_at_config_time():
    with pytest.raises(UserError, match="not divisible"):
        GPTConfig(n_embd=30, n_head=4)
