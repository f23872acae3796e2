"""The lecture's GPT, chapter by chapter, as flax.linen modules: pure functions of `params`.

bigram -> attention as a weighted average -> one `Head` -> `MultiHeadAttention` -> all heads in
one batched op (`CausalSelfAttention`, the lecture's exercise 1 and nanoGPT's form) ->
`FeedForward` -> `Block` (residuals, pre-LayerNorm, dropout) -> `GPT`.

Submodule names follow nanoGPT/GPT-2 (`wte`, `wpe`, `h_0`, `c_attn`, `c_proj`, `ln_f`) so weights
import by name (see convert.py). Sampling's KV cache lives in `CausalSelfAttention` alone: it is
passed in and returned as a value, and a `heads` model is sampled through its fused form
(`fused`, below). Every head's softmax weights come out through `attention_maps`.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt import splash
from jaxgpt.errors import UserError

ACTIVATIONS = {
    "relu": nn.relu,  # the lecture
    "gelu": lambda x: nn.gelu(x, approximate=False),  # nanoGPT (torch's nn.GELU(), exact erf)
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # GPT-2's original; cheaper backward
}
ATTENTIONS = ("fused", "heads")  # one batched op (exercise 1, nanoGPT) | one `Head` per head
# explicit softmax | jax.nn.dot_product_attention | Pallas splash (TPU) | auto (splash.resolve_impl)
ATTENTION_IMPLS = ("softmax", "xla", "cudnn", "splash", "auto")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: by the device (auto_dtype)
POSITIONS = ("learned", "rope")  # a learned embedding per position (wpe) | rotary q and k


def auto_dtype(device=None) -> tuple[str, str]:
    """(compute dtype, why) that dtype="auto" picks for `device` (default: the first device).

    bfloat16 where the chip multiplies it fast: TPUs, and NVIDIA GPUs from compute capability
    8.0 (Ampere: A100, RTX 30, L4, H100). Before Ampere (T4, V100, RTX 20: 7.x) there is no fast
    bfloat16, but float16 tensor cores: float16, trained with dynamic loss scaling (step.py),
    as nanoGPT falls back to float16 + GradScaler. Below 7.0 (P100, GTX 10) float16 has no
    tensor cores and on most of those cards a fraction of float32's rate: float32. A CPU
    emulates bfloat16 (slower than float32): float32.
    """
    device = device or jax.devices()[0]
    if device.platform == "tpu":
        return "bfloat16", "a TPU multiplies bfloat16 natively"
    if device.platform != "gpu":
        return "float32", "a CPU has no fast bfloat16 or float16 matmul"
    cc = getattr(device, "compute_capability", None)  # "8.0" on CUDA; none on ROCm
    if cc is None:
        return "bfloat16", f"{device.device_kind} has bfloat16 matmuls"
    major, minor = (int(v) for v in str(cc).split(".")[:2])
    if (major, minor) >= (8, 0):
        return "bfloat16", f"{device.device_kind} (compute capability {cc}) has bfloat16 cores"
    if major >= 7:
        return "float16", (f"{device.device_kind} (compute capability {cc}) has no fast "
                           "bfloat16 but float16 tensor cores: float16 with dynamic loss scaling")
    return "float32", (f"{device.device_kind} (compute capability {cc}) has no tensor cores, "
                       "and float16 is slow on most such cards")


def resolve_dtype(name: str, device=None) -> str:
    """The compute dtype a config's `dtype` names: "auto" is auto_dtype's choice."""
    return auto_dtype(device)[0] if name == "auto" else name


def _one_of(key, value, allowed):
    if value not in allowed:
        raise UserError(f"{key}={value!r}: must be one of {', '.join(allowed)}")


def _key(default, *, weights: bool = False, nanogpt: bool = False):
    """A GPTConfig field. weights: the params depend on it, so a resumed run and a run started
    from trained weights must keep it; nanogpt: one of nanoGPT's `model_args`."""
    return dataclasses.field(default=default, metadata={"weights": weights, "nanogpt": nanogpt})


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The model's hyperparameters (nanoGPT's GPTConfig, plus the lecture's variants).

    The one list of model keys: config.py's defaults, the resume and pretrained checks and
    convert.py's nanoGPT args all read these fields. It owns the checks of every model key: a
    run's config is validated by building one.
    """

    # context length: the positions a token can look back over
    block_size: int = _key(1024, weights=True, nanogpt=True)
    # GPT-2's 50257 padded up to a multiple of 64, as nanoGPT (a run's config: 0 = the
    # tokenizer's size)
    vocab_size: int = _key(50304, weights=True, nanogpt=True)
    n_layer: int = _key(12, weights=True, nanogpt=True)
    n_head: int = _key(12, weights=True, nanogpt=True)
    n_embd: int = _key(768, weights=True, nanogpt=True)
    dropout: float = _key(0.0, nanogpt=True)
    # biases in Linears and LayerNorms, as GPT-2
    bias: bool = _key(True, weights=True, nanogpt=True)
    # "fused": all heads in one batched op (CausalSelfAttention, exercise 1, nanoGPT) |
    # "heads": one `Head` module per head (the lecture)
    attention: str = _key("fused", weights=True)
    # the fused path: explicit softmax | jax.nn.dot_product_attention ("xla", "cudnn") |
    # "splash" (Pallas, TPU; interpreted elsewhere) | "auto" (splash on a TPU if it fits, else xla)
    attention_impl: str = _key("softmax")
    # gelu (nanoGPT, exact erf) | gelu_tanh (GPT-2's original) | relu (the lecture)
    activation: str = _key("gelu", weights=True)
    # lm_head shares wte's weights (nanoGPT); the lecture has its own output layer
    tie_weights: bool = _key(True, weights=True)
    # a bias in the untied lm_head (the lecture's nn.Linear)
    lm_head_bias: bool = _key(False, weights=True)
    # dropout on tok_emb + pos_emb (nanoGPT); the lecture has none
    embd_dropout: bool = _key(True)
    # GPT-2's 1/sqrt(2 n_layer) init of residual projections; the lecture inits all at 0.02
    scale_residual_init: bool = _key(True)
    # "learned": a position table (wpe) added to tok_emb | "rope": q and k rotated (RoPE),
    # whose KV cache keeps decoding past block_size one token at a time (docs/sampling.md)
    position: str = _key("learned", weights=True)
    # compute dtype; "auto": by the device (auto_dtype: bfloat16 on TPUs and GPUs from Ampere,
    # float16 with loss scaling on older GPUs, float32 on CPUs); params are always float32
    dtype: str = _key("auto")
    # recompute each Block in the backward pass (jax.checkpoint): memory for compute
    remat: bool = _key(False)

    def __post_init__(self):
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) <= 0:
                raise UserError(f"{key}={getattr(self, key)}: must be a positive integer")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                            "pick n_embd a multiple of n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout={self.dropout}: must be in [0, 1)")
        _one_of("activation", self.activation, tuple(ACTIVATIONS))
        _one_of("attention", self.attention, ATTENTIONS)
        _one_of("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        splash.check(self)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("position", self.position, POSITIONS)
        if self.position == "rope" and self.head_size % 2:
            raise UserError(f"position='rope' rotates pairs of channels: head_size="
                            f"{self.head_size} (n_embd / n_head) must be even")
        if self.lm_head_bias and self.tie_weights:
            raise UserError("lm_head_bias=True needs an untied lm_head: set tie_weights=False "
                            "(the tied head is wte's transpose, with no bias)")
        if self.attention_impl == "cudnn" and (jax.default_backend() != "gpu" or
                                               resolve_dtype(self.dtype) == "float32"):
            raise UserError("attention_impl='cudnn' needs a GPU and dtype bfloat16 or float16: "
                            "use attention_impl='xla' here")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self):
        return jnp.dtype(resolve_dtype(self.dtype))

    @classmethod
    def keys(cls, marker: str | None = None) -> tuple[str, ...]:
        """The field names, in order; with a marker ("weights", "nanogpt") those it marks."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if marker is None or f.metadata[marker])

    @classmethod
    def from_config(cls, config, vocab_size: int) -> "GPTConfig":
        """The model part of a run's ml_collections config; `vocab_size` from the tokenizer."""
        names = set(cls.keys()) - {"vocab_size"}
        return cls(vocab_size=config.vocab_size or vocab_size, **{n: config[n] for n in names})


# the keys a run's params depend on: `model` (gpt | bigram) and GPTConfig's weight keys
WEIGHT_KEYS = ("model", *GPTConfig.keys("weights"))


# ---------------------------------------------------------------------------------------------
# Building blocks


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


def causal_mask(T: int) -> jax.Array:
    """(T, T) lower-triangular: position t may look at positions <= t, never the future."""
    return jnp.tril(jnp.ones((T, T), dtype=bool))


def attention_mask(T: int, S: int, pos=0) -> jax.Array:
    """(T, S): may query t, at position q = pos + t, look at key slot j?

    Keys live in S slots, position p in slot p mod S (a ring). Slot j then holds, for query q,
    position p_j = q - ((q - j) mod S), the newest position <= q written there: always one of
    the last S positions (q - S < p_j <= q), and visible if it exists (p_j >= 0). So:
    - training (S = T, pos = 0) and sampling within the window (pos + T <= S): slot j holds
      position j, visible iff j <= q: the causal mask (`causal_mask(T)` when S = T); slots past
      q hold padding or stale keys and stay hidden until they are overwritten;
    - decoding one token at a time past S (rotary positions only, see `rope`): every slot is
      visible and holds one of the last S positions: sliding-window attention of width S.
    """
    q = (pos + jnp.arange(T))[:, None]  # (T, 1) the queries' positions
    return q - (q - jnp.arange(S)[None, :]) % S >= 0  # (T, S)


def rope(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary position embedding (RoPE, Su et al. 2021) of x (..., T, hs) at positions (T,).

    Channel pairs (i, i + hs/2) are rotated by the angle position * 10000^(-2i/hs). A query at
    position m and a key at n then score q_m . k_n = f(q, k, m - n): attention sees relative
    positions only, so a key computed at its position stays valid however the window slides.
    """
    hs = x.shape[-1]
    theta = 10000.0 ** (-jnp.arange(0, hs, 2, dtype=jnp.float32) / hs)  # (hs/2,)
    angle = positions.astype(jnp.float32)[:, None] * theta  # (T, hs/2)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # (..., T, hs/2) each
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)  # (..., T, hs)
    return out.astype(x.dtype)


def weighted_average(x: jax.Array) -> jax.Array:
    """The lecture's "mathematical trick": every token averages itself and all earlier tokens.

    This is attention with all affinities equal: masked to the past, softmax-normalised, then
    a matrix product does the weighted sum. `Head` makes the affinities data-dependent.
    """
    T = x.shape[-2]
    wei = jnp.where(causal_mask(T), 0.0, -jnp.inf)  # (T, T) equal affinities, future masked
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
            k, q = rope(k, jnp.arange(T)), rope(q, jnp.arange(T))  # (B, T, hs) each
        # affinities, scaled by head_size ** -0.5 so their variance stays ~1 at init
        wei = q @ k.swapaxes(-2, -1) * k.shape[-1] ** -0.5  # (B, T, hs) @ (B, hs, T) -> (B, T, T)
        wei = jnp.where(causal_mask(T), wei, -jnp.inf)  # (B, T, T) a decoder: no future
        wei = jax.nn.softmax(wei.astype(jnp.float32), axis=-1).astype(x.dtype)  # (B, T, T)
        self.sow("intermediates", "attention", wei)  # kept only if asked (`attention_maps`)
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


def update_cache(cache, k, v, pos):
    """Write k, v (B, nh, T, hs) of positions pos.. into the fixed-shape cache (B, nh, S, hs)
    at slots pos mod S.. (a ring: past S the newest position replaces the oldest)."""
    k_cache, v_cache = cache
    slot = pos % k_cache.shape[2]
    k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), slot, axis=2)
    v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), slot, axis=2)
    return k, v


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
        `attention_mask`). Training passes none and gets None back.
        """
        B, T, C = x.shape
        nh = self.config.n_head
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)  # 3 x (B, T, C)
        q, k, v = (t.reshape(B, T, nh, C // nh).swapaxes(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.config.position == "rope":  # rotate q and k by their positions
            q, k = rope(q, pos + jnp.arange(T)), rope(k, pos + jnp.arange(T))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache = update_cache(cache, k, v, pos)  # (B, nh, S, hs) each
        y = self.attend(q, k, v, pos, deterministic)  # (B, nh, T, hs)
        y = y.swapaxes(1, 2).reshape(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y), deterministic=deterministic), cache  # (B, T, C)

    def attend(self, q, k, v, pos, deterministic):
        """q (B, nh, T, hs), k, v (B, nh, S, hs) -> (B, nh, T, hs), query t at position pos + t."""
        cfg = self.config
        T, S = q.shape[2], k.shape[2]
        impl = splash.resolve_impl(cfg)[0]  # "auto": splash on a TPU if it takes T, else xla
        fused = deterministic or cfg.dropout == 0.0  # the kernels have no attention dropout
        if impl == "splash" and fused and S == T and splash.takes(T):
            return splash.attention(q, k, v, pos)  # (B, nh, T, hs) scores kept on chip
        if impl != "softmax" and fused:
            # the fused kernel has no attention dropout: inference and dropout-free recipes
            q, k, v = (t.swapaxes(1, 2) for t in (q, k, v))  # (B, T|S, nh, hs) its layout
            mask = None if S == T else attention_mask(T, S, pos)  # S == T: plain causal
            y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=S == T,
                                             implementation="xla" if impl == "splash" else impl)
            return y.swapaxes(1, 2)  # (B, nh, T, hs)
        # affinities accumulated and kept in float32 even when q, k are bfloat16 / float16
        wei = jnp.matmul(q, k.swapaxes(-2, -1), preferred_element_type=jnp.float32)
        wei = wei * q.shape[-1] ** -0.5  # (B, nh, T, hs) @ (B, nh, hs, S) -> (B, nh, T, S)
        wei = jnp.where(attention_mask(T, S, pos), wei, -jnp.inf)  # (B, nh, T, S)
        wei = jax.nn.softmax(wei, axis=-1).astype(v.dtype)  # (B, nh, T, S)
        self.sow("intermediates", "attention", wei)  # kept only if asked (`attention_maps`)
        wei = self.attn_dropout(wei, deterministic=deterministic)
        return wei @ v  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs)


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
        if cache is not None and cfg.attention == "heads":
            raise UserError("the per-head (attention='heads') modules carry no KV cache: "
                            "sample through model.fused(model, params)")
        tok_emb = self.wte(idx)  # (B, T, C)
        x = tok_emb  # (B, T, C) rope: positions enter through q and k in every attention
        if cfg.position == "learned":
            x = x + self.wpe(pos + jnp.arange(T))  # (B, T, C) + (T, C) pos_emb
        if cfg.embd_dropout:  # nanoGPT; the lecture's gpt.py adds the two with no dropout
            x = self.drop(x, deterministic=deterministic)  # (B, T, C)
        caches = [None] * cfg.n_layer if cache is None else list(cache)
        for i, block in enumerate(self.h):
            x, caches[i] = block(x, deterministic, caches[i], pos)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        # the output layer: the token embedding reused (nanoGPT, GPT-2), or the lecture's own
        logits = as_2d(self.wte.attend, x) if cfg.tie_weights else self.lm_head(x)  # (B, T, V)
        logits = logits.astype(jnp.float32)  # softmax and loss in float32 whatever the dtype
        return logits if cache is None else (logits, tuple(caches))


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


def fuse_heads(attn: dict, config: GPTConfig) -> dict:
    """A `MultiHeadAttention`'s params as `CausalSelfAttention`'s: the heads' key, query and
    value kernels side by side in one (C, 3C) c_attn (q | k | v, head h at columns h*hs)."""
    kernel = [jnp.concatenate([attn[f"heads_{h}"][name]["kernel"] for h in range(config.n_head)],
                              axis=1) for name in ("query", "key", "value")]  # (C, C) each
    c_attn = {"kernel": jnp.concatenate(kernel, axis=1)}  # (C, 3C)
    if config.bias:  # the lecture's heads have no bias: zeros are the same function
        c_attn["bias"] = jnp.zeros(3 * config.n_embd, jnp.float32)
    return {"c_attn": c_attn, "c_proj": attn["c_proj"]}


def fused(model: nn.Module, params):
    """(model, params) of a `heads` GPT as the same function in fused form; others unchanged.

    The lecture's per-head modules carry no KV cache: sampling runs their weights through
    `CausalSelfAttention` instead.
    """
    if not isinstance(model, GPT) or model.config.attention == "fused":
        return model, params
    cfg = model.config
    params = {name: {**p, "attn": fuse_heads(p["attn"], cfg)} if name.startswith("h_") else p
              for name, p in params.items()}
    return GPT(dataclasses.replace(cfg, attention="fused")), params


def attention_maps(model: nn.Module, params, idx) -> jax.Array:
    """The softmax weights of every head of `model` (a GPT) on idx (T,) or (1, T) token ids:
    (n_layer, n_head, T, T) float32, row t the weights query t puts on keys 0..t.

    The attention modules `sow` their weights into the "intermediates" collection, stored only
    when asked for (`mutable=["intermediates"]`), so training and sampling keep none. The fused
    kernels (attention_impl "xla", "cudnn") compute no weights: the model is applied with the
    explicit softmax instead, the same function. A `heads` model's heads are stacked in order.
    """
    if not isinstance(model, GPT):
        raise UserError("attention maps need a GPT: the bigram model has no attention")
    idx = jnp.asarray(idx).reshape(1, -1)  # (1, T)
    model = GPT(dataclasses.replace(model.config, attention_impl="softmax"))
    _, state = model.apply({"params": params}, idx, mutable=["intermediates"])
    layers = [state["intermediates"][f"h_{i}"]["attn"] for i in range(model.config.n_layer)]
    if model.config.attention == "heads":  # one (1, T, T) per head
        maps = [jnp.stack([l[f"heads_{h}"]["attention"][0][0] for h in range(model.config.n_head)])
                for l in layers]  # n_layer x (nh, T, T)
    else:  # one (1, nh, T, T) per layer
        maps = [l["attention"][0][0] for l in layers]  # n_layer x (nh, T, T)
    return jnp.stack(maps).astype(jnp.float32)  # (n_layer, nh, T, T)


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
