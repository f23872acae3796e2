"""The lecture's gpt.py: one `Head` module per head, ReLU, untied lm_head, biases, AdamW at a
constant 3e-4 (torch defaults: betas 0.9/0.999, weight decay 0.01), no clipping.

Two nanoGPT habits stay: weight decay skips biases and LayerNorms (torch's AdamW in the
lecture decays every tensor) and the residual projections get the 1/sqrt(2 n_layer) init. The
lecture reports val loss 1.48 after 5000 iterations.
"""

from jaxgpt.config import base_config


def get_config():
    c = base_config()
    c.dataset = "shakespeare_char"
    c.batch_size = 64  # how many independent sequences will we process in parallel?
    c.block_size = 256  # what is the maximum context length for predictions?
    c.max_iters = 5000
    c.eval_interval = 500
    c.learning_rate = 3e-4
    c.decay_lr = False
    c.eval_iters = 200
    c.n_embd = 384
    c.n_head = 6
    c.n_layer = 6
    c.dropout = 0.2
    c.attention = "heads"
    c.activation = "relu"
    c.tie_weights = False
    c.bias = True
    c.weight_decay = 0.01  # torch.optim.AdamW's default
    c.beta2 = 0.999
    c.grad_clip = 0.0
    c.warmup_iters = 0
    c.log_interval = 100
    c.steps_per_call = 10
    return c
