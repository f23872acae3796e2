"""The lecture's bigram.py: a lookup table of next-token logits (val loss ~2.5)."""

from jaxgpt.config import base_config


def get_config():
    c = base_config()
    c.dataset = "shakespeare_char"
    c.model = "bigram"
    c.batch_size = 32
    c.block_size = 8
    c.max_iters = 3000
    c.eval_interval = 300
    c.learning_rate = 1e-2
    c.decay_lr = False
    c.eval_iters = 200
    c.weight_decay = 0.01  # torch.optim.AdamW's default
    c.beta2 = 0.999
    c.grad_clip = 0.0
    c.warmup_iters = 0
    c.log_interval = 100
    c.steps_per_call = 100
    return c
