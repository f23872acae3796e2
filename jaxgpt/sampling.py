"""Sampling: a KV cache, a prefill of the prompt, a compiled `lax.scan` decode loop.

The lecture's and nanoGPT's `generate` re-runs the whole context through the model for every
new token (`generate_uncached`, at the end: the reference the cached loop is tested against).
Here the
keys and values of past positions live in a fixed-shape cache passed in and out as a value, so a
decode step reads one token; one compilation serves every prompt length and any number of new
tokens (the prompt is padded to block_size, its length is a traced value; decoding runs as scans
of CHUNK steps, the last one idling past the end).

Past block_size tokens we keep nanoGPT's semantics: condition on the last block_size tokens. With
learned absolute position embeddings every token's position changes when the window slides, so
no cached key stays valid: each step past the window re-prefills the last block_size tokens
(a `lax.switch` branch inside the scan). That is exact, and as costly per token as nanoGPT's.
`slide=k` (opt-in, not nanoGPT's semantics) drops the oldest k tokens at once instead, so the
re-prefill happens once per k tokens and the context holds between block_size-k+1 and
block_size tokens.

With rotary positions (`position="rope"`) attention sees only relative positions, so a cached
key stays valid when the window slides: past block_size every step stays one cached token, its
keys written over the oldest slot of the cache (a ring, slot = position mod block_size), and the
new token attends to the last block_size positions, whose keys were computed when those tokens
were generated: sliding-window attention (as in Mistral), not nanoGPT's re-run of the cropped
window (where every layer above the first recomputes the window's keys from the window alone).
"""

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.convert import fused
from jaxgpt.errors import UserError
from jaxgpt.model import GPT

CHUNK = 64  # decode steps per compiled call: streaming granularity; idle steps are cheap


def check_settings(vocab_size: int, max_new_tokens: int, temperature=1.0, top_k=None,
                   top_p=None, slide=1, block_size=None) -> None:
    """UserError for settings no sampler can use (sample.py calls it before compiling)."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise UserError(f"max_new_tokens={max_new_tokens}: must be a positive integer")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise UserError(f"top_k={top_k}: must be between 1 and the vocabulary size "
                        f"{vocab_size} (or unset)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p={top_p}: must be in (0, 1] (or unset)")
    if block_size is not None and not 1 <= slide <= block_size:
        raise UserError(f"slide={slide}: must be between 1 (nanoGPT's window) and block_size "
                        f"{block_size}")


def filter_logits(logits, temperature, top_k, top_p):
    """(B, V) logits -> (B, V) logits / temperature, -inf outside the top-k and the nucleus.

    All three settings are traced values (top_k=0 and top_p=1 mean off), so changing them does
    not recompile. Ties with the k-th / last nucleus logit are kept.
    """
    V = logits.shape[-1]
    logits = logits / jnp.where(temperature > 0, temperature, 1.0)  # (B, V)
    sorted_logits = -jnp.sort(-logits, axis=-1)  # (B, V) descending
    k = jnp.where(top_k > 0, top_k, V)
    sorted_logits = jnp.where(jnp.arange(V) < k, sorted_logits, -jnp.inf)  # (B, V) top-k only
    # nucleus: the smallest prefix of the sorted tokens whose probability reaches top_p
    probs = jax.nn.softmax(sorted_logits, axis=-1)  # (B, V)
    before = jnp.cumsum(probs, axis=-1) - probs  # (B, V) mass of strictly better tokens
    keep = (before < top_p) | (top_p >= 1.0)  # (B, V) the best token is always kept
    keep &= sorted_logits > -jnp.inf
    n_keep = keep.sum(axis=-1, keepdims=True)  # (B, 1)
    threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)  # (B, 1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)  # (B, V)


def sample_token(logits, key, settings):
    """(B, V) logits -> (B,) next tokens; temperature 0 is greedy (argmax of the raw logits)."""
    temperature, top_k, top_p = settings
    sampled = jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p))
    return jnp.where(temperature == 0, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)


def init_cache(model, batch_size: int):
    """The KV cache `decode` passes through the model as a value: one (k, v) pair per layer,
    each (B, n_head, block_size, head_size) in the compute dtype; () for the bigram model,
    which looks at one token only."""
    if not isinstance(model, GPT):
        return ()
    cfg = model.config
    shape = (batch_size, cfg.n_head, cfg.block_size, cfg.head_size)
    return tuple((jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
                 for _ in range(cfg.n_layer))


def decode(model, params, idx, cache, pos):
    """idx (B, T) at positions pos.. -> (logits (B, T, V), cache): GPT.decode writes their keys
    and values into the cache; the bigram reads each token alone and has none."""
    if not isinstance(model, GPT):
        return model.apply({"params": params}, idx), cache
    return model.apply({"params": params}, idx, cache, pos, method=GPT.decode)


def prefill(model, params, window, n):
    """Run the (B, block_size) window (n real tokens, then padding) through the model with a
    fresh cache. Returns the logits after the n-th token (B, V) and the filled cache; padding
    positions see only earlier tokens (causal) and their cache slots are overwritten later."""
    cache = init_cache(model, window.shape[0])
    logits, cache = decode(model, params, window, cache, 0)  # (B, bs, V)
    return jax.lax.dynamic_index_in_dim(logits, n - 1, axis=1, keepdims=False), cache  # (B, V)


def start(model, params, window, n):
    """The decode loop's first carry: the prompt's window prefilled. Compiled on its own; its
    outputs carry the same shardings as decode_chunk's, so the loop never recompiles."""
    logits, cache = prefill(model, params, window, n)
    return cache, window, n, logits


def decode_chunk(model, params, carry, steps_left, offset, rng, settings, slide, *,
                 chunk: int):
    """`chunk` decode steps as one lax.scan; returns the new carry and (B, chunk) tokens.

    carry = (cache, window (B, block_size), n: tokens in the window (rope: tokens so far),
    logits (B, V) for the next token). Step i samples a token, then, unless it was the last
    wanted (i >= steps_left - 1): writes it at slot n and runs one cached step, or, with the
    window full, drops its oldest `slide` tokens and re-prefills it (learned positions have all
    shifted); with rotary positions it always runs one cached step, past the window into the
    ring's oldest slot. Token keys are fold_in(rng, offset + i), so the chunking never changes
    the samples.
    """
    block_size = carry[1].shape[1]
    rolling = model.config.position == "rope"  # cached keys stay valid past the window

    def idle(cache, window, n, tok):
        return cache, window, n, jnp.zeros_like(carry[3])

    def append(cache, window, n, tok):  # the cache's case: one token through the model
        window = jax.lax.dynamic_update_slice(window, tok[:, None], (0, n % block_size))  # ring
        logits, cache = decode(model, params, tok[:, None], cache, n)
        return cache, window, n + 1, logits[:, -1]  # (B, V)

    def shift(cache, window, n, tok):  # slide=1: nanoGPT's idx[:, -block_size:], recomputed
        n = block_size - slide + 1  # the newest block_size - slide tokens, then tok
        window = jnp.roll(window, -slide, axis=1)  # (B, block_size) oldest tokens to the end
        window = jax.lax.dynamic_update_slice(window, tok[:, None], (0, n - 1))  # (B, bs)
        logits, cache = prefill(model, params, window, n)
        return cache, window, n, logits

    def step(carry, i):
        cache, window, n, logits = carry
        tok = sample_token(logits, jax.random.fold_in(rng, offset + i), settings)  # (B,)
        branch = jnp.where(i >= steps_left - 1, 0, jnp.where((n < block_size) | rolling, 1, 2))
        return jax.lax.switch(branch, (idle, append, shift), cache, window, n, tok), tok

    carry, toks = jax.lax.scan(step, carry, jnp.arange(chunk))  # toks (chunk, B)
    return carry, toks.T  # (B, chunk)


@functools.lru_cache(maxsize=8)
def compiled_programs(model, chunk: int):
    """The two jitted programs for a model; jax caches one executable per batch size."""
    return (jax.jit(functools.partial(start, model)),
            jax.jit(functools.partial(decode_chunk, model, chunk=chunk)))


def as_settings(temperature, top_k, top_p):
    return (jnp.float32(temperature), jnp.int32(top_k or 0),
            jnp.float32(1.0 if top_p is None else top_p))


def generate_chunks(model, params, idx, max_new_tokens, *, rng, temperature=1.0, top_k=None,
                    top_p=None, slide=1, chunk=CHUNK):
    """Like `generate`, but yields the new tokens as they are produced: (B, <= chunk) numpy
    arrays. Host-side work is numpy, so no shape-dependent eager op compiles per call."""
    model, params = fused(model, params)  # the lecture's per-head form has no KV cache
    cfg = model.config
    check_settings(cfg.vocab_size, max_new_tokens, temperature, top_k, top_p, slide,
                   cfg.block_size)
    idx = np.asarray(idx, np.int32)
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise UserError(f"idx has shape {idx.shape}: pass (B, T) token ids with T >= 1")
    context = idx[:, -cfg.block_size:]  # nanoGPT: condition on at most block_size tokens
    n = context.shape[1]
    window = np.pad(context, ((0, 0), (0, cfg.block_size - n)))  # (B, block_size)
    start_fn, decode_fn = compiled_programs(model, chunk)
    carry = start_fn(params, window, jnp.int32(n))
    settings = as_settings(temperature, top_k, top_p)
    done = 0
    while done < max_new_tokens:
        left = max_new_tokens - done
        carry, toks = decode_fn(params, carry, jnp.int32(left), jnp.int32(done), rng, settings,
                                jnp.int32(slide))
        yield np.asarray(toks)[:, :min(chunk, left)]
        done += chunk


def generate(model, params, idx, max_new_tokens, *, rng, temperature=1.0, top_k=None,
             top_p=None, slide=1):
    """Continue each row of idx (B, T) by max_new_tokens tokens -> (B, T + max_new_tokens).

    temperature=0 is greedy; top_k / top_p restrict sampling to the k most likely tokens /
    the nucleus of probability mass top_p. `rng` is a jax.random key. `slide` > 1 trades
    nanoGPT's exact window for speed past block_size (see the module docstring); a rotary
    (position="rope") model never re-runs its window, so `slide` does not apply to it.
    """
    new = list(generate_chunks(model, params, idx, max_new_tokens, rng=rng,
                               temperature=temperature, top_k=top_k, top_p=top_p, slide=slide))
    return jnp.asarray(np.concatenate([np.asarray(idx, np.int32)] + new, axis=1))


# ---------------------------------------------------------------------------------------------
# The lecture's loop: no cache, the whole (cropped) context re-run for every new token


@functools.lru_cache(maxsize=8)
def _forward(model):
    return jax.jit(lambda params, idx: model.apply({"params": params}, idx))


def generate_uncached(model, params, idx, max_new_tokens, *, rng, temperature=1.0, top_k=None,
                      top_p=None):
    """The lecture's (and nanoGPT's) `generate`: for each new token, crop the context to the
    last block_size tokens, run all of it through the model, sample from the last position.

    The reference `generate` is tested and timed against: the same tokens for the same keys.
    The forward is jitted on contexts padded to a power of two (log2(block_size) compilations;
    the cost grows with the context, as the lecture's does).
    """
    cfg = model.config
    check_settings(cfg.vocab_size, max_new_tokens, temperature, top_k, top_p)
    idx = jnp.asarray(idx, jnp.int32)
    settings = as_settings(temperature, top_k, top_p)
    forward = _forward(model)
    for i in range(max_new_tokens):
        context = idx[:, -cfg.block_size:]  # (B, t) crop to the last block_size tokens
        t = context.shape[1]
        padded = min(cfg.block_size, 1 << (t - 1).bit_length())
        context = jnp.pad(context, ((0, 0), (0, padded - t)))  # (B, padded) causal: no effect
        logits = forward(params, context)[:, t - 1]  # (B, V) focus on the last real step
        tok = sample_token(logits, jax.random.fold_in(rng, i), settings)  # (B,)
        idx = jnp.concatenate([idx, tok[:, None]], axis=1)  # (B, T + i + 1)
    return idx


def warmup(model, params, batch_size: int, chunk=CHUNK) -> float:
    """Compile the sampler for `batch_size` rows now; returns the seconds it took."""
    start = time.perf_counter()
    model, params = fused(model, params)
    start_fn, decode_fn = compiled_programs(model, chunk)
    carry = start_fn(params, np.zeros((batch_size, model.config.block_size), np.int32),
                     jnp.int32(1))
    _, toks = decode_fn(params, carry, jnp.int32(0), jnp.int32(0), jax.random.PRNGKey(0),
                        as_settings(1.0, None, None), jnp.int32(1))  # every step idles
    toks.block_until_ready()
    return time.perf_counter() - start
