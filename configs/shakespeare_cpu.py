"""nanoGPT's documented CPU recipe for shakespeare_char (README: "I only have a macbook").

train_shakespeare_char with --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 --eval_iters=20.
nanoGPT reaches val loss ~1.88 with it.
"""

from configs import shakespeare


def get_config():
    c = shakespeare.get_config()
    c.block_size = 64
    c.batch_size = 12
    c.n_layer = 4
    c.n_head = 4
    c.n_embd = 128
    c.max_iters = 2000
    c.lr_decay_iters = 2000
    c.dropout = 0.0
    c.eval_iters = 20
    return c
