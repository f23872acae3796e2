"""Attention's pieces below the modules: masks, rotary positions, and the implementations.

q (B, nh, T, hs) attends to k, v (B, nh, S, hs): S = T in training, S = block_size slots of the
KV cache in sampling, query t at position pos + t. model.py's attention modules call:

- `softmax_weights`: the explicit path, the lecture's `wei` (masked, softmaxed affinities): the
  modules apply dropout to it and `sow` it (`plot.attention_maps`), then take `wei @ v`;
- a fused kernel from `KERNELS` (`attention_impl`, "auto" resolved by `kernel_for`): one
  function `(q, k, v, pos) -> y`, no weights and no dropout (dropout-free recipes and
  inference). A new kernel is one entry here.
"""

import jax
import jax.numpy as jnp

from jaxgpt import splash
from jaxgpt.dtype import resolve_dtype
from jaxgpt.errors import UserError


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


def softmax_weights(q, k, pos=0) -> jax.Array:
    """The explicit path's weights: q (B, nh, T, hs), k (B, nh, S, hs) -> (B, nh, T, S), each
    row a softmax over the key slots query t may see, in q's dtype."""
    T, S = q.shape[-2], k.shape[-2]
    # affinities accumulated and kept in float32 even when q, k are bfloat16 / float16
    wei = jnp.matmul(q, k.swapaxes(-2, -1), preferred_element_type=jnp.float32)
    wei = wei * q.shape[-1] ** -0.5  # (B, nh, T, hs) @ (B, nh, hs, S) -> (B, nh, T, S)
    wei = jnp.where(attention_mask(T, S, pos), wei, -jnp.inf)  # (B, nh, T, S) no future
    return jax.nn.softmax(wei, axis=-1).astype(q.dtype)  # (B, nh, T, S)


def dot_product_attention(q, k, v, pos, *, implementation: str) -> jax.Array:
    """jax.nn.dot_product_attention ("xla": XLA's own fusion; "cudnn": cuDNN's flash kernel)."""
    T, S = q.shape[2], k.shape[2]
    q, k, v = (t.swapaxes(1, 2) for t in (q, k, v))  # (B, T|S, nh, hs) its layout
    mask = None if S == T else attention_mask(T, S, pos)  # S == T: plain causal
    y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=S == T,
                                     implementation=implementation)
    return y.swapaxes(1, 2)  # (B, nh, T, hs)


def xla(q, k, v, pos=0):
    return dot_product_attention(q, k, v, pos, implementation="xla")


def cudnn(q, k, v, pos=0):
    return dot_product_attention(q, k, v, pos, implementation="cudnn")


def splash_or_xla(q, k, v, pos=0):
    """The Pallas splash kernel (splash.py) where it takes the shape: keys = queries, a multiple
    of 128 (training, eval, the prefill); XLA's elsewhere (the KV cache's one-token steps)."""
    T, S = q.shape[2], k.shape[2]
    if S == T and splash.takes(T):
        return splash.attention(q, k, v, pos)  # (B, nh, T, hs) the scores stay on chip
    return xla(q, k, v, pos)


# attention_impl -> the fused kernel (q, k, v, pos) -> y; "softmax" is the explicit path
KERNELS = {"xla": xla, "cudnn": cudnn, "splash": splash_or_xla}


def kernel_for(config):
    """The fused kernel config.attention_impl names ("auto": splash.resolve_impl's choice for
    the platform being compiled for), or None for the explicit softmax path."""
    return KERNELS.get(splash.resolve_impl(config)[0])


def check(attention_impl: str, dtype: str, backend: str) -> None:
    """A kernel the backend cannot run is a UserError (a run's config.validate calls this with
    the backend it runs on)."""
    if attention_impl == "cudnn" and (backend != "gpu" or resolve_dtype(dtype) == "float32"):
        raise UserError("attention_impl='cudnn' needs a GPU and dtype bfloat16 or float16: "
                        "use attention_impl='xla' here")
