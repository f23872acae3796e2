"""nanoGPT's config/eval_gpt2_large.py: configs/eval_gpt2.py for OpenAI's gpt2-large (774M params:
n_layer=36, n_head=20, n_embd=1280)."""

from configs import eval_gpt2


def get_config():
    c = eval_gpt2.get_config()
    c.init_from = "gpt2-large"
    return c
