"""nanoGPT's config/eval_gpt2.py: the loss of OpenAI's gpt2 (124M params: n_layer=12,
n_head=12, n_embd=768) on OpenWebText, no training (eval_only).

Prepared OpenWebText bins as for configs/gpt2.py; any other data with --config.dataset (e.g.
shakespeare). 500 batches of 8 x 1024 tokens per split.
"""

from jaxgpt.config import base_config


def get_config():
    c = base_config()
    c.dataset = "openwebtext"
    c.init_from = "gpt2"
    c.eval_only = True
    c.batch_size = 8  # divides over 1, 4 and 8 devices (every slice of tests/test_gpt2_recipes)
    c.attention_impl = "auto"  # the splash kernel on a TPU, xla elsewhere (no dropout: eval)
    c.eval_iters = 500  # use more iterations to get a good estimate
    return c
