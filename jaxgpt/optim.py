"""The optimizer: global-norm clipping -> AdamW under nanoGPT's warmup + cosine schedule."""

import jax
import optax

from jaxgpt.config import lr_decay_iters


def lr_schedule(config) -> optax.Schedule:
    """nanoGPT's get_lr(it) as optax schedules: linear warmup from lr / (warmup + 1) (nanoGPT's
    lr * (it + 1) / (warmup + 1)), cosine down to min_lr at lr_decay_iters, then min_lr."""
    lr = config.learning_rate
    if not config.decay_lr:
        return optax.constant_schedule(lr)
    warmup, decay_iters = config.warmup_iters, lr_decay_iters(config)
    if decay_iters <= warmup:  # nanoGPT: past the warmup, past lr_decay_iters too: min_lr
        return optax.join_schedules([optax.linear_schedule(lr / (warmup + 1), lr, warmup),
                                     optax.constant_schedule(config.min_lr)], [warmup])
    return optax.warmup_cosine_decay_schedule(
        init_value=lr / (warmup + 1), peak_value=lr, warmup_steps=warmup,
        decay_steps=decay_iters, end_value=config.min_lr)


def decay_mask(params):
    """As nanoGPT: every >= 2-D tensor (matmul weights, embeddings) decays; biases and
    LayerNorm parameters don't."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config) -> optax.GradientTransformation:
    # decay_all: torch.optim.AdamW(model.parameters()) as the lecture, every tensor decays
    adamw = optax.adamw(lr_schedule(config), b1=config.beta1, b2=config.beta2, eps=1e-8,
                        weight_decay=config.weight_decay,
                        mask=None if config.decay_all else decay_mask)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw
