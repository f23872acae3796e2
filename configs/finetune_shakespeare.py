"""nanoGPT's config/finetune_shakespeare.py: OpenAI's GPT-2 XL finetuned on tiny Shakespeare.

Tiny Shakespeare in GPT-2's BPE (dataset `shakespeare`: 301,966 train tokens), batch 1 x 32
accumulation x 1024 tokens = 32,768 tokens per step, so 20 steps are ~2 epochs; a constant
3e-5 learning rate; eval every 5 steps, a checkpoint only when val loss improves.
The weights come from the Hugging Face cache or a download, or --config.pretrained_dir=DIR
offline; a smaller model: --config.init_from=gpt2 (or gpt2-medium, gpt2-large, a directory).
"""

from jaxgpt.config import base_config


def get_config():
    c = base_config()
    c.dataset = "shakespeare"
    c.init_from = "gpt2-xl"  # the largest GPT-2 (1558M params)
    c.eval_interval = 5
    c.eval_iters = 40
    c.always_save_checkpoint = False  # only save when val improves
    c.batch_size = 1
    c.gradient_accumulation_steps = 32
    c.max_iters = 20
    c.learning_rate = 3e-5  # finetune at a constant learning rate
    c.decay_lr = False
    return c
