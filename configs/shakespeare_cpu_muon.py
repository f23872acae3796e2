"""The CPU recipe (configs/shakespeare_cpu.py's model and batch) trained with Muon, tuned for
the least wall time to nanoGPT's CPU-recipe val loss.

Muon (jaxgpt/optim.py) on the blocks' 2-D kernels at muon_lr, the recipe's AdamW on the rest;
both on one short warm-up and a linear cool-down, over fewer steps than AdamW needs.
"""

from configs import shakespeare_cpu


def get_config():
    c = shakespeare_cpu.get_config()
    c.optimizer = "muon"
    c.muon_lr = 0.02
    c.max_iters = 550
    c.warmup_iters = 50
    c.decay_shape = "linear"
    c.eval_interval = 550  # an eval at the start and at the end only
    c.steps_per_call = 55  # divides 550
    return c
