"""The lecture's GPT, chapter by chapter, as flax.linen modules: pure functions of `params`.

bigram (`BigramLanguageModel`) -> attention as a weighted average (`weighted_average`) -> one
`Head` -> `MultiHeadAttention` -> all heads in one batched op (`CausalSelfAttention`, the
lecture's exercise 1 and nanoGPT's form) -> `FeedForward` -> `Block` (residuals, pre-LayerNorm,
dropout) -> `GPT`. The layers they are made of (`dense`, `layer_norm`) come last.

The hyperparameters are `GPTConfig` (gpt_config.py); masks, rotary positions and the fused
attention kernels are attention.py's. Submodule names follow nanoGPT/GPT-2 (`wte`, `wpe`, `h_0`,
`c_attn`, `c_proj`, `ln_f`) so weights import by name (convert.py). `GPT.__call__` gives logits;
sampling's KV cache goes through `GPT.decode`, passed in and returned as a value.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt import attention
from jaxgpt.errors import UserError
from jaxgpt.gpt_config import GPTConfig

# ---------------------------------------------------------------------------------------------
# The baseline, and the trick attention is built on


class BigramLanguageModel(nn.Module):
    """The lecture's baseline: each token reads the next token's logits off a lookup table."""

    config: GPTConfig  # only vocab_size is used

    @nn.compact
    def __call__(self, idx, deterministic: bool = True):
        V = self.config.vocab_size
        table = nn.Embed(V, V, embedding_init=nn.initializers.normal(1.0),
                         name="token_embedding_table")
        return table(idx).astype(jnp.float32)  # (B, T, vocab)


def weighted_average(x: jax.Array) -> jax.Array:
    """The lecture's "mathematical trick": every token averages itself and all earlier tokens.

    This is attention with all affinities equal: masked to the past, softmax-normalised, then
    a matrix product does the weighted sum. `Head` makes the affinities data-dependent.
    """
    T = x.shape[-2]
    wei = jnp.where(attention.causal_mask(T), 0.0, -jnp.inf)  # (T, T) equal, future masked
    wei = jax.nn.softmax(wei, axis=-1)  # (T, T) each row sums to 1
    return wei @ x  # (T, T) @ (B, T, C) -> (B, T, C)


# ---------------------------------------------------------------------------------------------
# Attention, the lecture's way


class Head(nn.Module):
    """One head of self-attention."""

    config: GPTConfig

    def setup(self):
        cfg = self.config
        self.key = dense(cfg, cfg.head_size, bias=False)
        self.query = dense(cfg, cfg.head_size, bias=False)
        self.value = dense(cfg, cfg.head_size, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, x, deterministic: bool = True):
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        if self.config.position == "rope":  # rotate q and k by their positions
            k, q = attention.rope(k, jnp.arange(T)), attention.rope(q, jnp.arange(T))
        # affinities, scaled by head_size ** -0.5 so their variance stays ~1 at init
        wei = q @ k.swapaxes(-2, -1) * k.shape[-1] ** -0.5  # (B, T, hs) @ (B, hs, T) -> (B, T, T)
        wei = jnp.where(attention.causal_mask(T), wei, -jnp.inf)  # (B, T, T) no future
        wei = jax.nn.softmax(wei.astype(jnp.float32), axis=-1).astype(x.dtype)  # (B, T, T)
        self.sow("intermediates", "attention", wei)  # kept only if asked (plot.attention_maps)
        wei = self.dropout(wei, deterministic=deterministic)
        v = self.value(x)  # (B, T, hs)
        return wei @ v  # (B, T, T) @ (B, T, hs) -> (B, T, hs)


class MultiHeadAttention(nn.Module):
    """Multiple heads of self-attention in parallel."""

    config: GPTConfig

    def setup(self):
        cfg = self.config
        self.heads = [Head(cfg) for _ in range(cfg.n_head)]
        self.c_proj = dense(cfg, cfg.n_embd, bias=cfg.bias, std=residual_std(cfg))  # `proj`
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, x, deterministic: bool = True):
        out = jnp.concatenate([h(x, deterministic) for h in self.heads], axis=-1)  # (B, T, C)
        return self.dropout(self.c_proj(out), deterministic=deterministic)  # (B, T, C)


# ---------------------------------------------------------------------------------------------
# All heads in one batched op: the form that trains fast and samples with a KV cache


class CausalSelfAttention(nn.Module):
    """All heads in one batched op: one (C, 3C) projection for q, k, v (exercise 1, nanoGPT).

    One path for training and sampling: with a KV cache, this call's keys and values are written
    into it first, then the queries attend to every slot up to their own position.
    """

    config: GPTConfig

    def setup(self):
        cfg = self.config
        self.c_attn = dense(cfg, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = dense(cfg, cfg.n_embd, bias=cfg.bias, std=residual_std(cfg))
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def __call__(self, x, deterministic: bool = True, cache=None, pos=0):
        """x (B, T, C) at positions pos.. -> (y (B, T, C), cache).

        `cache` (sampling): (k, v), each (B, nh, block_size, hs), holding positions < pos (the
        last block_size of them, position p in slot p mod block_size); the returned one holds
        positions < pos + T. A call writes T slots from pos mod block_size on, so it needs
        pos + T <= block_size or T = 1 (past the window: rotary positions only, see
        `attention.attention_mask`). Training passes none and gets None back.
        """
        B, T, C = x.shape
        nh = self.config.n_head
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)  # 3 x (B, T, C)
        q, k, v = (t.reshape(B, T, nh, C // nh).swapaxes(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.config.position == "rope":  # rotate q and k by their positions
            q, k = attention.rope(q, pos + jnp.arange(T)), attention.rope(k, pos + jnp.arange(T))
        if cache is not None:
            k, v = cache = update_cache(cache, k, v, pos)  # (B, nh, S, hs) each
        y = self.attend(q, k, v, pos, deterministic)  # (B, nh, T, hs)
        y = y.swapaxes(1, 2).reshape(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y), deterministic=deterministic), cache  # (B, T, C)

    def attend(self, q, k, v, pos, deterministic):
        """q (B, nh, T, hs), k, v (B, nh, S, hs) -> (B, nh, T, hs), query t at position pos + t."""
        cfg = self.config
        kernel = attention.kernel_for(cfg)
        if kernel and (deterministic or cfg.dropout == 0.0):
            return kernel(q, k, v, pos)  # a fused kernel has no attention dropout
        wei = attention.softmax_weights(q, k, pos)  # (B, nh, T, S)
        self.sow("intermediates", "attention", wei)  # kept only if asked (plot.attention_maps)
        wei = self.attn_dropout(wei, deterministic=deterministic)
        return wei @ v  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs)


def update_cache(cache, k, v, pos):
    """Write k, v (B, nh, T, hs) of positions pos.. into the fixed-shape cache (B, nh, S, hs)
    at slots pos mod S.. (a ring: past S the newest position replaces the oldest)."""
    k_cache, v_cache = cache
    slot = pos % k_cache.shape[2]
    k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), slot, axis=2)
    v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), slot, axis=2)
    return k, v


# ---------------------------------------------------------------------------------------------
# Computation, the Block, the GPT


class FeedForward(nn.Module):
    """A simple linear layer followed by a non-linearity: the per-token computation (MLP)."""

    config: GPTConfig

    def setup(self):
        cfg = self.config
        self.c_fc = dense(cfg, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = dense(cfg, cfg.n_embd, bias=cfg.bias, std=residual_std(cfg))
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, x, deterministic: bool = True):
        h = ACTIVATIONS[self.config.activation](self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(h), deterministic=deterministic)  # (B, T, C)


class Block(nn.Module):
    """Transformer block: communication followed by computation."""

    config: GPTConfig

    def setup(self):
        cfg = self.config
        self.ln_1 = layer_norm(cfg)
        self.attn = (CausalSelfAttention if cfg.attention == "fused" else MultiHeadAttention)(cfg)
        self.ln_2 = layer_norm(cfg)
        self.mlp = FeedForward(cfg)

    def __call__(self, x, deterministic: bool = True, cache=None, pos=0):
        """x (B, T, C) -> (x, cache): pre-LayerNorm, and residual connections (x + f(ln(x))
        keeps a clean gradient path through depth). The cache is CausalSelfAttention's."""
        if isinstance(self.attn, MultiHeadAttention):  # the lecture's form: never cached
            x = x + self.attn(self.ln_1(x), deterministic)  # (B, T, C)
        else:
            y, cache = self.attn(self.ln_1(x), deterministic, cache, pos)
            x = x + y  # (B, T, C)
        x = x + self.mlp(self.ln_2(x), deterministic)  # (B, T, C)
        return x, cache


class GPT(nn.Module):
    """Token + position embeddings, n_layer Blocks, a final LayerNorm, the language-model head."""

    config: GPTConfig

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init,
                            dtype=cfg.compute_dtype)
        if cfg.position == "learned":  # rotary positions live in the attention instead
            self.wpe = nn.Embed(cfg.block_size, cfg.n_embd, embedding_init=init,
                                dtype=cfg.compute_dtype)
        self.drop = nn.Dropout(cfg.dropout)
        block = nn.remat(Block, static_argnums=(2,)) if cfg.remat else Block
        self.h = [block(cfg) for _ in range(cfg.n_layer)]
        self.ln_f = layer_norm(cfg)
        if not cfg.tie_weights:  # the lecture's own output layer
            self.lm_head = dense(cfg, cfg.vocab_size, bias=cfg.lm_head_bias)

    def __call__(self, idx, deterministic: bool = True):
        """idx (B, T) -> logits (B, T, vocab)."""
        logits, _ = self._forward(idx, deterministic, [None] * self.config.n_layer, 0)
        return logits

    def decode(self, idx, cache, pos):
        """Sampling's step: idx (B, T) at positions pos..pos+T-1 -> (logits (B, T, vocab), the
        cache with their keys and values written). `cache` from sampling.init_cache."""
        if self.config.attention == "heads":
            raise UserError("the per-head (attention='heads') modules carry no KV cache: "
                            "sample through convert.fused(model, params)")
        logits, caches = self._forward(idx, True, list(cache), pos)
        return logits, tuple(caches)

    def _forward(self, idx, deterministic, caches: list, pos):
        cfg = self.config
        B, T = idx.shape
        if T > cfg.block_size:
            raise UserError(f"cannot forward a sequence of length {T}: block_size is only "
                            f"{cfg.block_size} (crop the input to the last block_size tokens)")
        tok_emb = self.wte(idx)  # (B, T, C)
        x = tok_emb  # (B, T, C) rope: positions enter through q and k in every attention
        if cfg.position == "learned":
            x = x + self.wpe(pos + jnp.arange(T))  # (B, T, C) + (T, C) pos_emb
        if cfg.embd_dropout:  # nanoGPT; the lecture's gpt.py adds the two with no dropout
            x = self.drop(x, deterministic=deterministic)  # (B, T, C)
        for i, block in enumerate(self.h):
            x, caches[i] = block(x, deterministic, caches[i], pos)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        # the output layer: the token embedding reused (nanoGPT, GPT-2), or the lecture's own
        logits = as_2d(self.wte.attend, x) if cfg.tie_weights else self.lm_head(x)  # (B, T, V)
        return logits.astype(jnp.float32), caches  # softmax and loss in float32 whatever dtype


# ---------------------------------------------------------------------------------------------
# The layers the modules are made of

ACTIVATIONS = {
    "relu": nn.relu,  # the lecture
    "gelu": lambda x: nn.gelu(x, approximate=False),  # nanoGPT (torch's nn.GELU(), exact erf)
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # GPT-2's original; cheaper backward
}


def as_2d(f, x: jax.Array) -> jax.Array:
    """`f` (a matmul on the last axis) applied to (..., C) as one (N, C) matmul.

    Same math; XLA:CPU's backward of a dense layer on 3-D activations (dW contracting over B and
    T) is ~2.5x slower than on a flattened 2-D one, and flattening costs nothing on GPU/TPU.
    """
    return f(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class Dense(nn.Dense):
    """nn.Dense (torch's nn.Linear), run on (..., C) inputs as one 2-D matmul (`as_2d`)."""

    @nn.compact
    def __call__(self, x):
        return as_2d(super().__call__, x)


def dense(config: GPTConfig, features: int, *, bias: bool, std: float = 0.02) -> Dense:
    """A linear layer with GPT-2's init (normal(std), zero bias), float32 params."""
    return Dense(features, use_bias=bias, dtype=config.compute_dtype, param_dtype=jnp.float32,
                 kernel_init=nn.initializers.normal(std), bias_init=nn.initializers.zeros)


def residual_std(config: GPTConfig) -> float:
    # GPT-2: scale the init of projections that write into the residual stream by
    # 1/sqrt(2 * n_layer), since each of the n_layer blocks adds two of them to it. The
    # lecture's gpt.py inits every Linear with normal(0.02).
    return 0.02 / math.sqrt(2 * config.n_layer) if config.scale_residual_init else 0.02


def layer_norm(config: GPTConfig) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_bias=config.bias, dtype=config.compute_dtype,
                        param_dtype=jnp.float32)


# ---------------------------------------------------------------------------------------------
# A run's model


def make_model(config, vocab_size: int) -> nn.Module:
    """The module a run's config asks for (`config.model`: gpt | bigram)."""
    gpt_config = GPTConfig.from_config(config, vocab_size)
    return BigramLanguageModel(gpt_config) if config.model == "bigram" else GPT(gpt_config)


def count_params(params, non_embedding: bool = True) -> int:
    """Parameter count; nanoGPT's way (without position embeddings) by default, the lecture's
    (`sum(p.numel() for p in m.parameters())`: every parameter) with non_embedding=False."""
    n = sum(p.size for p in jax.tree.leaves(params))
    if non_embedding and "wpe" in params:
        n -= params["wpe"]["embedding"].size
    return n
