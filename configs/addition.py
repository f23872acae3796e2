"""The lecture's exercise 2: train a GPT to add two numbers, `a+b=c`.

Problems of 2-digit numbers (10,000 of them; 500, 5 %, held out and never trained on), c's
digits reversed so the model writes them in the order a carry is computed. The loss counts c's
digits only; every eval also reports the exact-match accuracy on the held-out problems (greedy
decoding of c).

    python train.py --config configs/addition.py --workdir runs/addition
    python sample.py --workdir runs/addition --start "12+34=" --max_new_tokens 3 --temperature 0
"""

from jaxgpt.config import base_config


def get_config():
    c = base_config()
    c.dataset = "addition"
    c.addition.digits = 2
    c.addition.reverse = True
    c.addition.eval_problems = 500
    c.block_size = 3 * c.addition.digits + 2  # a+b=c without its last digit: the model's input
    c.n_layer = 2
    c.n_head = 4
    c.n_embd = 64
    c.dropout = 0.0
    c.bias = False
    c.batch_size = 64
    c.learning_rate = 1e-3
    c.max_iters = 2000
    c.warmup_iters = 100
    c.min_lr = 1e-4
    c.beta2 = 0.99
    c.eval_interval = 250
    c.eval_iters = 20
    c.log_interval = 50
    c.steps_per_call = 50
    return c
