"""The lecture's gpt.py at a laptop CPU's size: the same model and training as lecture.py,
scaled down the way nanoGPT's CPU recipe scales train_shakespeare_char (4 layers, 4 heads,
128 wide, block 64, batch 12), with no dropout at this size, 2000 iterations.

    python train.py --config configs/lecture_cpu.py --config.data_path=input.txt
"""

from configs import lecture


def get_config():
    c = lecture.get_config()
    c.batch_size = 12
    c.block_size = 64
    c.n_layer = 4
    c.n_head = 4
    c.n_embd = 128
    c.dropout = 0.0
    c.learning_rate = 1e-3  # a small model takes a larger constant rate
    c.max_iters = 2000
    c.eval_interval = 250
    c.eval_iters = 20
    c.log_interval = 50
    c.steps_per_call = 50
    return c
