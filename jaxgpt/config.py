"""Every config key with its default (nanoGPT's names and values), and their validation.

Recipes in `configs/` start from `base_config()` and change what differs, so a misspelled
override (`--config.n_embed=...`) is rejected by ml_collections before anything compiles.
"""

import ml_collections

from jaxgpt.errors import UserError
from jaxgpt.model import GPTConfig

MODELS = ("gpt", "bigram")
# this workdir's own checkpoints (auto: resume if WORKDIR has one); anything else names weights
# to start from (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a path: see pretrained.py)
INIT_FROM = ("auto", "scratch", "resume")
PARAM_COUNTS = ("nanogpt", "all")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # data
    c.dataset = "shakespeare_char"
    c.data_path = ""  # a local UTF-8 text file instead of downloading (offline machines, CI)
    c.data_dir = ""  # where downloads / prepared tokens live ("" = ~/.cache/jaxgpt)
    c.vocab_path = ""  # char datasets: a text whose characters join the vocabulary too
    # dataset=addition (the lecture's exercise 2, jaxgpt/addition.py): a+b=c of `digits`-digit
    # numbers, c written least significant digit first if `reverse`, `eval_problems` held out
    c.addition = ml_collections.ConfigDict({"digits": 2, "reverse": False, "eval_problems": 500})
    # model (nanoGPT's GPTConfig, plus the lecture's variants)
    c.model = "gpt"
    c.block_size = 1024
    c.vocab_size = 0  # 0 = take it from the tokenizer
    c.n_layer = 12
    c.n_head = 12
    c.n_embd = 768
    c.dropout = 0.0
    c.bias = True
    c.attention = "fused"
    c.attention_impl = "softmax"
    c.activation = "gelu"
    c.tie_weights = True
    c.lm_head_bias = False  # a bias in the untied lm_head (the lecture's nn.Linear)
    c.embd_dropout = True  # dropout on tok_emb + pos_emb (nanoGPT); the lecture has none
    c.scale_residual_init = True  # GPT-2's residual-projection init; the lecture: all 0.02
    c.position = "learned"  # learned position embeddings (wpe) | "rope": rotary q and k, whose
    # KV cache keeps decoding past block_size one token at a time (docs/sampling.md)
    c.dtype = "auto"  # compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU); params float32
    c.remat = False  # jax.checkpoint each Block (memory for compute)
    # optimizer (nanoGPT's train.py defaults)
    c.learning_rate = 6e-4
    c.max_iters = 600000
    c.weight_decay = 1e-1
    c.beta1 = 0.9
    c.beta2 = 0.95
    c.grad_clip = 1.0  # 0 disables
    c.decay_lr = True
    c.warmup_iters = 2000
    c.lr_decay_iters = ml_collections.config_dict.placeholder(int)  # None: = max_iters
    c.min_lr = 6e-5
    c.decay_all = False  # True: decay every param (torch's AdamW on model.parameters(), the
    # lecture); False: only >= 2-D weights (nanoGPT)
    # loop
    c.batch_size = 12
    c.gradient_accumulation_steps = 1
    c.eval_interval = 2000
    c.eval_iters = 200
    c.eval_before_last_step = False  # True: the lecture's loop (evals at iter % eval_interval
    # == 0 or iter == max_iters - 1, each before that iter's step: the last after max_iters-1
    # steps); False: nanoGPT's (the last eval after all max_iters steps)
    c.param_count = "nanogpt"  # printed count: "nanogpt" (no position embeddings) | "all" (the
    # lecture's `sum(p.numel() ...)`, printed as gpt.py does)
    c.log_interval = 1
    c.steps_per_call = 1  # optimizer steps per compiled call (lax.scan): no Python between them
    c.seed = 1337
    c.init_from = "auto"  # scratch refuses a workdir with checkpoints; resume requires one;
    # gpt2 | gpt2-medium | gpt2-large | gpt2-xl | PATH: start from those weights (finetuning)
    c.pretrained_dir = ""  # OpenAI's GPT-2 weights on disk ("" = the Hugging Face cache)
    c.eval_only = False  # evaluate the loaded model once (train and val loss), then stop
    c.always_save_checkpoint = True
    c.keep_best = 1
    c.profile_steps = 0  # > 0: a jax.profiler trace of that many steps after warm-up, in WORKDIR
    c.wandb_log = False  # nanoGPT's W&B keys (pip install 'jaxgpt[wandb]')
    c.wandb_project = "jaxgpt"
    c.wandb_run_name = ""  # "" = W&B's own name
    # devices: sizes of the mesh axes, -1 = all remaining devices
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    return c


def lr_decay_iters(config) -> int:
    """Where the cosine reaches min_lr: `lr_decay_iters` if a recipe or flag sets it, else
    max_iters (nanoGPT: "should be ~= max_iters"), so --config.max_iters=N alone stays coherent."""
    return config.lr_decay_iters or config.max_iters


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise a UserError naming the key and what to do, for values no run can use.

    The model keys are checked by building the model's config (GPTConfig owns those checks).
    """
    _one_of(config, "model", MODELS)  # init_from: pretrained.source checks names and paths
    _one_of(config, "param_count", PARAM_COUNTS)
    try:
        GPTConfig.from_config(config, vocab_size=1)
    except UserError as e:
        raise UserError(f"config.{e}") from None
    for key in ("batch_size", "max_iters", "eval_interval", "eval_iters", "log_interval",
                "gradient_accumulation_steps", "steps_per_call", "keep_best"):
        if config[key] <= 0:
            raise UserError(f"config.{key}={config[key]}: must be a positive integer")
    if config.learning_rate <= 0 or config.min_lr < 0:
        raise UserError("config.learning_rate must be > 0 and config.min_lr >= 0")
    if config.grad_clip < 0 or config.weight_decay < 0:
        raise UserError("config.grad_clip and config.weight_decay must be >= 0")


def _one_of(config, key, allowed):
    if config[key] not in allowed:
        raise UserError(f"config.{key}={config[key]!r}: must be one of {', '.join(allowed)}")
