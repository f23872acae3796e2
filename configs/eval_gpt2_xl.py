"""nanoGPT's config/eval_gpt2_xl.py: configs/eval_gpt2.py for OpenAI's gpt2-xl (1558M params:
n_layer=48, n_head=25, n_embd=1600)."""

from configs import eval_gpt2


def get_config():
    c = eval_gpt2.get_config()
    c.init_from = "gpt2-xl"
    return c
