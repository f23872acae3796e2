"""jaxgpt.config: every key with nanoGPT's name and default, validation naming the key, and the
recipes in configs/: each holds only known keys, validates, and sets the values of the script
it reproduces (nanoGPT's config files, stated here independently). The lecture's recipes:
test_lecture.py."""

import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from configs import gpt2, shakespeare, shakespeare_cpu
from jaxgpt import config as config_lib
from jaxgpt.errors import UserError
from jaxgpt.model import count_params, make_model

RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py")
                 if p.stem != "__init__")

# nanoGPT's train.py, its default values (those jaxgpt keeps: not its dataset, W&B names,
# init_from, gradient_accumulation_steps=40 or dtype, which are a machine's choice there)
NANOGPT_TRAIN_PY = dict(
    eval_interval=2000, log_interval=1, eval_iters=200, eval_only=False,
    always_save_checkpoint=True, wandb_log=False, batch_size=12, block_size=1024,
    n_layer=12, n_head=12, n_embd=768, dropout=0.0, learning_rate=6e-4, max_iters=600000,
    weight_decay=1e-1, beta1=0.9, beta2=0.95, grad_clip=1.0, decay_lr=True, warmup_iters=2000,
    min_lr=6e-5)
# nanoGPT's config/train_shakespeare_char.py
NANOGPT_SHAKESPEARE_CHAR = dict(
    eval_interval=250, eval_iters=200, log_interval=10, always_save_checkpoint=False,
    dataset="shakespeare_char", gradient_accumulation_steps=1, batch_size=64, block_size=256,
    n_layer=6, n_head=6, n_embd=384, dropout=0.2, learning_rate=1e-3, max_iters=5000,
    min_lr=1e-4, beta2=0.99, warmup_iters=100)
# nanoGPT's README, "I only have a macbook": train_shakespeare_char.py with these flags
NANOGPT_CPU_FLAGS = dict(block_size=64, batch_size=12, n_layer=4, n_head=4, n_embd=128,
                         max_iters=2000, dropout=0.0, eval_iters=20)


def flat_keys(c, prefix="") -> set[str]:
    return set().union(*({f"{prefix}{k}"} if not hasattr(v, "items") else
                         flat_keys(v, f"{prefix}{k}.") for k, v in c.items()))


def test_the_defaults_are_nanogpts():
    c = config_lib.base_config()
    assert {k: c[k] for k in NANOGPT_TRAIN_PY} == NANOGPT_TRAIN_PY
    assert c.bias is True and c.seed == 1337  # nanoGPT's GPTConfig (bias) and its seed
    assert config_lib.lr_decay_iters(c) == 600000  # nanoGPT: lr_decay_iters = max_iters
    c.max_iters = 500  # unset, it follows max_iters (--config.max_iters=N alone is coherent)
    assert config_lib.lr_decay_iters(c) == 500
    c.lr_decay_iters = 300
    assert config_lib.lr_decay_iters(c) == 300


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_holds_only_known_keys_and_validates(name):
    """A recipe's misspelled key (c.n_embed = ...) would be a new key nothing reads."""
    c = importlib.import_module(f"configs.{name}").get_config()
    assert flat_keys(c) == flat_keys(config_lib.base_config())
    config_lib.validate(c)


def test_shakespeare_recipes_are_nanogpts():
    c = shakespeare.get_config()
    assert {k: c[k] for k in NANOGPT_SHAKESPEARE_CHAR} == NANOGPT_SHAKESPEARE_CHAR
    assert c.bias is False and config_lib.lr_decay_iters(c) == 5000  # nanoGPT: = max_iters
    cpu = shakespeare_cpu.get_config()
    assert {k: cpu[k] for k in NANOGPT_CPU_FLAGS} == NANOGPT_CPU_FLAGS
    assert config_lib.lr_decay_iters(cpu) == 2000  # --lr_decay_iters=2000
    rest = {k for k in NANOGPT_SHAKESPEARE_CHAR if k not in NANOGPT_CPU_FLAGS}
    assert {k: cpu[k] for k in rest} == {k: NANOGPT_SHAKESPEARE_CHAR[k] for k in rest}


def test_gpt2_config_is_nanogpt_train_gpt2():
    c = gpt2.get_config()
    config_lib.validate(c)
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (12, 12, 768, 1024,
                                                                           50304)
    assert c.batch_size * c.gradient_accumulation_steps * c.block_size == 491520
    assert (c.learning_rate, c.min_lr, c.beta2, c.weight_decay) == (6e-4, 6e-5, 0.95, 0.1)
    model = make_model(c, 50257)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    assert round(count_params(shapes["params"]) / 1e6, 2) == 123.59  # nanoGPT prints 123.59M


POSITIVE = ("batch_size", "max_iters", "eval_interval", "eval_iters", "log_interval",
            "gradient_accumulation_steps", "steps_per_call", "keep_best")


@pytest.mark.parametrize("key, value, message", [
    *[(k, 0, rf"config\.{k}=0: must be a positive integer") for k in POSITIVE],
    ("model", "rnn", r"config\.model='rnn': must be one of gpt, bigram"),
    ("param_count", "some", r"config\.param_count='some': must be one of nanogpt, all"),
    ("hellaswag_limit", -1, r"config\.hellaswag_limit=-1: must be >= 0"),
    ("learning_rate", 0.0, r"config\.learning_rate must be > 0"),
    ("min_lr", -1e-4, r"config\.min_lr >= 0"),
    ("grad_clip", -1.0, r"config\.grad_clip and config\.weight_decay must be >= 0"),
    ("weight_decay", -0.1, r"config\.grad_clip and config\.weight_decay must be >= 0"),
    ("n_embd", 30, r"^config\..*not divisible"),  # the model's own check, named as a config key
])
def test_validate_names_the_key(key, value, message):
    c = config_lib.base_config()
    c[key] = value
    with pytest.raises(UserError, match=message):
        config_lib.validate(c)
