"""The attention implementations (`config.attention_impl`): the fused kernel
(jax.nn.dot_product_attention: XLA here, cuDNN on GPUs) computes the lecture's masked softmax,
forward and backward; attention dropout takes the explicit path; cuDNN asks for a GPU."""

import jax
import numpy as np
import pytest

from jaxgpt import config as config_lib
from jaxgpt.errors import UserError
from jaxgpt.model import GPT, CausalSelfAttention, GPTConfig
from tests.conftest import tiny

CFG = GPTConfig(block_size=16, vocab_size=23, n_layer=2, n_head=4, n_embd=32)


def _model_pair(dtype="float32", dropout=0.0, **kw):
    base = dict(block_size=16, vocab_size=23, n_layer=2, n_head=4, n_embd=32, dtype=dtype,
                dropout=dropout, **kw)
    a, b = GPT(GPTConfig(attention_impl="softmax", **base)), GPT(GPTConfig(attention_impl="xla",
                                                                        **base))
    idx = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 23)  # (B, T)
    params = jax.jit(a.init)(jax.random.PRNGKey(1), idx)["params"]  # one compile, not op by op
    return a, b, params, idx


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("bfloat16", 0.05)])
def test_dot_product_attention_matches_explicit_softmax(dtype, atol):
    """jax.nn.dot_product_attention (XLA here, cuDNN on GPUs) = the lecture's masked softmax,
    forward and backward (bf16: both round q, k, v and the output to bf16)."""
    a, b, params, idx = _model_pair(dtype)
    np.testing.assert_allclose(jax.jit(b.apply)({"params": params}, idx),
                               jax.jit(a.apply)({"params": params}, idx), atol=atol)

    def grads(model):
        return jax.jit(jax.grad(lambda p: model.apply({"params": p}, idx).sum()))(params)

    for ga, gb in zip(jax.tree.leaves(grads(a)), jax.tree.leaves(grads(b))):
        np.testing.assert_allclose(gb, ga, atol=atol * 10, rtol=1e-3 if dtype == "float32" else 0.1)


def test_fused_kernel_equals_explicit_softmax():
    """One CausalSelfAttention layer, the same weights, both implementations."""
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 9, CFG.n_embd))
    variables = CausalSelfAttention(CFG).init(jax.random.PRNGKey(0), x)
    xla = GPTConfig(**{**CFG.__dict__, "attention_impl": "xla"})
    np.testing.assert_allclose(CausalSelfAttention(xla).apply(variables, x)[0],
                               CausalSelfAttention(CFG).apply(variables, x)[0], rtol=1e-5,
                               atol=1e-5)


def test_fused_attention_falls_back_to_softmax_with_dropout():
    """The fused kernel has no attention dropout: training with dropout > 0 takes the explicit
    path, so both impls give the same dropped-out logits for the same rng."""
    a, b, params, idx = _model_pair(dropout=0.1)
    rngs = {"dropout": jax.random.PRNGKey(2)}
    out_a = a.apply({"params": params}, idx, deterministic=False, rngs=rngs)
    out_b = b.apply({"params": params}, idx, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(out_a, out_b)


def test_cudnn_attention_needs_a_gpu():
    with pytest.raises(UserError, match="attention_impl='cudnn' needs a GPU"):
        config_lib.validate(tiny(attention_impl="cudnn", dtype="bfloat16"))
