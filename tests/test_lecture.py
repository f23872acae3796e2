"""The lecture's claims, one test each, on jaxgpt's own modules, in the lecture's order; and
configs/lecture.py, which is the lecture's gpt.py itself.

Each compares the module with an independent computation (numpy, a loop, the same weights
without a mask, a numpy transcription of gpt.py) so that breaking the claim fails the test.
jaxgpt.model's other contracts (shapes, every attention variant causal, nanoGPT's init and
count, errors): test_model.py.
"""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import lecture, lecture_cpu
from jaxgpt import optim, pretrained, training
from jaxgpt.config import base_config, validate
from jaxgpt.convert import from_lecture
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
from jaxgpt.step import cross_entropy
from tests.conftest import tiny

CFG = GPTConfig(block_size=8, vocab_size=19, n_layer=2, n_head=2, n_embd=16)

MIXERS = [Head, MultiHeadAttention, CausalSelfAttention, Block]  # modules that mix positions


def init(module, x, seed=0):
    return jax.jit(module.init)(jax.random.PRNGKey(seed), x)  # one compile, not op by op

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


# ---------------------------------------------------------------------------------------------
# The bigram baseline


def test_bigram_reads_logits_off_the_table():
    model = BigramLanguageModel(CFG)
    idx = jnp.array([[3, 1, 4]])
    params = init(model, idx)
    table = params["params"]["token_embedding_table"]["embedding"]
    np.testing.assert_array_equal(model.apply(params, idx)[0], table[np.array([3, 1, 4])])

@pytest.mark.parametrize("model", ["gpt", "bigram"])
def test_loss_at_init_is_about_ln_vocab(model):
    """At init every token is about equally likely: loss ~ -ln(1/vocab) (the lecture's check)."""
    c = base_config()
    c.update(model=model, block_size=32, n_layer=2, n_head=2, n_embd=32)
    m = make_model(c, vocab_size=65)
    idx = jax.random.randint(jax.random.PRNGKey(5), (8, 33), 0, 65)
    params = init(m, idx[:, :-1])
    loss = float(cross_entropy(m.apply(params, idx[:, :-1]), idx[:, 1:]))
    # GPT's 0.02 init gives near-uniform logits; the bigram's N(0, 1) table adds ~0.5 (lecture)
    assert abs(loss - math.log(65)) < (0.1 if model == "gpt" else 1.0)


# ---------------------------------------------------------------------------------------------
# The mathematical trick: a weighted average of the past


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

def test_weighted_average_equals_the_lectures_loop():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 3))  # (B, T, C)
    xbow = np.zeros(x.shape)  # version 1 of the lecture: a loop over the past
    for b in range(2):
        for t in range(7):
            xbow[b, t] = np.asarray(x[b, : t + 1]).mean(0)
    np.testing.assert_allclose(weighted_average(x), xbow, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Self-attention: one head


def test_head_is_softmax_of_scaled_affinities():
    """Head against a numpy transcription of the lecture's Head.forward."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, CFG.n_embd))
    head = Head(CFG)
    variables = init(head, x)
    p = {k: np.asarray(v["kernel"]) for k, v in variables["params"].items()}
    xn = np.asarray(x)
    k, q, v = xn @ p["key"], xn @ p["query"], xn @ p["value"]  # (B, T, hs)
    wei = q @ k.transpose(0, 2, 1) * CFG.head_size**-0.5  # (B, T, T)
    wei = np.where(np.tril(np.ones((5, 5))) == 0, -np.inf, wei)
    wei = np.exp(wei - wei.max(-1, keepdims=True))
    wei /= wei.sum(-1, keepdims=True)
    np.testing.assert_allclose(head.apply(variables, x), wei @ v, rtol=1e-5, atol=1e-5)

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


# ---------------------------------------------------------------------------------------------
# Multi-head attention, feed-forward, residual blocks, dropout


def test_multi_head_is_heads_side_by_side_projected():
    """MultiHeadAttention = torch.cat([h(x) for h in heads], -1), then the projection."""
    x = normal(8, (2, 8, CFG.n_embd))
    p = init(MultiHeadAttention(CFG), x)["params"]
    heads = [np_head(p[f"heads_{i}"], x) for i in range(CFG.n_head)]  # (B, T, hs) each
    proj = p["c_proj"]
    want = np.concatenate(heads, -1) @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"])
    np.testing.assert_allclose(MultiHeadAttention(CFG).apply({"params": p}, x), want,
                               rtol=1e-5, atol=1e-5)

def test_fused_heads_equal_multi_head_attention():
    """The lecture's exercise 1: all heads in one (C, 3C) matmul is the same computation."""
    cfg = GPTConfig(**{**CFG.__dict__, "bias": False})
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 9, cfg.n_embd))
    mha = init(MultiHeadAttention(cfg), x)["params"]
    cols = {name: np.concatenate([mha[f"heads_{h}"][name]["kernel"] for h in range(cfg.n_head)],
                                 axis=1) for name in ("query", "key", "value")}  # (C, C) each
    fused = {"c_attn": {"kernel": np.concatenate([cols["query"], cols["key"], cols["value"]],
                                                 axis=1)},  # (C, 3C)
             "c_proj": mha["c_proj"]}
    want = MultiHeadAttention(cfg).apply({"params": mha}, x)
    got, _ = CausalSelfAttention(cfg).apply({"params": fused}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

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

def test_dropout_only_when_not_deterministic():
    cfg = GPTConfig(**{**CFG.__dict__, "dropout": 0.5})
    model = GPT(cfg)
    idx = jnp.zeros((2, 8), jnp.int32)
    params = init(model, idx)
    a = model.apply(params, idx, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    b = model.apply(params, idx, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply(params, idx), model.apply(params, idx))


# ---------------------------------------------------------------------------------------------
# configs/lecture.py is the lecture's gpt.py: its weights map onto the `heads` GPT and give
# gpt.py's logits (a numpy transcription of its modules), its parameter count, its init, its
# AdamW, its loop and its settings

SIZES = dict(vocab_size=11, block_size=8, n_embd=12, n_head=3, n_layer=2)


def lecture_state_dict(seed=0, vocab_size=11, block_size=8, n_embd=12, n_head=3, n_layer=2):
    """gpt.py's GPTLanguageModel().state_dict() naming and torch (out, in) layouts; random
    values (biases and LayerNorm affine parameters too, so each one's mapping is checked)."""
    rng = np.random.default_rng(seed)
    C, hs = n_embd, n_embd // n_head
    r = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)  # noqa: E731
    sd = {"token_embedding_table.weight": r(vocab_size, C),
          "position_embedding_table.weight": r(block_size, C),
          "ln_f.weight": 1 + r(C), "ln_f.bias": r(C),
          "lm_head.weight": r(vocab_size, C), "lm_head.bias": r(vocab_size)}
    for i in range(n_layer):
        b = f"blocks.{i}"
        for h in range(n_head):
            for name in ("key", "query", "value"):
                sd[f"{b}.sa.heads.{h}.{name}.weight"] = r(hs, C)
            sd[f"{b}.sa.heads.{h}.tril"] = np.tril(np.ones((block_size, block_size), np.float32))
        sd[f"{b}.sa.proj.weight"], sd[f"{b}.sa.proj.bias"] = r(C, C), r(C)
        sd[f"{b}.ffwd.net.0.weight"], sd[f"{b}.ffwd.net.0.bias"] = r(4 * C, C), r(4 * C)
        sd[f"{b}.ffwd.net.2.weight"], sd[f"{b}.ffwd.net.2.bias"] = r(C, 4 * C), r(C)
        for ln in ("ln1", "ln2"):
            sd[f"{b}.{ln}.weight"], sd[f"{b}.{ln}.bias"] = 1 + r(C), r(C)
    return sd

def lecture_forward(sd, idx, n_layer, n_head):
    """GPTLanguageModel.forward of gpt.py in numpy (eval mode: dropout is the identity)."""
    linear = lambda x, n: x @ sd[n + ".weight"].T + sd.get(n + ".bias", 0)  # noqa: E731

    def layer_norm(x, n):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * sd[n + ".weight"] + sd[n + ".bias"]

    def head(x, n):
        T = x.shape[1]
        k, q, v = (linear(x, f"{n}.{name}") for name in ("key", "query", "value"))
        wei = q @ k.transpose(0, 2, 1) * k.shape[-1] ** -0.5  # (B, T, T)
        wei = np.where(sd[n + ".tril"][:T, :T] == 0, -np.inf, wei)
        wei = np.exp(wei - wei.max(-1, keepdims=True))
        return wei / wei.sum(-1, keepdims=True) @ v  # (B, T, hs)

    T = idx.shape[1]
    x = sd["token_embedding_table.weight"][idx] + sd["position_embedding_table.weight"][:T]
    for i in range(n_layer):
        b = f"blocks.{i}"
        h = layer_norm(x, b + ".ln1")
        x = x + linear(np.concatenate([head(h, f"{b}.sa.heads.{j}") for j in range(n_head)],
                                      -1), b + ".sa.proj")
        h = np.maximum(linear(layer_norm(x, b + ".ln2"), b + ".ffwd.net.0"), 0)  # ReLU
        x = x + linear(h, b + ".ffwd.net.2")
    return linear(layer_norm(x, "ln_f"), "lm_head")  # (B, T, vocab)

def test_from_lecture_gives_gpt_py_logits():
    sd = lecture_state_dict()
    config, params = from_lecture(sd)
    assert (config.vocab_size, config.block_size, config.n_embd, config.n_head,
            config.n_layer) == (11, 8, 12, 3, 2)
    idx = np.random.default_rng(1).integers(0, 11, (2, 8))
    want = lecture_forward(sd, idx, n_layer=2, n_head=3)
    got = GPT(config).apply({"params": params}, jnp.asarray(idx))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # the lm_head bias is part of it: without it the logits move by the bias
    no_bias = {**sd, "lm_head.bias": np.zeros_like(sd["lm_head.bias"])}
    assert np.abs(lecture_forward(no_bias, idx, 2, 3) - got).max() > 0.1

def test_from_lecture_params_are_the_lecture_configs_model():
    """The converted tree has exactly the shapes configs/lecture.py's model initialises."""
    config, params = from_lecture(lecture_state_dict())
    c = lecture.get_config()
    for k, v in SIZES.items():
        c[k] = v
    model = make_model(c, vocab_size=11)
    assert model.config == config
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, shapes["params"])

def test_from_lecture_names_a_missing_weight():
    sd = lecture_state_dict()
    del sd["lm_head.bias"]
    with pytest.raises(UserError, match="lm_head.bias"):
        from_lecture(sd)

def test_lecture_parameter_count_is_gpt_pys():
    """gpt.py prints 10.788929 M parameters: every parameter, position embeddings included."""
    model = make_model(lecture.get_config(), vocab_size=65)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    C, L, V, T = 384, 6, 65, 256
    per_block = 3 * C * C + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C) + 4 * C
    n = count_params(shapes["params"], non_embedding=False)
    assert n == L * per_block + V * C + T * C + 2 * C + (C * V + V)
    assert f"{n / 1e6} M parameters" == "10.788929 M parameters"

def test_lecture_init_is_normal_002_everywhere():
    c = lecture.get_config()
    c.n_layer = 6
    model = make_model(c, vocab_size=65)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    for name in (("h_5", "mlp", "c_proj"), ("h_5", "attn", "c_proj"), ("h_0", "mlp", "c_fc")):
        p = params[name[0]][name[1]][name[2]]
        assert abs(float(np.std(p["kernel"])) - 0.02) < 0.002, name  # not 0.02/sqrt(12)
        assert not np.any(p["bias"])
    assert abs(float(np.std(params["wpe"]["embedding"])) - 0.02) < 0.002
    assert not np.any(params["lm_head"]["bias"])

def test_no_dropout_on_the_embeddings():
    """The first Block sees tok_emb + pos_emb as they are (gpt.py), or dropped out (nanoGPT)."""
    def block_0_input(embd_dropout):
        config = GPTConfig(**SIZES, dropout=0.5, embd_dropout=embd_dropout)
        model, idx = GPT(config), jnp.arange(8)[None] % 11
        params = jax.jit(model.init)(jax.random.PRNGKey(0), idx)["params"]

        @jax.jit  # one compiled program instead of every op compiled on its own
        def block_0_sees(params):
            seen = []

            def record(f, args, kwargs, context):
                if (isinstance(context.module, Block) and context.module.name == "h_0"
                        and context.method_name == "__call__"):
                    seen.append(args[0])
                return f(*args, **kwargs)

            with nn.intercept_methods(record):
                model.apply({"params": params}, idx, deterministic=False,
                            rngs={"dropout": jax.random.PRNGKey(1)})
            return seen[0]

        emb = params["wte"]["embedding"][idx] + params["wpe"]["embedding"][:8]
        return block_0_sees(params), emb

    x, emb = block_0_input(embd_dropout=False)
    np.testing.assert_array_equal(x, emb)
    x, emb = block_0_input(embd_dropout=True)
    assert np.mean(np.asarray(x) == 0) > 0.3  # about half of it dropped

def test_decay_all_is_torch_adamw():
    """torch's AdamW decays every parameter: p -= lr * wd * p (zero grads: no Adam step)."""
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for decay_all, bias_after in ((True, 2.0 - 0.1 * 0.5 * 2.0), (False, 2.0)):
        c = lecture.get_config()
        c.learning_rate, c.weight_decay, c.decay_all = 0.1, 0.5, decay_all
        tx = optim.make_optimizer(c)
        updates, _ = tx.update(zeros, tx.init(params), params)
        new = optax.apply_updates(params, updates)
        np.testing.assert_allclose(new["kernel"], 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)
        np.testing.assert_allclose(new["bias"], bias_after, rtol=1e-6)

def test_the_lectures_loop_evaluates_before_the_last_step(text_file, tmp_path, capsys):
    """End to end (every case of the schedule: tests/test_schedule.py; nanoGPT's loop:
    test_training.py::test_metrics_jsonl_has_the_contracted_keys_and_nanogpts_lr)."""
    c = tiny(text_file, eval_before_last_step=True, max_iters=20, steps_per_call=4,
             param_count="all")
    state = training.train(c, tmp_path)
    assert int(state.step) == 20  # max_iters steps, the last after the last eval
    events = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [0, 10, 19]
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(20))
    out = capsys.readouterr()
    assert " M parameters (devices" in out.out + out.err  # gpt.py's count and wording
    assert pretrained.load_run(tmp_path, "latest").step == 20  # the final state is kept

# gpt.py's hyperparameters as its first lines set them (and its torch.manual_seed(1337))
GPT_PY = dict(batch_size=64, block_size=256, max_iters=5000, eval_interval=500,
              learning_rate=3e-4, eval_iters=200, n_embd=384, n_head=6, n_layer=6, dropout=0.2,
              seed=1337, dataset="shakespeare_char")
# its model: a Head module per head, ReLU, biases, nn.Linear(n_embd, vocab_size) as lm_head,
# x = tok_emb + pos_emb, normal(0.02) everywhere, torch's float32
GPT_PY_MODEL = dict(attention="heads", activation="relu", bias=True, tie_weights=False,
                    lm_head_bias=True, embd_dropout=False, scale_residual_init=False,
                    position="learned", dtype="float32")
# torch.optim.AdamW(m.parameters(), lr=learning_rate): torch's defaults, a constant rate, no
# clipping; evals at iter % eval_interval == 0 or iter == max_iters - 1; the count of every
# parameter
TORCH_ADAMW_AND_LOOP = dict(beta1=0.9, beta2=0.999, weight_decay=0.01, decay_all=True,
                            grad_clip=0.0, decay_lr=False, warmup_iters=0,
                            eval_before_last_step=True, param_count="all")
# lecture_cpu: the sizes of nanoGPT's CPU recipe (its README), no dropout at that size, and a
# larger constant rate for the small model
LECTURE_CPU = dict(batch_size=12, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                   max_iters=2000, eval_iters=20, learning_rate=1e-3, eval_interval=250)


@pytest.mark.parametrize("recipe, want", [
    (lecture, {**GPT_PY, **GPT_PY_MODEL, **TORCH_ADAMW_AND_LOOP}),
    (lecture_cpu, {**GPT_PY, **GPT_PY_MODEL, **TORCH_ADAMW_AND_LOOP, **LECTURE_CPU}),
], ids=["lecture", "lecture_cpu"])
def test_lecture_recipes_are_gpt_pys_settings(recipe, want):
    c = recipe.get_config()
    validate(c)
    assert {k: c[k] for k in want} == want
