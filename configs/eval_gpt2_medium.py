"""nanoGPT's config/eval_gpt2_medium.py: configs/eval_gpt2.py for OpenAI's gpt2-medium (350M params:
n_layer=24, n_head=16, n_embd=1024)."""

from configs import eval_gpt2


def get_config():
    c = eval_gpt2.get_config()
    c.init_from = "gpt2-medium"
    return c
