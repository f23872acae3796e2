"""The CPU recipe (configs/shakespeare_cpu.py's model and batch) trained with Muon, tuned for
the least wall time to nanoGPT's CPU-recipe val loss.

Muon (jaxgpt/optim.py) on the blocks' 2-D kernels at muon_lr, AdamW at learning_rate on the rest
(embeddings, the tied lm_head, LayerNorms, biases) with beta1 0.8 (modded-nanogpt's for its
Adam group); both on one short warm-up (10 steps) and a linear cool-down to a tenth of the peak,
over less than a quarter of AdamW's steps. Tuned on seeds 1337, 1 and 2 (docs/performance.md):
3 Newton–Schulz steps with Polar Express's per-step coefficients reach the loss of 4 quintic
ones (3 quintic ones did not), and the eval before the first step is skipped (only the final
loss is wanted).
"""

from configs import shakespeare_cpu


def get_config():
    c = shakespeare_cpu.get_config()
    c.optimizer = "muon"
    c.muon_lr = 0.03
    c.muon_ns_coeffs = "polar_express"
    c.muon_ns_steps = 3
    c.muon_momentum = 0.9  # 0.95 (modded-nanogpt's) averages over too many of so few steps
    c.learning_rate = 3e-3  # the AdamW group's peak: 3x the recipe's
    c.beta1 = 0.8  # the AdamW group's momentum averages ~5 steps, not ~10, of so few
    c.min_lr = 3e-4
    c.max_iters = 440
    c.warmup_iters = 10
    c.decay_shape = "linear"
    c.eval_interval = 440  # one eval, at the end
    c.eval_at_start = False
    c.steps_per_call = 44  # divides 440
    return c
