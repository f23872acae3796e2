"""GPT-2 124M on OpenWebText: nanoGPT's config/train_gpt2.py, for a TPU VM or GPUs.

12 layers, 12 heads, 768 wide, block 1024, vocab 50304 (50257 padded to a multiple of 64).
nanoGPT: batch 12 x block 1024 x grad accum 5*8 (8 GPUs) = ~0.5M tokens per step, 600k steps
(~300B tokens), val loss ~2.85. Here `batch_size` is the global batch over all devices:
batch 32 x accum 15 is that same 491,520 tokens per step (480 sequences), and 32 divides over
1 GPU, 8 GPUs and the common TPU VM slices as written (v4-8 and v5p-8: 4 chips; v5litepod-8 and
v6e-8: 8; tests/test_gpt2_recipes.py), as configs/gpt2_fineweb.py's 32 x 16. Half as many
micro-batches as 16 x 30 read the weights half as often: on v5litepod-8 with splash attention
the compiler's roofline is 530 ms a step (MFU <= 50 %) against 653 ms (41 %) for 16 x 30
(docs/scaling.md). A GPU with less than ~40 GB takes batch_size=16 with accumulation 30 (an
estimate from the TPU compile's memory with xla attention, not measured on a GPU). On a pod raise
batch_size (a multiple of the device count) and lower the accumulation to keep the product;
`python -m jaxgpt.aot ... --fit` prints it.

Data: train.bin / val.bin (uint16 GPT-2 BPE, nanoGPT's format) in --config.data_dir (or
~/.cache/jaxgpt/openwebtext), read through np.memmap; write them with
`python -m jaxgpt.prepare TEXT_OR_DIR DIR --val_fraction 0.0005` (docs/scaling.md).
"""

from jaxgpt.config import base_config


def get_config():
    c = base_config()
    c.dataset = "openwebtext"
    # model: GPT-2 small
    c.n_layer = 12
    c.n_head = 12
    c.n_embd = 768
    c.block_size = 1024
    c.vocab_size = 50304  # GPT-2's 50257 padded up for fast matmuls (nanoGPT)
    c.dropout = 0.0  # for pretraining 0 is good
    c.bias = False  # nanoGPT's train.py default, which train_gpt2 keeps
    # auto: the Pallas splash kernel on a TPU (scores never leave the chip), xla elsewhere;
    # "cudnn" on GPUs (opt-in)
    c.attention_impl = "auto"
    c.dtype = "auto"  # bfloat16 compute on GPU/TPU, params and optimizer state float32
    c.remat = False  # --config.remat=True trades compute for memory (larger batch per device)
    # optimizer and schedule (nanoGPT's train.py defaults, which train_gpt2 keeps)
    c.batch_size = 32  # nanoGPT: 12 per GPU x 8 GPUs x 5; 480 sequences per step either way
    c.gradient_accumulation_steps = 15
    c.learning_rate = 6e-4
    c.max_iters = 600000
    c.warmup_iters = 2000
    c.min_lr = 6e-5
    c.weight_decay = 1e-1
    c.beta1 = 0.9
    c.beta2 = 0.95
    c.grad_clip = 1.0
    # --config.optimizer=muon: Muon (muon_lr 0.02, momentum 0.95, Nesterov, 5 Newton–Schulz
    # steps) on the blocks' 2-D kernels, the AdamW above on embeddings, LayerNorms, biases, as
    # modded-nanogpt's GPT-2 speedrun splits them; both follow this warmup + cosine shape. Not
    # measured on an accelerator: modded-nanogpt reached its loss in ~2/3 of AdamW's steps at
    # this size, so try a shorter max_iters. Newton–Schulz adds ≈ 1.5 TFLOP per step here
    # (48 matrices, 5 steps): 0.4 % of forward + backward's 6N x 491,520 tokens ≈ 366 TFLOP.
    c.optimizer = "adamw"
    # eval and logging
    c.eval_interval = 1000
    c.eval_iters = 200
    c.log_interval = 10
    c.steps_per_call = 10
    return c
