"""jaxgpt.model's contracts beyond the lecture's claims (test_lecture.py): every module's
shapes, every attention variant causal, nanoGPT's parameter count and scaled residual init, and
configuration errors. The attention implementations against each other: test_attention.py."""

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
    Block,
    CausalSelfAttention,
    FeedForward,
    GPTConfig,
    Head,
    MultiHeadAttention,
    count_params,
    make_model,
)

CFG = GPTConfig(block_size=16, vocab_size=23, n_layer=2, n_head=4, n_embd=32)


def _init(module, x, seed=0):
    return module.init(jax.random.PRNGKey(seed), x)

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

def test_lm_head_bias_needs_an_untied_head():
    with pytest.raises(UserError, match="tie_weights=False"):
        GPTConfig(**{**CFG.__dict__, "lm_head_bias": True})
