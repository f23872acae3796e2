"""Every config key with its default (nanoGPT's names and values), and their validation.

Recipes in `configs/` start from `base_config()` and change what differs, so a misspelled
override (`--config.n_embed=...`) is rejected by ml_collections before anything compiles.
"""

import jax
import ml_collections

from jaxgpt.errors import UserError

MODELS = ("gpt", "bigram")
ATTENTIONS = ("fused", "heads")  # one batched op (exercise 1, nanoGPT) | one `Head` per head
ATTENTION_IMPLS = ("softmax", "xla", "cudnn")  # explicit softmax | jax.nn.dot_product_attention
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on GPU/TPU, float32 on CPU
INIT_FROM = ("auto", "scratch", "resume")  # auto: resume if WORKDIR has a checkpoint


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # data
    c.dataset = "shakespeare_char"
    c.data_path = ""  # a local UTF-8 text file instead of downloading (offline machines, CI)
    c.data_dir = ""  # where downloads / prepared tokens live ("" = ~/.cache/jaxgpt)
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
    c.lr_decay_iters = 600000
    c.min_lr = 6e-5
    # loop
    c.batch_size = 12
    c.gradient_accumulation_steps = 1
    c.eval_interval = 2000
    c.eval_iters = 200
    c.log_interval = 1
    c.steps_per_call = 1  # optimizer steps per compiled call (lax.scan): no Python between them
    c.seed = 1337
    c.init_from = "auto"  # scratch refuses a workdir with checkpoints; resume requires one
    c.always_save_checkpoint = True
    c.keep_best = 1
    # devices: sizes of the mesh axes, -1 = all remaining devices
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    return c


def resolve_dtype(name: str) -> str:
    """config.dtype -> the compute dtype's name; "auto" is bfloat16 where the hardware has fast
    bfloat16 matmuls (GPU, TPU) and float32 on CPU (where bfloat16 is emulated, and slower)."""
    if name != "auto":
        return name
    return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"


def _one_of(config, key, allowed):
    if config[key] not in allowed:
        raise UserError(f"config.{key}={config[key]!r}: must be one of {', '.join(allowed)}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise a UserError naming the key and what to do, for values no run can use."""
    _one_of(config, "model", MODELS)
    _one_of(config, "attention", ATTENTIONS)
    _one_of(config, "attention_impl", ATTENTION_IMPLS)
    _one_of(config, "activation", ACTIVATIONS)
    _one_of(config, "dtype", DTYPES)
    _one_of(config, "init_from", INIT_FROM)
    for key in ("block_size", "n_layer", "n_head", "n_embd", "batch_size", "max_iters",
                "eval_interval", "eval_iters", "log_interval", "gradient_accumulation_steps",
                "steps_per_call", "keep_best"):
        if config[key] <= 0:
            raise UserError(f"config.{key}={config[key]}: must be a positive integer")
    if config.n_embd % config.n_head:
        raise UserError(f"config.n_embd={config.n_embd} is not divisible by config.n_head="
                         f"{config.n_head}: pick n_embd a multiple of n_head")
    if not 0.0 <= config.dropout < 1.0:
        raise UserError(f"config.dropout={config.dropout}: must be in [0, 1)")
    if config.learning_rate <= 0 or config.min_lr < 0:
        raise UserError("config.learning_rate must be > 0 and config.min_lr >= 0")
    if config.decay_lr and config.lr_decay_iters <= config.warmup_iters:
        raise UserError(f"config.lr_decay_iters={config.lr_decay_iters} must exceed "
                         f"config.warmup_iters={config.warmup_iters} (or set decay_lr=False)")
    if config.attention_impl == "cudnn" and (jax.default_backend() != "gpu" or
                                             resolve_dtype(config.dtype) == "float32"):
        raise UserError("config.attention_impl='cudnn' needs a GPU and dtype bfloat16 or "
                        "float16: use attention_impl='xla' here")
    if config.grad_clip < 0 or config.weight_decay < 0:
        raise UserError("config.grad_clip and config.weight_decay must be >= 0")
