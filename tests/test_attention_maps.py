"""plot.attention_maps: the softmax weights every head puts on the past, against an independent
numpy forward pass (LayerNorm, q k^T / sqrt(hs), causal mask, softmax, residuals, ReLU MLP) over
the params; asking for them changes no logits, and sampling and remat are unaffected."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import sampling
from jaxgpt.errors import UserError
from jaxgpt.model import GPT, BigramLanguageModel, GPTConfig
from jaxgpt.plot import attention_maps

CFG = GPTConfig(block_size=12, vocab_size=23, n_layer=2, n_head=3, n_embd=24, bias=True,
                activation="relu", dtype="float32")
T = 9


def np_layer_norm(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def np_linear(x, p):
    return x @ p["kernel"] + p.get("bias", 0.0)


def np_qkv(attn, x, config):
    """q, k, v (nh, T, hs) of x (T, C): fused c_attn (q | k | v) or one key/query/value per head."""
    if config.attention == "fused":
        q, k, v = np.split(np_linear(x, attn["c_attn"]), 3, axis=-1)  # 3 x (T, C)
        return (t.reshape(T, config.n_head, -1).transpose(1, 0, 2) for t in (q, k, v))
    heads = [attn[f"heads_{h}"] for h in range(config.n_head)]
    return (np.stack([x @ h[name]["kernel"] for h in heads]) for name in ("query", "key", "value"))


def np_maps(params, idx, config):
    """(n_layer, nh, T, T) weights of the GPT in numpy, with the residual stream carried on."""
    p = jax.tree.map(np.asarray, params)
    x = p["wte"]["embedding"][idx] + p["wpe"]["embedding"][:T]  # (T, C)
    out = []
    for i in range(config.n_layer):
        b = p[f"h_{i}"]
        q, k, v = np_qkv(b["attn"], np_layer_norm(x, b["ln_1"]), config)  # (nh, T, hs) each
        wei = q @ k.transpose(0, 2, 1) / np.sqrt(config.head_size)  # (nh, T, T)
        wei = np.where(np.tril(np.ones((T, T), bool)), wei, -np.inf)
        wei = np.exp(wei - wei.max(-1, keepdims=True))
        wei /= wei.sum(-1, keepdims=True)  # (nh, T, T)
        out.append(wei)
        y = (wei @ v).transpose(1, 0, 2).reshape(T, -1)  # (T, C) heads side by side
        x = x + np_linear(y, b["attn"]["c_proj"])
        h = np.maximum(np_linear(np_layer_norm(x, b["ln_2"]), b["mlp"]["c_fc"]), 0.0)
        x = x + np_linear(h, b["mlp"]["c_proj"])
    return np.stack(out)  # (n_layer, nh, T, T)


def model_and_params(**changes):
    model = GPT(dataclasses.replace(CFG, **changes))
    idx = jax.random.randint(jax.random.PRNGKey(1), (T,), 0, CFG.vocab_size)
    params = model.init(jax.random.PRNGKey(0), idx[None])["params"]
    # trained-looking attention: init-scale weights give nearly uniform rows, which a wrong
    # scale or mask would match too
    params = jax.tree.map(lambda w: w * 8.0 if w.ndim == 2 and w.shape[0] == CFG.n_embd else w,
                          params)
    return model, params, idx


@pytest.mark.parametrize("changes", [{}, {"attention": "heads"}, {"attention_impl": "xla"},
                                     {"remat": True}],
                         ids=["fused", "heads", "xla", "remat"])
def test_maps_are_the_softmax_of_scaled_masked_affinities(changes):
    model, params, idx = model_and_params(**changes)
    maps = np.asarray(attention_maps(model, params, idx))
    assert maps.shape == (CFG.n_layer, CFG.n_head, T, T)
    np.testing.assert_allclose(maps, np_maps(params, np.asarray(idx), model.config),
                               atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)  # each row a distribution
    assert (maps[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0).all()
    assert maps[..., 1:, :].max() > 0.5  # not uniform: the test can tell wrong weights apart


def test_heads_and_fused_give_the_same_maps():
    from jaxgpt.convert import fused

    model, params, idx = model_and_params(attention="heads")
    fused_model, fused_params = fused(model, params)
    np.testing.assert_allclose(attention_maps(model, params, idx),
                               attention_maps(fused_model, fused_params, idx), atol=1e-6)


@pytest.mark.parametrize("attention", ["fused", "heads"])
def test_asking_for_the_weights_changes_no_logits(attention):
    model, params, idx = model_and_params(attention=attention)
    plain = model.apply({"params": params}, idx[None])
    logits, state = model.apply({"params": params}, idx[None], mutable=["intermediates"])
    np.testing.assert_array_equal(plain, logits)
    assert jax.tree.leaves(state["intermediates"])  # the weights were stored
    # without `mutable`, nothing is: apply returns the logits alone, as before
    assert isinstance(plain, jax.Array) and plain.shape == (1, T, CFG.vocab_size)


def test_cached_and_uncached_sampling_still_agree():
    model, params, idx = model_and_params()
    key = jax.random.PRNGKey(3)
    cached = sampling.generate(model, params, idx[None, :3], 5, rng=key, temperature=0.0)
    uncached = sampling.generate_uncached(model, params, idx[None, :3], 5, rng=key,
                                           temperature=0.0)
    np.testing.assert_array_equal(cached, uncached)


def test_bigram_has_no_attention_maps():
    model = BigramLanguageModel(CFG)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32))["params"]
    with pytest.raises(UserError, match="bigram"):
        attention_maps(model, params, jnp.zeros(3, jnp.int32))
