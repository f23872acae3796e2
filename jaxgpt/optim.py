"""The optimizer: global-norm clipping -> AdamW under nanoGPT's warmup + cosine schedule, or
(`optimizer="muon"`) Muon on the transformer blocks' 2-D matmul kernels and that AdamW on the
rest (embeddings, the tied lm_head, LayerNorms, biases), as modded-nanogpt splits them."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxgpt.config import lr_decay_iters

# modded-nanogpt's quintic Newton–Schulz coefficients (optax's default too): one (a, b, c) for
# every iteration
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al. 2025, modded-nanogpt's current records): an (a, b, c) per iteration,
# each the best for the interval the previous ones leave, so the first k are Polar Express's
# k-step method; X is normalised by 1.02 ||X||_F (their safety factor)
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def ns_coefficients(kind: str, steps: int) -> tuple[tuple, float]:
    """(a, b, c) of each of `steps` iterations, and the normalisation's safety factor."""
    if kind == "polar_express":
        return POLAR_EXPRESS[:steps], 1.02
    return (NS_COEFFS,) * steps, 1.0


def lr_schedule(config, peak: float | None = None) -> optax.Schedule:
    """nanoGPT's get_lr(it) as optax schedules: linear warmup from lr / (warmup + 1) (nanoGPT's
    lr * (it + 1) / (warmup + 1)), cosine (or, decay_shape="linear", a straight line) down to
    min_lr at lr_decay_iters, then min_lr. `peak`: the same shape scaled to another peak (min_lr
    in proportion): Muon's group follows the recipe's schedule at muon_lr."""
    scale = 1.0 if peak is None else peak / config.learning_rate
    lr, min_lr = config.learning_rate * scale, config.min_lr * scale
    if not config.decay_lr:
        return optax.constant_schedule(lr)
    warmup, decay_iters = config.warmup_iters, lr_decay_iters(config)
    if decay_iters <= warmup:  # nanoGPT: past the warmup, past lr_decay_iters too: min_lr
        return optax.join_schedules([optax.linear_schedule(lr / (warmup + 1), lr, warmup),
                                     optax.constant_schedule(min_lr)], [warmup])
    if config.decay_shape == "linear":
        return optax.join_schedules([
            optax.linear_schedule(lr / (warmup + 1), lr, warmup),
            optax.linear_schedule(lr, min_lr, decay_iters - warmup)], [warmup])
    return optax.warmup_cosine_decay_schedule(
        init_value=lr / (warmup + 1), peak_value=lr, warmup_steps=warmup,
        decay_steps=decay_iters, end_value=min_lr)


def decay_mask(params):
    """As nanoGPT: every >= 2-D tensor (matmul weights, embeddings) decays; biases and
    LayerNorm parameters don't."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(config) -> optax.GradientTransformation:
    # decay_all: torch.optim.AdamW(model.parameters()) as the lecture, every tensor decays
    return optax.adamw(lr_schedule(config), b1=config.beta1, b2=config.beta2, eps=1e-8,
                       weight_decay=config.weight_decay,
                       mask=None if config.decay_all else decay_mask)


def make_optimizer(config) -> optax.GradientTransformation:
    tx = adamw(config) if config.optimizer == "adamw" else optax.partition(
        {"muon": muon(config), "adamw": adamw(config)}, muon_labels)
    if config.grad_clip > 0:  # the global norm of every gradient, before any split
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    return tx


# ---------------------------------------------------------------------------------------------
# Muon: momentum orthogonalised by Newton–Schulz (Keller Jordan, modded-nanogpt)


def is_muon_param(path, p) -> bool:
    """The transformer blocks' 2-D matmul kernels: h_i/attn/c_attn, h_i/attn/c_proj,
    h_i/mlp/c_fc, h_i/mlp/c_proj, and the lecture's h_i/attn/heads_j/{key,query,value}."""
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return str(names[0]).startswith("h_") and names[-1] == "kernel" and p.ndim == 2


def muon_labels(params):
    """"muon" for the blocks' 2-D kernels, "adamw" for the rest (embeddings, the lm_head,
    LayerNorms, biases)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: "muon" if is_muon_param(path, p) else "adamw", params)


def muon(config) -> optax.GradientTransformation:
    """Muon's group: orthogonalised Nesterov momentum, shape-scaled, decoupled weight decay
    (times the learning rate, as torch), at muon_lr on the recipe's schedule shape."""
    return optax.chain(
        scale_by_muon(config.muon_momentum, config.muon_ns_steps, config.muon_nesterov,
                      config.muon_scale, coeffs=config.muon_ns_coeffs),
        optax.add_decayed_weights(config.muon_weight_decay),
        optax.scale_by_learning_rate(lr_schedule(config, peak=config.muon_lr)))


def newton_schulz(g, steps: int, eps: float = 1e-8, coeffs: str = "quintic"):
    """G (m, n) -> ≈ U V^T of G's SVD: modded-nanogpt's quintic iteration on G / ||G||_F, run on
    the wide orientation (m <= n) so X X^T is the smaller (m, m) Gram matrix; `coeffs`
    "quintic" (fixed coefficients) or "polar_express" (one set per iteration)."""
    per_step, safety = ns_coefficients(coeffs, steps)
    x = g.T if g.shape[0] > g.shape[1] else g  # (m, n), m <= n
    x = x / (jnp.linalg.norm(x) * safety + eps)  # spectral norm <= 1
    for a, b, c in per_step:
        A = x @ x.T  # (m, m)
        B = b * A + c * A @ A  # (m, m)
        x = a * x + B @ x  # (m, n)
    return x.T if g.shape[0] > g.shape[1] else x


def shape_scale(shape, kind: str) -> float:
    """Scale of an orthogonalised update of a (fan_in, fan_out) kernel: "width" sqrt(max(1,
    fan_out / fan_in)) (Keller Jordan's Muon), "rms" 0.2 sqrt(max(fan_in, fan_out)) (Moonshot:
    AdamW's update RMS, so AdamW's lr carries over), "none" 1."""
    fan_in, fan_out = shape
    return {"width": max(1.0, fan_out / fan_in) ** 0.5,
            "rms": 0.2 * max(fan_in, fan_out) ** 0.5, "none": 1.0}[kind]


class MuonState(NamedTuple):
    count: jax.Array  # () int32
    mu: optax.Updates  # the momentum, shaped (and sharded) like the params


def scale_by_muon(beta: float = 0.95, ns_steps: int = 5, nesterov: bool = True,
                  scale: str = "width", eps: float = 1e-8,
                  coeffs: str = "quintic") -> optax.GradientTransformation:
    """optax.contrib.scale_by_muon's update (the same bias-corrected Nesterov momentum), then
    `shape_scale`, on 2-D leaves."""
    # optax's own reshapes every matrix to (1, m, n) and vmaps its Newton–Schulz: XLA CPU then
    # materialises a transposed copy of X for each batched X @ X^T (two per iteration), where
    # a 2-D X @ X^T is one dot contracting both operands on their last axis: ~2x the time here.

    def init(params):
        return MuonState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)  # beta m + (1 - beta) g
        count = optax.safe_increment(state.count)
        if nesterov:  # beta m_hat(t + 1) + (1 - beta) g_hat(t), each bias-corrected
            mu_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g,
                                  optax.tree.bias_correction(mu, beta, count + 1),
                                  optax.tree.bias_correction(updates, beta, count))
        else:
            mu_hat = optax.tree.bias_correction(mu, beta, count)
        updates = jax.tree.map(
            lambda m: newton_schulz(m, ns_steps, eps, coeffs) * shape_scale(m.shape, scale),
            mu_hat)
        return updates, MuonState(count, mu)

    return optax.GradientTransformation(init, update)


def newton_schulz_flops(params, steps: int) -> int:
    """FLOPs of one step's Newton–Schulz over the Muon group: per (m, n) matrix, m <= n, and
    iteration, X X^T (2 m^2 n), A A (2 m^3), B X (2 m^2 n)."""
    total = 0
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        if is_muon_param(path, p):
            m, n = sorted(p.shape)
            total += steps * (4 * m * m * n + 2 * m**3)
    return total
