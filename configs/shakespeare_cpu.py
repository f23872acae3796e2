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
    c.dropout = 0.0
    c.eval_iters = 20
    # A call's fixed host cost (dispatch, argument handling) is ~15 ms; on a 2-core CPU it
    # competes with XLA's two compute threads instead of hiding behind them. 50 steps per call
    # cuts it to ~0.3 ms/step (docs/performance.md: -5 % per step vs 10); 250 = eval_interval
    # divides.
    c.steps_per_call = 50
    return c
