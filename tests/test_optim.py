"""The optimizer against hand-computed numbers: nanoGPT's get_lr, the decay mask, AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.config import base_config
from jaxgpt.model import GPT, GPTConfig
from jaxgpt.optim import decay_mask, lr_schedule, make_optimizer


def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT's train.py get_lr, verbatim."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("it", [0, 1, 50, 99, 100, 101, 2550, 4999, 5000, 5001, 9000])
def test_schedule_matches_nanogpt(it):
    c = base_config()
    c.update(learning_rate=1e-3, warmup_iters=100, lr_decay_iters=5000, min_lr=1e-4)
    want = nanogpt_get_lr(it, 1e-3, 100, 5000, 1e-4)
    assert float(lr_schedule(c)(it)) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("it", [0, 1, 29, 30, 31, 49, 50, 51, 200])
def test_schedule_decaying_before_the_warmup_ends_is_nanogpts(it):
    """lr_decay_iters <= warmup_iters (a short run, max_iters below the warmup): nanoGPT warms
    up, then is past lr_decay_iters: min_lr."""
    c = base_config()
    c.update(learning_rate=1e-3, warmup_iters=50, lr_decay_iters=30, min_lr=1e-4)
    want = nanogpt_get_lr(it, 1e-3, 50, 30, 1e-4)
    assert float(lr_schedule(c)(it)) == pytest.approx(want, rel=1e-5)


def test_schedule_hand_values():
    c = base_config()
    c.update(learning_rate=1e-3, warmup_iters=100, lr_decay_iters=5000, min_lr=1e-4)
    s = lr_schedule(c)
    f32 = dict(rel=1e-5)  # the schedule computes in float32
    assert float(s(0)) == pytest.approx(1e-3 / 101, **f32)
    assert float(s(2550)) == pytest.approx((1e-3 + 1e-4) / 2, **f32)  # half way down the cosine
    assert float(s(10_000)) == pytest.approx(1e-4, **f32)
    c.decay_lr = False
    assert float(lr_schedule(c)(0)) == float(lr_schedule(c)(4000)) == pytest.approx(1e-3)


def test_lr_decay_iters_follows_max_iters_unless_set():
    c = base_config()
    c.update(learning_rate=1e-3, warmup_iters=10, max_iters=300, min_lr=1e-4)
    assert float(lr_schedule(c)(300)) == pytest.approx(1e-4, rel=1e-5)  # the end of max_iters
    assert float(lr_schedule(c)(155)) == pytest.approx(nanogpt_get_lr(155, 1e-3, 10, 300, 1e-4),
                                                       rel=1e-5)
    c.lr_decay_iters = 200
    assert c.max_iters == 300  # setting one never moves the other
    assert float(lr_schedule(c)(200)) == pytest.approx(1e-4, rel=1e-5)


def _params():
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8))
    return model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]


def test_decay_mask_is_nanogpts():
    mask = decay_mask(_params())
    flat = {"/".join(k.key for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["wte/embedding"] and flat["wpe/embedding"]
    assert flat["h_0/attn/c_attn/kernel"] and flat["h_0/mlp/c_proj/kernel"]
    assert not flat["h_0/attn/c_attn/bias"] and not flat["h_0/ln_1/scale"]
    assert not flat["ln_f/bias"] and not flat["ln_f/scale"]


def test_adamw_decays_only_the_masked_weights():
    """With zero gradients, Adam's step is 0 and only weight decay moves a parameter:
    p <- p - lr * wd * p for >= 2-D tensors, unchanged otherwise."""
    c = base_config()
    c.update(learning_rate=0.1, weight_decay=0.5, decay_lr=False, grad_clip=1.0)
    params = _params()
    tx = make_optimizer(c)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
        want = p * (1 - 0.1 * 0.5) if p.ndim >= 2 else p
        np.testing.assert_allclose(q, want, rtol=1e-6)


def test_gradients_are_clipped_to_grad_clip():
    c = base_config()
    c.update(learning_rate=1.0, weight_decay=0.0, decay_lr=False, grad_clip=0.5, beta1=0.0,
             beta2=0.0)
    params = {"w": jnp.zeros((2, 2))}
    tx = make_optimizer(c)
    grads = {"w": jnp.full((2, 2), 10.0)}  # global norm 20 -> clipped to 0.5
    clipped = optax.clip_by_global_norm(0.5).update(grads, None)[0]
    assert float(optax.tree.norm(clipped)) == pytest.approx(0.5)
    # with b1 = b2 = 0 Adam's step is g / (|g| + eps): the sign, whatever the scale
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -np.ones((2, 2)), rtol=1e-5)
