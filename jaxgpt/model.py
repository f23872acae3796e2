"""The lecture's GPT, chapter by chapter, as flax.linen modules: pure functions of `params`.

bigram -> attention as a weighted average -> one `Head` -> `MultiHeadAttention` -> all heads in
one batched op (`CausalSelfAttention`, the lecture's exercise 1 and nanoGPT's form) ->
`FeedForward` -> `Block` (residuals, pre-LayerNorm, dropout) -> `GPT`.

Submodule names follow nanoGPT/GPT-2 (`wte`, `wpe`, `h_0`, `c_attn`, `c_proj`, `ln_f`) so weights
import by name (see convert.py).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.config import resolve_dtype
from jaxgpt.errors import UserError

ACTIVATIONS = {
    "relu": nn.relu,  # the lecture
    "gelu": lambda x: nn.gelu(x, approximate=False),  # nanoGPT (torch's nn.GELU(), exact erf)
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # GPT-2's original; cheaper backward
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The model's hyperparameters (nanoGPT's GPTConfig, plus the lecture's variants)."""

    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64, as nanoGPT
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2
    attention: str = "fused"  # "fused": CausalSelfAttention | "heads": MultiHeadAttention of `Head`s
    attention_impl: str = "softmax"  # fused path: explicit softmax | jax.nn.dot_product_attention
    activation: str = "gelu"
    tie_weights: bool = True  # lm_head shares wte's weights (nanoGPT); the lecture has its own
    dtype: str = "float32"  # compute dtype ("auto": bfloat16 on GPU/TPU); params always float32
    remat: bool = False  # recompute each Block in the backward pass (jax.checkpoint)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                            "pick n_embd a multiple of n_head")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"activation={self.activation!r}: must be one of {', '.join(ACTIVATIONS)}")
        if self.attention not in ("fused", "heads"):
            raise UserError(f"attention={self.attention!r}: must be 'fused' or 'heads'")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self):
        return jnp.dtype(resolve_dtype(self.dtype))

    @classmethod
    def from_config(cls, config, vocab_size: int) -> "GPTConfig":
        """The model part of a run's ml_collections config; `vocab_size` from the tokenizer."""
        names = {f.name for f in dataclasses.fields(cls)} - {"vocab_size"}
        return cls(vocab_size=config.vocab_size or vocab_size, **{n: config[n] for n in names})


# ---------------------------------------------------------------------------------------------
# Building blocks


def _dense(config: GPTConfig, features: int, name: str, *, use_bias: bool, std: float = 0.02):
    return nn.Dense(features, use_bias=use_bias, dtype=config.compute_dtype,
                    param_dtype=jnp.float32, kernel_init=nn.initializers.normal(std),
                    bias_init=nn.initializers.zeros, name=name)


def _residual_std(config: GPTConfig) -> float:
    # GPT-2: scale the init of projections that write into the residual stream by
    # 1/sqrt(2 * n_layer), since each of the n_layer blocks adds two of them to it.
    return 0.02 / math.sqrt(2 * config.n_layer)


def linear(layer: nn.Dense, x: jax.Array) -> jax.Array:
    """`layer` on (..., C) as one (N, C) matmul.

    Same math; XLA:CPU's backward of a dense layer on 3-D activations (dW contracting over B and
    T) is ~2.5x slower than on a flattened 2-D one, and flattening costs nothing on GPU/TPU.
    """
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], layer.features)


def _layer_norm(config: GPTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_bias=config.bias, dtype=config.compute_dtype,
                        param_dtype=jnp.float32, name=name)


def causal_mask(T: int) -> jax.Array:
    """(T, T) lower-triangular: position t may look at positions <= t, never the future."""
    return jnp.tril(jnp.ones((T, T), dtype=bool))


def cached_mask(T: int, pos, S: int) -> jax.Array:
    """(T, S): query t (at position pos + t) may look at cache slots <= pos + t.

    Slots past the current position hold stale or padding keys; the mask hides them until
    they are overwritten, so one fixed-shape cache serves every length.
    """
    return (pos + jnp.arange(T))[:, None] >= jnp.arange(S)[None, :]


def update_cache(cache, k, v, pos, axis: int):
    """Write the new k, v (T positions) into the fixed-shape (k, v) cache at slot `pos`."""
    k_cache, v_cache = cache
    k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), pos, axis)
    v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), pos, axis)
    return k, v


def weighted_average(x: jax.Array) -> jax.Array:
    """The lecture's "mathematical trick": every token averages itself and all earlier tokens.

    This is attention with all affinities equal: masked to the past, softmax-normalised, then
    a matrix product does the weighted sum. `Head` makes the affinities data-dependent.
    """
    T = x.shape[-2]
    wei = jnp.where(causal_mask(T), 0.0, -jnp.inf)  # (T, T) equal affinities, future masked
    wei = jax.nn.softmax(wei, axis=-1)  # (T, T) each row sums to 1
    return wei @ x  # (T, T) @ (B, T, C) -> (B, T, C)


def masked_softmax_attention(q, k, v, mask, dropout: nn.Dropout, deterministic: bool):
    """softmax(q k^T / sqrt(hs), masked) v over the last two axes, in float32.

    q: (..., Tq, hs), k, v: (..., Tk, hs), mask: (Tq, Tk) bool (True = may attend).
    """
    hs = q.shape[-1]
    # affinities accumulated and kept in float32 even when q, k are bfloat16 / float16
    wei = jnp.matmul(q, jnp.swapaxes(k, -2, -1), preferred_element_type=jnp.float32)
    wei = wei * hs**-0.5  # (..., Tq, hs) @ (..., hs, Tk) -> (..., Tq, Tk)
    wei = jnp.where(mask, wei, -jnp.inf)  # (..., Tq, Tk)
    wei = jax.nn.softmax(wei, axis=-1).astype(v.dtype)  # (..., Tq, Tk)
    wei = dropout(wei, deterministic=deterministic)
    return wei @ v  # (..., Tq, Tk) @ (..., Tk, hs) -> (..., Tq, hs)


# ---------------------------------------------------------------------------------------------
# Attention, the lecture's way and the batched way


class Head(nn.Module):
    """One head of self-attention."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True, cache=None, pos=0):
        """x (B, T, C) -> (B, T, hs); with `cache` ((B, block_size, hs) k and v, the keys and
        values of positions < pos), x holds positions pos.. and it returns (out, new cache)."""
        cfg = self.config
        T = x.shape[1]
        key = _dense(cfg, cfg.head_size, "key", use_bias=False)
        query = _dense(cfg, cfg.head_size, "query", use_bias=False)
        value = _dense(cfg, cfg.head_size, "value", use_bias=False)
        k = linear(key, x)  # (B, T, hs)
        q = linear(query, x)  # (B, T, hs)
        v = linear(value, x)  # (B, T, hs)
        if cache is not None:  # sampling: attend to every cached position up to our own
            k, v = update_cache(cache, k, v, pos, axis=1)  # (B, block_size, hs) each
            out = masked_softmax_attention(q, k, v, cached_mask(T, pos, cfg.block_size),
                                           nn.Dropout(cfg.dropout), True)  # (B, T, hs)
            return out, (k, v)
        # scaled by head_size ** -0.5 (the lecture's fix: the head size, not C)
        return masked_softmax_attention(q, k, v, causal_mask(T), nn.Dropout(cfg.dropout),
                                        deterministic)  # (B, T, hs)


class MultiHeadAttention(nn.Module):
    """Multiple heads of self-attention in parallel, concatenated, then projected."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True, cache=None, pos=0):
        cfg = self.config
        heads = [Head(cfg, name=f"heads_{i}") for i in range(cfg.n_head)]
        if cache is None:
            out = jnp.concatenate([h(x, deterministic) for h in heads], axis=-1)  # (B, T, C)
        else:  # head i owns slice i of the (B, nh, block_size, hs) cache
            outs = [h(x, True, (cache[0][:, i], cache[1][:, i]), pos) for i, h in enumerate(heads)]
            out = jnp.concatenate([o for o, _ in outs], axis=-1)  # (B, T, C)
            cache = tuple(jnp.stack([c[j] for _, c in outs], axis=1) for j in (0, 1))
        proj = _dense(cfg, cfg.n_embd, "c_proj", use_bias=cfg.bias, std=_residual_std(cfg))
        out = linear(proj, out)  # (B, T, C) the lecture's `proj`
        out = nn.Dropout(cfg.dropout)(out, deterministic=deterministic)
        return out if cache is None else (out, cache)


class CausalSelfAttention(nn.Module):
    """All heads in one batched op: one (C, 3C) projection for q, k, v (exercise 1, nanoGPT)."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True, cache=None, pos=0):
        cfg = self.config
        B, T, C = x.shape
        nh, hs = cfg.n_head, cfg.head_size
        qkv = linear(_dense(cfg, 3 * C, "c_attn", use_bias=cfg.bias), x)  # (B, T, 3C)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # 3 x (B, T, C), each head's columns side by side
        q, k, v = (t.reshape(B, T, nh, hs) for t in (q, k, v))  # (B, T, nh, hs)
        if cache is None:
            y = self.attend(q, k, v, deterministic)  # (B, T, nh, hs)
        else:
            y, cache = self.attend_cached(q, k, v, cache, pos)  # (B, T, nh, hs)
        y = y.reshape(B, T, C)  # re-assemble all head outputs side by side
        y = linear(_dense(cfg, C, "c_proj", use_bias=cfg.bias, std=_residual_std(cfg)), y)
        y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)  # (B, T, C)
        return y if cache is None else (y, cache)

    def attend_cached(self, q, k, v, cache, pos):
        """Sampling: write k, v at slot `pos` of the (B, nh, block_size, hs) cache, attend to
        every slot up to each query's position. Explicit softmax: at one query it is a matvec."""
        q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        k, v = update_cache(cache, k, v, pos, axis=2)  # (B, nh, block_size, hs) each
        mask = cached_mask(q.shape[2], pos, self.config.block_size)  # (T, block_size)
        y = masked_softmax_attention(q, k, v, mask, nn.Dropout(0.0), True)  # (B, nh, T, hs)
        return jnp.swapaxes(y, 1, 2), (k, v)  # (B, T, nh, hs)

    def attend(self, q, k, v, deterministic):
        """(B, T, nh, hs) q, k, v -> (B, T, nh, hs) causal attention output."""
        cfg = self.config
        T = q.shape[1]
        fused_ok = cfg.attention_impl != "softmax" and (deterministic or cfg.dropout == 0.0)
        if fused_ok:  # the fused kernel has no attention dropout: inference / dropout-free recipes
            return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                implementation=cfg.attention_impl)
        q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = masked_softmax_attention(q, k, v, causal_mask(T), nn.Dropout(cfg.dropout),
                                     deterministic)  # (B, nh, T, hs)
        return jnp.swapaxes(y, 1, 2)  # (B, T, nh, hs)


# ---------------------------------------------------------------------------------------------
# Computation, the Block, the GPT


class FeedForward(nn.Module):
    """A linear layer, a non-linearity, a projection back: the per-token computation (MLP)."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        h = linear(_dense(cfg, 4 * cfg.n_embd, "c_fc", use_bias=cfg.bias), x)  # (B, T, 4C)
        h = ACTIVATIONS[cfg.activation](h)  # (B, T, 4C)
        y = linear(_dense(cfg, cfg.n_embd, "c_proj", use_bias=cfg.bias, std=_residual_std(cfg)),
                   h)  # (B, T, C)
        return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


MLP = FeedForward  # nanoGPT's name


class Block(nn.Module):
    """Transformer block: communication (attention) followed by computation (feed-forward)."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True, cache=None, pos=0):
        cfg = self.config
        attention = CausalSelfAttention if cfg.attention == "fused" else MultiHeadAttention
        attn = attention(cfg, name="attn")
        # pre-LayerNorm, and residual connections: x + f(ln(x)) keeps a clean gradient path
        if cache is None:
            x = x + attn(_layer_norm(cfg, "ln_1")(x), deterministic)  # (B, T, C)
        else:
            a, cache = attn(_layer_norm(cfg, "ln_1")(x), deterministic, cache, pos)
            x = x + a  # (B, T, C)
        x = x + FeedForward(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x), deterministic)  # (B, T, C)
        return x if cache is None else (x, cache)


class GPT(nn.Module):
    """Token + position embeddings, n_layer Blocks, a final LayerNorm, the language-model head."""

    config: GPTConfig

    @nn.compact
    def __call__(self, idx, deterministic: bool = True, cache=None, pos=0):
        """idx (B, T) -> logits (B, T, vocab).

        Sampling passes `cache` (see `init_cache`): idx then holds positions pos..pos+T-1, its
        keys and values are written into the cache, and the call returns (logits, new cache).
        """
        cfg = self.config
        B, T = idx.shape
        if T > cfg.block_size:
            raise UserError(f"cannot forward a sequence of length {T}: block_size is only "
                            f"{cfg.block_size} (crop the input to the last block_size tokens)")
        init = nn.initializers.normal(0.02)
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init,
                       dtype=cfg.compute_dtype, name="wte")
        wpe = nn.Embed(cfg.block_size, cfg.n_embd, embedding_init=init,
                       dtype=cfg.compute_dtype, name="wpe")
        tok_emb = wte(idx)  # (B, T, C)
        pos_emb = wpe(pos + jnp.arange(T))  # (T, C)
        x = nn.Dropout(cfg.dropout)(tok_emb + pos_emb, deterministic=deterministic)  # (B, T, C)
        block = nn.remat(Block, static_argnums=(2,)) if cfg.remat else Block
        new_cache = []
        for i in range(cfg.n_layer):
            if cache is None:
                x = block(cfg, name=f"h_{i}")(x, deterministic)  # (B, T, C)
            else:
                x, layer_cache = block(cfg, name=f"h_{i}")(x, deterministic, cache[i], pos)
                new_cache.append(layer_cache)
        x = _layer_norm(cfg, "ln_f")(x)  # (B, T, C)
        if cfg.tie_weights:  # the output layer reuses the token embedding (nanoGPT, GPT-2)
            logits = wte.attend(x.reshape(B * T, -1)).reshape(B, T, -1)  # (B, T, vocab)
        else:
            lm_head = _dense(cfg, cfg.vocab_size, "lm_head", use_bias=False)
            logits = linear(lm_head, x)  # (B, T, vocab)
        logits = logits.astype(jnp.float32)  # softmax and loss in float32 whatever the dtype
        return logits if cache is None else (logits, tuple(new_cache))


class BigramLanguageModel(nn.Module):
    """The lecture's baseline: each token reads the next token's logits off a lookup table."""

    config: GPTConfig  # only vocab_size is used

    @nn.compact
    def __call__(self, idx, deterministic: bool = True, cache=None, pos=0):
        V = self.config.vocab_size
        table = nn.Embed(V, V, embedding_init=nn.initializers.normal(1.0),
                         name="token_embedding_table")
        logits = table(idx).astype(jnp.float32)  # (B, T, vocab)
        return logits if cache is None else (logits, cache)  # no context: the cache stays ()


def init_cache(model: nn.Module, batch_size: int):
    """The KV cache sampling passes through `model.apply(..., cache=, pos=)` as a value.

    One (k, v) pair per layer, each (B, n_head, block_size, head_size) in the compute dtype;
    () for the bigram model, which looks at one token only.
    """
    if isinstance(model, BigramLanguageModel):
        return ()
    cfg = model.config
    shape = (batch_size, cfg.n_head, cfg.block_size, cfg.head_size)
    return tuple((jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
                 for _ in range(cfg.n_layer))


def make_model(config, vocab_size: int) -> nn.Module:
    """The module a run's config asks for (`config.model`: gpt | bigram)."""
    gpt_config = GPTConfig.from_config(config, vocab_size)
    return BigramLanguageModel(gpt_config) if config.model == "bigram" else GPT(gpt_config)


def count_params(params, non_embedding: bool = True) -> int:
    """Parameter count; nanoGPT's way (without position embeddings) by default."""
    n = sum(p.size for p in jax.tree.leaves(params))
    if non_embedding and "wpe" in params:
        n -= params["wpe"]["embedding"].size
    return n
