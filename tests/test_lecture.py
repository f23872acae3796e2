"""The lecture's notes on attention, one test each, on jaxgpt's own modules.

Each compares the module with an independent computation (numpy, a loop, the same weights
without a mask) so that breaking the claim in model.py fails the test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.model import (
    GPT,
    Block,
    CausalSelfAttention,
    FeedForward,
    GPTConfig,
    Head,
    MultiHeadAttention,
    weighted_average,
)

CFG = GPTConfig(block_size=8, vocab_size=19, n_layer=2, n_head=2, n_embd=16)
MIXERS = [Head, MultiHeadAttention, CausalSelfAttention, Block]  # modules that mix positions


def init(module, x, seed=0):
    return module.init(jax.random.PRNGKey(seed), x)


def forward(module, variables, x):
    """The module's output; Block and CausalSelfAttention return (y, cache): y."""
    out = module.apply(variables, x)
    return out[0] if isinstance(out, tuple) else out


def normal(seed, shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def np_softmax(a):
    a = np.exp(a - a.max(-1, keepdims=True))
    return a / a.sum(-1, keepdims=True)


def np_head(p, x, masked=True):
    """The lecture's Head.forward in numpy, from a Head's params; masked=False deletes the
    masking line (an encoder block)."""
    k, q, v = (np.asarray(x) @ np.asarray(p[n]["kernel"]) for n in ("key", "query", "value"))
    wei = q @ np.swapaxes(k, -1, -2) * k.shape[-1] ** -0.5  # (B, T, T)
    if masked:
        T = x.shape[-2]
        wei = np.where(np.tril(np.ones((T, T))) == 0, -np.inf, wei)
    return np_softmax(wei) @ v  # (B, T, hs)


def test_the_four_versions_of_the_trick_agree():
    """Loop, matmul, softmax, and a Head whose queries are zero (equal affinities) with values
    that copy their input: four ways to average each token with its past."""
    B, T, C = 3, 8, 16
    x = np.asarray(normal(0, (B, T, C)))
    xbow = np.zeros_like(x)  # version 1
    for b in range(B):
        for t in range(T):
            xbow[b, t] = x[b, : t + 1].mean(0)
    wei = np.tril(np.ones((T, T)))  # version 2
    xbow2 = (wei / wei.sum(1, keepdims=True)) @ x
    xbow3 = np_softmax(np.where(np.tril(np.ones((T, T))) == 0, -np.inf, 0.0)) @ x  # version 3
    cfg = GPTConfig(block_size=T, vocab_size=5, n_layer=1, n_head=1, n_embd=C)
    p = jax.tree.map(np.asarray, init(Head(cfg), x)["params"])
    p["query"]["kernel"] = np.zeros((C, C), np.float32)  # every affinity equal
    p["value"]["kernel"] = np.eye(C, dtype=np.float32)  # the value is the token itself
    xbow4 = Head(cfg).apply({"params": p}, x)
    for other in (xbow2, xbow3, weighted_average(x), xbow4):
        np.testing.assert_allclose(other, xbow, rtol=1e-5, atol=1e-6)


def readout_head(hs, T, batch, seed):
    """A Head (2 heads' worth of width, so head_size is hs, not C) whose output *is* its
    attention matrix: each token carries a one-hot of its position, read out by the value;
    q and k see only the other, N(0, 1) features, and have unit variance."""
    C = 2 * hs
    cfg = GPTConfig(block_size=T, vocab_size=5, n_layer=1, n_head=2, n_embd=C)
    rng = np.random.default_rng(seed)
    x = np.zeros((batch, T, C), np.float32)
    x[:, :, :T] = np.eye(T)  # (B, T, T) one-hot positions
    x[:, :, T:] = rng.standard_normal((batch, T, C - T))
    w = {n: np.zeros((C, hs), np.float32) for n in ("key", "query", "value")}
    w["key"][T:] = rng.standard_normal((C - T, hs)) / np.sqrt(C - T)
    w["query"][T:] = rng.standard_normal((C - T, hs)) / np.sqrt(C - T)
    w["value"][:T, :T] = np.eye(T)  # value of token s = one-hot(s)
    params = {n: {"kernel": k} for n, k in w.items()}
    return Head(cfg), params, x


def test_without_the_scale_softmax_saturates_as_heads_grow():
    """q @ k.T has variance head_size; Head's head_size ** -0.5 brings it back to 1, so its
    attention stays diffuse at any head size. Unscaled, the rows converge to one-hot."""
    T, batch = 8, 64
    causal = np.tril(np.ones((T, T))) == 1
    rows = slice(T // 2, T)  # rows with at least T/2 + 1 choices
    peak_scaled, peak_raw = [], []
    for hs in (16, 64, 256):
        head, params, x = readout_head(hs, T, batch, seed=hs)
        wei = np.asarray(head.apply({"params": params}, x))[..., :T]  # (B, T, T) Head's own
        np.testing.assert_allclose(wei.sum(-1), 1.0, rtol=1e-5)  # it is the attention matrix
        q, k = x @ params["query"]["kernel"], x @ params["key"]["kernel"]  # (B, T, hs)
        raw = q @ np.swapaxes(k, -1, -2)  # (B, T, T) unscaled affinities
        assert 0.6 < q.var() < 1.5 and 0.6 < k.var() < 1.5
        assert 0.5 * hs < raw[:, causal].var() < 1.5 * hs  # the variance grows with head size
        assert 0.5 < (raw * hs**-0.5)[:, causal].var() < 1.5  # scaled: back to ~1
        raw_wei = np_softmax(np.where(causal, raw, -np.inf))
        peak_scaled.append(wei[:, rows].max(-1).mean())
        peak_raw.append(raw_wei[:, rows].max(-1).mean())
    assert peak_raw[0] < peak_raw[1] < peak_raw[2] and peak_raw[2] > 0.9  # saturates
    assert max(peak_scaled) < 0.7 and max(peak_scaled) - min(peak_scaled) < 0.1  # does not


@pytest.mark.parametrize("module", MIXERS)
def test_attention_has_no_notion_of_space(module):
    """Shuffle the tokens before the last: without position embeddings the last position's
    output does not change (attention reads its past as a set)."""
    x = normal(1, (2, 8, CFG.n_embd))
    variables = init(module(CFG), x)
    perm = np.array([3, 0, 6, 1, 5, 2, 4, 7])  # tokens 0..6 shuffled, the last kept
    out, shuffled = forward(module(CFG), variables, x), forward(module(CFG), variables, x[:, perm])
    np.testing.assert_allclose(shuffled[:, -1], out[:, -1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(shuffled[:, 3], out[:, 3], atol=1e-3)  # the shuffled ones do move


def test_an_encoder_without_positions_is_permutation_equivariant():
    """Without the mask, shuffling the input shuffles the output the same way."""
    x = np.asarray(normal(2, (2, 8, CFG.n_embd)))
    p = init(Head(CFG), x)["params"]
    perm = np.random.default_rng(0).permutation(8)
    np.testing.assert_allclose(np_head(p, x[:, perm], masked=False),
                               np_head(p, x, masked=False)[:, perm], rtol=1e-5, atol=1e-5)


def test_position_embeddings_give_the_gpt_a_notion_of_space():
    """One layer: the last position reads its past as a set unless wpe says where each token
    is. (With more causal layers the earlier positions' own outputs depend on the order.)"""
    model = GPT(GPTConfig(**{**CFG.__dict__, "n_layer": 1}))
    idx = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 0, CFG.vocab_size)
    variables = init(model, idx)
    perm = np.array([3, 0, 6, 1, 5, 2, 4, 7])
    out, shuffled = model.apply(variables, idx), model.apply(variables, idx[:, perm])
    assert not np.allclose(shuffled[:, -1], out[:, -1], atol=1e-4)
    zero_wpe = jax.tree.map(lambda a: a, variables)
    zero_wpe["params"]["wpe"]["embedding"] = jnp.zeros_like(variables["params"]["wpe"]["embedding"])
    np.testing.assert_allclose(model.apply(zero_wpe, idx[:, perm])[:, -1],
                               model.apply(zero_wpe, idx)[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", MIXERS + [FeedForward, GPT])
def test_batch_elements_never_talk(module):
    """Replacing example 1 of a batch changes nothing in example 0."""
    if module is GPT:
        x = jax.random.randint(jax.random.PRNGKey(4), (3, 8), 0, CFG.vocab_size)
        other = x.at[1].set((x[1] + 1) % CFG.vocab_size)
    else:
        x = normal(4, (3, 8, CFG.n_embd))
        other = x.at[1].set(normal(5, (8, CFG.n_embd)))
    variables = init(module(CFG), x)
    out, out_other = forward(module(CFG), variables, x), forward(module(CFG), variables, other)
    np.testing.assert_array_equal(out_other[0], out[0])
    np.testing.assert_array_equal(out_other[2], out[2])
    assert not np.allclose(out_other[1], out[1])


def test_decoder_mask_blocks_the_future_an_encoder_does_not():
    """Head is the decoder: changing token t+1 leaves outputs 0..t alone. The same weights
    without the masking line (an encoder block) let every output see token t+1."""
    x = np.asarray(normal(6, (2, 8, CFG.n_embd)))
    p = init(Head(CFG), x)["params"]
    out = Head(CFG).apply({"params": p}, x)
    np.testing.assert_allclose(out, np_head(p, x, masked=True), rtol=1e-5, atol=1e-5)
    for t in (0, 3, 6):
        changed = x.copy()
        changed[:, t + 1] = np.asarray(normal(7 + t, (2, CFG.n_embd)))
        new = Head(CFG).apply({"params": p}, changed)
        np.testing.assert_allclose(new[:, : t + 1], out[:, : t + 1], rtol=1e-5, atol=1e-6)
        assert not np.allclose(new[:, t + 1], out[:, t + 1])
        enc, enc_changed = np_head(p, x, masked=False), np_head(p, changed, masked=False)
        assert not np.allclose(enc_changed[:, : t + 1], enc[:, : t + 1], atol=1e-4)


def test_multi_head_is_heads_side_by_side_projected():
    """MultiHeadAttention = torch.cat([h(x) for h in heads], -1), then the projection."""
    x = normal(8, (2, 8, CFG.n_embd))
    p = init(MultiHeadAttention(CFG), x)["params"]
    heads = [np_head(p[f"heads_{i}"], x) for i in range(CFG.n_head)]  # (B, T, hs) each
    proj = p["c_proj"]
    want = np.concatenate(heads, -1) @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"])
    np.testing.assert_allclose(MultiHeadAttention(CFG).apply({"params": p}, x), want,
                               rtol=1e-5, atol=1e-5)


def test_feed_forward_is_per_token():
    """The computation after the communication: each position on its own."""
    x = normal(9, (2, 8, CFG.n_embd))
    variables = init(FeedForward(CFG), x)
    whole = FeedForward(CFG).apply(variables, x)
    for t in range(8):
        np.testing.assert_allclose(FeedForward(CFG).apply(variables, x[:, t : t + 1])[:, 0],
                                   whole[:, t], rtol=1e-5, atol=1e-6)


def test_blocks_are_residual():
    """x = x + sa(ln1(x)); x = x + ffwd(ln2(x)): with both output projections zeroed, a Block
    is the identity (the residual path), and the projections are all it adds."""
    x = normal(10, (2, 8, CFG.n_embd))
    params = init(Block(CFG), x)["params"]

    def zero_projections(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        return jnp.zeros_like(leaf) if "c_proj" in names else leaf

    zeroed = jax.tree_util.tree_map_with_path(zero_projections, params)
    np.testing.assert_array_equal(forward(Block(CFG), {"params": zeroed}, x), x)
    assert not np.allclose(forward(Block(CFG), {"params": params}, x), x)
