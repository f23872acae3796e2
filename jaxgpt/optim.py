"""The optimizer: global-norm clipping -> AdamW under nanoGPT's warmup + cosine schedule."""

import jax
import jax.numpy as jnp
import optax


def lr_schedule(config) -> optax.Schedule:
    """nanoGPT's get_lr(it), as a jittable function of the optimizer step count."""
    lr, min_lr = config.learning_rate, config.min_lr
    warmup, decay_iters = config.warmup_iters, config.lr_decay_iters
    if not config.decay_lr:
        return optax.constant_schedule(lr)

    def schedule(it):
        it = jnp.asarray(it, jnp.float32)
        warm = lr * (it + 1) / (warmup + 1)  # 1) linear warmup for warmup_iters steps
        ratio = jnp.clip((it - warmup) / (decay_iters - warmup), 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (lr - min_lr)  # 3) cosine
        # 2) past lr_decay_iters: min_lr (the cosine has reached it: ratio is clipped to 1)
        return jnp.where(it < warmup, warm, cosine)

    return schedule


def decay_mask(params):
    """As nanoGPT: every >= 2-D tensor (matmul weights, embeddings) decays; biases and
    LayerNorm parameters don't."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(config), b1=config.beta1, b2=config.beta2, eps=1e-8,
                        weight_decay=config.weight_decay, mask=decay_mask)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw
