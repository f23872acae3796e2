"""The KV-cache sampler against naive full recomputation, and its sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import sampling
from jaxgpt.convert import fused
from jaxgpt.errors import UserError
from jaxgpt.model import GPT, BigramLanguageModel, GPTConfig
from jaxgpt.sampling import decode, init_cache

BLOCK = 8
VOCAB = 13


def make(kind):
    cfg = GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16,
                    attention="heads" if kind == "heads" else "fused")
    model = BigramLanguageModel(cfg) if kind == "bigram" else GPT(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, BLOCK), jnp.int32))["params"]
    # x3 weights: sharper attention and logits, so the argmax depends on the whole context
    # (at init scale it is nearly a function of the last token, and a wrong window passes)
    return model, jax.tree.map(lambda p: 3.0 * p, params)


def naive_greedy(model, params, idx, max_new_tokens):
    """nanoGPT's generate under argmax: the whole cropped context through the model per token
    (jitted: a compile per context length, where op-by-op would compile every op per length)."""
    forward = jax.jit(model.apply)
    for _ in range(max_new_tokens):
        logits = forward({"params": params}, idx[:, -BLOCK:])  # (B, t, V)
        idx = jnp.concatenate([idx, jnp.argmax(logits[:, -1], -1)[:, None]], axis=1)
    return idx


@pytest.mark.parametrize("kind", ["fused", "heads", "bigram"])
@pytest.mark.parametrize("T, new", [(3, 4), (BLOCK, 3), (BLOCK + 5, 6), (2, 3 * BLOCK)],
                         ids=["shorter", "equal", "longer", "crossing"])
def test_cached_greedy_equals_naive(kind, T, new):
    model, params = make(kind)
    idx = jax.random.randint(jax.random.PRNGKey(T), (2, T), 0, VOCAB)  # (B, T)
    got = sampling.generate(model, params, idx, new, rng=jax.random.PRNGKey(1), temperature=0)
    want = naive_greedy(model, params, idx, new)
    assert got.shape == (2, T + new)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["fused", "heads"])
def test_the_lectures_loop_is_the_naive_rule_and_samples_as_the_cache(kind):
    """sampling.generate_uncached (the lecture's generate, in the library) is this file's
    naive loop under argmax, and with temperature and top-k draws the same tokens as the
    cached sampler from the same keys, inside and past the window."""
    model, params = make(kind)
    idx = jax.random.randint(jax.random.PRNGKey(5), (2, 3), 0, VOCAB)  # (B, T)
    new = BLOCK + 4  # crosses the window
    greedy = sampling.generate_uncached(model, params, idx, new, rng=jax.random.PRNGKey(0),
                                        temperature=0)
    np.testing.assert_array_equal(greedy, naive_greedy(model, params, idx, new))
    kw = dict(rng=jax.random.PRNGKey(3), temperature=1.5, top_k=5)
    np.testing.assert_array_equal(sampling.generate_uncached(model, params, idx, new, **kw),
                                  sampling.generate(model, params, idx, new, **kw))


@pytest.mark.parametrize("kind", ["fused", "heads"])
def test_cached_logits_equal_full_forward(kind):
    """Prefill 3 tokens, then one token at a time: every position's logits match the full
    forward's to 1e-5 (float32; only the summation order differs)."""
    model, params = make(kind)
    idx = jax.random.randint(jax.random.PRNGKey(2), (2, BLOCK), 0, VOCAB)  # (B, T)
    full = model.apply({"params": params}, idx)  # (B, T, V)
    model, params = fused(model, params)  # a `heads` model decodes in its fused form
    assert model.config.attention == "fused"
    cache = init_cache(model, 2)
    logits, cache = decode(model, params, idx[:, :3], cache, 0)
    pieces = [logits]
    for t in range(3, BLOCK):
        logits, cache = decode(model, params, idx[:, t:t + 1], cache, t)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)


def test_heads_model_refuses_a_cache():
    model, params = make("heads")
    with pytest.raises(UserError, match="fused"):
        decode(model, params, jnp.zeros((1, 1), jnp.int32), init_cache(model, 1), 0)


def test_cache_path_has_the_same_params():
    model, params = make("fused")
    with_cache = model.init(jax.random.PRNGKey(0), jnp.zeros((1, BLOCK), jnp.int32),
                            init_cache(model, 1), 0, method=GPT.decode)["params"]
    assert jax.tree.structure(with_cache) == jax.tree.structure(params)
    assert jax.tree.map(jnp.shape, with_cache) == jax.tree.map(jnp.shape, params)


def test_one_compilation_for_any_prompt_length_and_new_tokens():
    model, params = make("fused")
    start_fn, decode_fn = sampling.compiled_programs(model, sampling.CHUNK)
    before = start_fn._cache_size(), decode_fn._cache_size()  # other tests' batch sizes
    for T, new in [(1, 5), (BLOCK, 70), (BLOCK + 3, 1), (4, 200)]:
        idx = jnp.zeros((3, T), jnp.int32)  # batch 3: used by no other test
        sampling.generate(model, params, idx, new, rng=jax.random.PRNGKey(0), top_k=5,
                          top_p=0.9, temperature=0.7)
    assert (start_fn._cache_size(), decode_fn._cache_size()) == (before[0] + 1, before[1] + 1)


def test_seed_and_batch():
    model, params = make("fused")
    idx = jnp.zeros((4, 1), jnp.int32)
    a = sampling.generate(model, params, idx, 30, rng=jax.random.PRNGKey(0))
    b = sampling.generate(model, params, idx, 30, rng=jax.random.PRNGKey(0))
    c = sampling.generate(model, params, idx, 30, rng=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(row) for row in np.asarray(a)}) > 1  # the rows are independent samples


# ---------------------------------------------------------------------------------------------
# top-k / top-p on a hand-made distribution

PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])


def draw(n, **settings):
    logits = jnp.tile(jnp.log(jnp.asarray(PROBS, jnp.float32))[None], (n, 1))  # (n, V)
    s = sampling.as_settings(settings.get("temperature", 1.0), settings.get("top_k"),
                           settings.get("top_p"))
    return np.asarray(sampling.sample_token(logits, jax.random.PRNGKey(0), s))


@pytest.mark.parametrize("settings, allowed", [
    (dict(top_k=3), [0, 1, 2]),
    (dict(top_k=1), [0]),
    (dict(top_p=0.6), [0, 1]),  # 0.4 < 0.6, 0.65 >= 0.6: the nucleus is the first two
    (dict(top_p=0.7), [0, 1, 2]),
    (dict(top_p=0.3), [0]),
    (dict(top_k=2, top_p=0.95), [0, 1]),
    (dict(top_k=5, temperature=2.0), [0, 1, 2, 3, 4]),
    (dict(temperature=0.0), [0]),
])
def test_filters_never_leave_the_allowed_set(settings, allowed):
    tokens = draw(20000, **settings)
    assert set(np.unique(tokens)) == set(allowed)  # all allowed appear, nothing else
    if settings.get("temperature", 1.0) == 1.0:  # within the set: renormalised probabilities
        want = PROBS[allowed] / PROBS[allowed].sum()
        freq = np.bincount(tokens, minlength=len(PROBS))[allowed] / len(tokens)
        np.testing.assert_allclose(freq, want, atol=0.015)


def test_filters_inside_the_compiled_loop():
    """A bigram whose every row is PROBS: 500 tokens x 4 samples stay in the top 3."""
    model, _ = make("bigram")
    cfg = GPTConfig(block_size=BLOCK, vocab_size=len(PROBS))
    model = BigramLanguageModel(cfg)
    table = jnp.tile(jnp.log(jnp.asarray(PROBS, jnp.float32))[None], (len(PROBS), 1))
    params = {"token_embedding_table": {"embedding": table}}
    out = sampling.generate(model, params, jnp.zeros((4, 1), jnp.int32), 500,
                            rng=jax.random.PRNGKey(3), top_k=3)
    assert set(np.unique(out[:, 1:])) == {0, 1, 2}


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=VOCAB + 1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(slide=BLOCK + 1), "slide"),
])
def test_bad_settings_raise_user_errors(kwargs, message):
    model, params = make("fused")
    n = kwargs.pop("max_new_tokens", 5)
    with pytest.raises(UserError, match=message):
        sampling.generate(model, params, jnp.zeros((1, 1), jnp.int32), n,
                          rng=jax.random.PRNGKey(0), **kwargs)


def test_empty_prompt_is_a_user_error():
    model, params = make("fused")
    with pytest.raises(UserError, match="idx"):
        sampling.generate(model, params, jnp.zeros((1, 0), jnp.int32), 3,
                          rng=jax.random.PRNGKey(0))


@pytest.mark.parametrize("kind", ["fused", "heads"])
@pytest.mark.parametrize("slide", [2, BLOCK // 2, BLOCK])
def test_slide_k_equals_its_naive_rule(kind, slide):
    """slide=k (opt-in): when the window is full, drop the oldest k tokens, then continue."""
    model, params = make(kind)
    idx = jax.random.randint(jax.random.PRNGKey(5), (2, 3), 0, VOCAB)
    got = sampling.generate(model, params, idx, 4 * BLOCK, rng=jax.random.PRNGKey(1),
                            temperature=0, slide=slide)
    context, out, forward = idx, idx, jax.jit(model.apply)
    for _ in range(4 * BLOCK):
        tok = jnp.argmax(forward({"params": params}, context)[:, -1], -1)[:, None]
        out = jnp.concatenate([out, tok], axis=1)
        context = jnp.concatenate([context[:, slide:] if context.shape[1] == BLOCK else context,
                                   tok], axis=1)
    np.testing.assert_array_equal(got, out)
