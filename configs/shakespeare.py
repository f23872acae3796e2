"""nanoGPT's train_shakespeare_char: a baby GPT (6 layers, 6 heads, 384) on tiny Shakespeare.

Best val loss 1.4697 in nanoGPT's README (about 3 minutes on an A100).
"""

from jaxgpt.config import base_config


def get_config():
    c = base_config()
    c.dataset = "shakespeare_char"
    c.eval_interval = 250  # keep frequent because we'll overfit
    c.eval_iters = 200
    c.log_interval = 10
    c.always_save_checkpoint = False  # only save when val improves
    c.gradient_accumulation_steps = 1
    c.batch_size = 64
    c.block_size = 256  # context of up to 256 previous characters
    c.n_layer = 6
    c.n_head = 6
    c.n_embd = 384
    c.dropout = 0.2
    c.learning_rate = 1e-3  # with baby networks can afford to go a bit higher
    c.max_iters = 5000
    c.min_lr = 1e-4  # learning_rate / 10 usually
    c.beta2 = 0.99  # make a bit bigger because number of tokens per iter is small
    c.warmup_iters = 100  # not super necessary potentially
    # --config.optimizer=muon: Muon on the blocks' 2-D kernels (muon_lr 0.02 on this schedule's
    # shape), this AdamW on the rest. Not measured on an accelerator; on the CPU recipe's model
    # it reached AdamW's val loss in ~1/4 of the steps (configs/shakespeare_cpu_muon.py).
    c.optimizer = "adamw"
    c.bias = False
    c.steps_per_call = 10
    return c
