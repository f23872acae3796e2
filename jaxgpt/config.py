"""Every config key with its default (nanoGPT's names and values), and their validation.

Recipes in `configs/` start from `base_config()` and change what differs, so a misspelled
override (`--config.n_embed=...`) is rejected by ml_collections before anything compiles.
"""

import dataclasses

import jax
import ml_collections

from jaxgpt import attention
from jaxgpt.errors import UserError
from jaxgpt.gpt_config import GPTConfig

MODELS = ("gpt", "bigram")
# this workdir's own checkpoints (auto: resume if WORKDIR has one); anything else names weights
# to start from (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a path: see pretrained.py)
INIT_FROM = ("auto", "scratch", "resume")
PARAM_COUNTS = ("nanogpt", "all")
OPTIMIZERS = ("adamw", "muon")
DECAY_SHAPES = ("cosine", "linear")
MUON_SCALES = ("width", "rms", "none")
NS_COEFFS = ("quintic", "polar_express")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # data
    c.dataset = "shakespeare_char"
    # a local UTF-8 text file instead of downloading (offline machines, CI)
    c.data_path = ""
    # where downloads / prepared tokens live ("" = ~/.cache/jaxgpt)
    c.data_dir = ""
    # char datasets: a text whose characters join the vocabulary too
    c.vocab_path = ""
    # dataset=addition (the lecture's exercise 2, jaxgpt/addition.py): a+b=c of `digits`-digit
    # numbers, c written least significant digit first if `reverse`, `eval_problems` held out
    c.addition = ml_collections.ConfigDict({"digits": 2, "reverse": False, "eval_problems": 500})
    # model: gpt | bigram (the lecture's baseline); the other model keys are GPTConfig's fields
    # with its defaults (jaxgpt/model.py says what each does)
    c.model = "gpt"
    for field in dataclasses.fields(GPTConfig):
        c[field.name] = field.default
    # 0 = take the vocabulary size from the tokenizer
    c.vocab_size = 0
    # optimizer (nanoGPT's train.py defaults)
    c.learning_rate = 6e-4
    c.max_iters = 600000
    c.weight_decay = 1e-1
    c.beta1 = 0.9
    c.beta2 = 0.95
    # 0 disables clipping
    c.grad_clip = 1.0
    c.decay_lr = True
    c.warmup_iters = 2000
    # None: = max_iters
    c.lr_decay_iters = ml_collections.config_dict.placeholder(int)
    c.min_lr = 6e-5
    # True: decay every param (torch's AdamW on model.parameters(), the lecture); False: only
    # >= 2-D weights (nanoGPT)
    c.decay_all = False
    # the decay after the warmup: cosine (nanoGPT) | linear (a straight line to min_lr at
    # lr_decay_iters, modded-nanogpt's cool-down)
    c.decay_shape = "cosine"
    # adamw: AdamW on every param (nanoGPT) | muon: Muon (jaxgpt/optim.py) on the transformer
    # blocks' 2-D matmul kernels, the AdamW above (its lr, schedule, betas, decay mask) on the
    # rest (embeddings, the tied lm_head, LayerNorms, biases); grad_clip clips both, before
    c.optimizer = "adamw"
    # Muon's group: peak lr on the same schedule shape (warmup, decay, min_lr in proportion)
    c.muon_lr = 0.02
    c.muon_momentum = 0.95
    c.muon_nesterov = True
    # decoupled, times the lr (torch's AdamW convention); modded-nanogpt's early records: 0
    c.muon_weight_decay = 0.0
    c.muon_ns_steps = 5
    # Newton–Schulz coefficients: quintic (modded-nanogpt's fixed 3.4445, -4.775, 2.0315; optax's)
    # | polar_express (a set per iteration, Amsel et al. 2025: closer to orthogonal in as many
    # steps; at most 5)
    c.muon_ns_coeffs = "quintic"
    # the orthogonalised update's scale: width sqrt(max(1, fan_out/fan_in)) (Keller Jordan) |
    # rms 0.2 sqrt(max(fan_in, fan_out)) (Moonshot: AdamW's update size) | none
    c.muon_scale = "width"
    # loop
    c.batch_size = 12
    c.gradient_accumulation_steps = 1
    c.eval_interval = 2000
    c.eval_iters = 200
    # token files: True scores the val split's first eval_iters x batch_size windows of
    # block_size, each once (as step.heldout_loss), the same set on any slice and after any
    # resume, so runs compare across machines; False: random windows (nanoGPT's estimate_loss)
    c.fixed_val = False
    # True: the lecture's loop (evals at iter % eval_interval == 0 or iter == max_iters - 1,
    # each before that iter's step: the last after max_iters-1 steps); False: nanoGPT's (the
    # last eval after all max_iters steps)
    c.eval_before_last_step = False
    # False: no eval before the first step of a fresh run (its loss is ~ln(vocab); nanoGPT's
    # loop has one): a run that only needs its final loss saves that eval's time
    c.eval_at_start = True
    # a HellaSwag JSONL file (jaxgpt/hellaswag.py) scored at every eval, as hellaswag_acc and
    # hellaswag_acc_norm beside the losses ("" = none); its first hellaswag_limit examples
    # (0 = all), batch_size // 4 examples per call
    c.hellaswag_path = ""
    c.hellaswag_limit = 0
    # printed count: "nanogpt" (no position embeddings) | "all" (the lecture's
    # `sum(p.numel() ...)`, printed as gpt.py does)
    c.param_count = "nanogpt"
    c.log_interval = 1
    # optimizer steps per compiled call (lax.scan): no Python between them
    c.steps_per_call = 1
    c.seed = 1337
    # auto: resume if the workdir has a checkpoint; scratch refuses a workdir with checkpoints;
    # resume requires one; gpt2 | gpt2-medium | gpt2-large | gpt2-xl | PATH: start from those
    # weights (finetuning)
    c.init_from = "auto"
    # OpenAI's GPT-2 weights on disk ("" = the Hugging Face cache)
    c.pretrained_dir = ""
    # evaluate the loaded model once (train and val loss), then stop
    c.eval_only = False
    c.always_save_checkpoint = True
    c.keep_best = 1
    # one run per workdir (WORKDIR/run.lock): True takes over the lock of a run you know is gone
    # (a lock whose holder died on this host, or stopped its heartbeat, is taken over anyway)
    c.take_over_lock = False
    # > 0: a jax.profiler trace of that many steps after warm-up, in WORKDIR
    c.profile_steps = 0
    # nanoGPT's W&B keys (pip install 'jaxgpt[wandb]')
    c.wandb_log = False
    c.wandb_project = "jaxgpt"
    # "" = W&B's own name
    c.wandb_run_name = ""
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
    _one_of(config, "optimizer", OPTIMIZERS)
    _one_of(config, "decay_shape", DECAY_SHAPES)
    _one_of(config, "muon_scale", MUON_SCALES)
    _one_of(config, "muon_ns_coeffs", NS_COEFFS)
    try:
        GPTConfig.from_config(config, vocab_size=1)
        attention.check(config.attention_impl, config.dtype, jax.default_backend())
    except UserError as e:
        raise UserError(f"config.{e}") from None
    for key in ("batch_size", "max_iters", "eval_interval", "eval_iters", "log_interval",
                "gradient_accumulation_steps", "steps_per_call", "keep_best"):
        if config[key] <= 0:
            raise UserError(f"config.{key}={config[key]}: must be a positive integer")
    if config.hellaswag_limit < 0:
        raise UserError(f"config.hellaswag_limit={config.hellaswag_limit}: must be >= 0 "
                        "(0 = every example)")
    if config.learning_rate <= 0 or config.min_lr < 0:
        raise UserError("config.learning_rate must be > 0 and config.min_lr >= 0")
    if config.grad_clip < 0 or config.weight_decay < 0:
        raise UserError("config.grad_clip and config.weight_decay must be >= 0")
    _check_muon(config)


def _check_muon(config):
    if config.muon_lr <= 0:
        raise UserError(f"config.muon_lr={config.muon_lr}: must be > 0 (modded-nanogpt: 0.02)")
    if not 0 <= config.muon_momentum < 1:
        raise UserError(f"config.muon_momentum={config.muon_momentum}: must be in [0, 1) "
                        "(modded-nanogpt: 0.95)")
    if config.muon_weight_decay < 0:
        raise UserError(f"config.muon_weight_decay={config.muon_weight_decay}: must be >= 0")
    if config.muon_ns_steps <= 0:
        raise UserError(f"config.muon_ns_steps={config.muon_ns_steps}: must be a positive "
                        "integer (modded-nanogpt: 5)")
    if config.muon_ns_coeffs == "polar_express" and config.muon_ns_steps > 5:
        raise UserError(f"config.muon_ns_steps={config.muon_ns_steps}: polar_express has "
                        "coefficients for at most 5 steps")


def _one_of(config, key, allowed):
    if config[key] not in allowed:
        raise UserError(f"config.{key}={config[key]!r}: must be one of {', '.join(allowed)}")
