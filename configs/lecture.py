"""The lecture's gpt.py: its model and its training, read beside gpt.py line for line.

Model: one `Head` module per head, ReLU, biases, an untied lm_head with a bias, no dropout on
tok_emb + pos_emb, every Linear and Embedding initialised normal(0.02) with zero biases (no
scaled residual init), float32. Training: torch.optim.AdamW(model.parameters(), lr=3e-4) --
constant rate, betas 0.9/0.999, weight decay 0.01 on every parameter, no clipping; evals at
iter % 500 == 0 and iter == max_iters - 1, each before that iter's step. It prints the
parameter count as gpt.py does (10.788929 M). The lecture reports val loss 1.48.
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
    c.eval_iters = 200
    c.n_embd = 384
    c.n_head = 6
    c.n_layer = 6
    c.dropout = 0.2
    # the model as gpt.py builds it
    c.attention = "heads"
    c.activation = "relu"
    c.bias = True
    c.tie_weights = False
    c.lm_head_bias = True  # nn.Linear(n_embd, vocab_size)
    c.embd_dropout = False  # x = tok_emb + pos_emb
    c.scale_residual_init = False  # _init_weights: normal(0.02) for every Linear
    c.dtype = "float32"  # torch's default everywhere, also on a GPU
    # torch.optim.AdamW's defaults, on model.parameters()
    c.decay_lr = False
    c.warmup_iters = 0
    c.beta2 = 0.999
    c.weight_decay = 0.01
    c.decay_all = True
    c.grad_clip = 0.0
    # the loop
    c.eval_before_last_step = True  # `iter % eval_interval == 0 or iter == max_iters - 1`
    c.param_count = "all"  # print(sum(p.numel() for p in m.parameters())/1e6, 'M parameters')
    c.log_interval = 100
    c.steps_per_call = 10
    return c
