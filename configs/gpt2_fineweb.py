"""GPT-2 124M on FineWeb-Edu's 10B-token sample: build-nanogpt's train_gpt2.py run.

build-nanogpt (Karpathy, "Let's reproduce GPT-2"): GPT-2 small with biases and the tanh GELU,
524,288 tokens per step (2**19: 512 sequences of 1024), max lr 6e-4 with 715 linear warm-up
steps and a cosine to 10 % (6e-5) at step 19,073 (one pass over the 10B tokens), AdamW
betas (0.9, 0.95), weight decay 0.1, clip 1.0; val loss and HellaSwag every 250 steps. It
reports about an hour on 8 A100s and HellaSwag above GPT-2 124M's 0.294.

Here `batch_size` is global: 32 x accumulation 16 = 512 sequences, and 32 divides over 1 GPU,
8 GPUs and the common TPU VM slices (4 chips: v4-8, v5p-8; 8: v5litepod-8, v6e-8).

The val loss is a fixed set (`fixed_val`): the first eval_iters x batch_size = 10,240 windows
of 1024 val tokens (10.5M tokens, build-nanogpt's 20 steps x 64 x 1024 on each of 8 GPUs), each
scored once, the same on any slice and after any resume, so runs compare across machines.

Data (once; `pip install -e ".[prepare]"`; 100M-token shards as build-nanogpt's fineweb.py):

  python -m jaxgpt.prepare --hf_dataset HuggingFaceFW/fineweb-edu --hf_config sample-10BT \
      ~/.cache/jaxgpt/fineweb-edu --shard_tokens 100000000

HellaSwag's validation file is scored at every eval from ~/.cache/jaxgpt/hellaswag/ (where
`python -m jaxgpt.hellaswag` downloads it once), or --config.hellaswag_path=PATH ("" for none).
"""

import os

from configs import gpt2

HELLASWAG = os.path.join(os.path.expanduser("~"), ".cache", "jaxgpt", "hellaswag",
                         "hellaswag_val.jsonl")


def get_config():
    c = gpt2.get_config()  # GPT-2 124M, vocab 50304, attention_impl auto, bf16 compute
    c.dataset = "fineweb-edu"
    c.bias = True  # build-nanogpt's nn.Linear and nn.LayerNorm keep theirs
    c.activation = "gelu_tanh"  # nn.GELU(approximate="tanh")
    c.batch_size = 32
    c.gradient_accumulation_steps = 16  # 32 x 16 x 1024 = 524,288 tokens per step
    c.learning_rate = 6e-4
    c.min_lr = 6e-5  # 10 % of the maximum
    c.warmup_iters = 715
    c.max_iters = 19073
    c.lr_decay_iters = 19073
    c.weight_decay = 0.1
    c.eval_interval = 250
    c.eval_iters = 320  # 320 x 32 windows of 1024: 10,485,760 val tokens
    c.fixed_val = True
    c.hellaswag_path = HELLASWAG
    c.log_interval = 10
    return c
