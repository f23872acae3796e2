"""The GPT-2 recipes run as written on 1 GPU and on the common TPU VM slices: each recipe's
global batch divides the devices of each slice, with nanoGPT's tokens per step, and
attention_impl="auto" means the splash kernel on those TPUs and xla on a GPU."""

import math

import pytest

from configs import eval_gpt2, eval_gpt2_large, eval_gpt2_medium, eval_gpt2_xl, gpt2
from jaxgpt import config as config_lib
from jaxgpt import splash, tpus

TRAINING = {"gpt2": gpt2}
EVALUATION = {"eval_gpt2": eval_gpt2, "eval_gpt2_medium": eval_gpt2_medium,
              "eval_gpt2_large": eval_gpt2_large, "eval_gpt2_xl": eval_gpt2_xl}
SLICES = ("v4-8", "v5litepod-8", "v6e-8", "v5p-8")


def devices(accelerator_type: str) -> int:
    """Chips (JAX devices) of a slice: the product of its topology's sides."""
    shape = tpus.topology_name(accelerator_type).split(":")[1]
    return math.prod(int(n) for n in shape.split("x"))


def test_the_slices_have_the_devices_jax_sees():
    assert [devices(s) for s in SLICES] == [4, 8, 8, 4]


@pytest.mark.parametrize("name", [*TRAINING, *EVALUATION])
@pytest.mark.parametrize("where", ["1 GPU", *SLICES])
def test_each_recipe_batch_divides_the_devices(name, where):
    c = {**TRAINING, **EVALUATION}[name].get_config()
    config_lib.validate(c)
    n = 1 if where == "1 GPU" else devices(where)
    assert c.batch_size % n == 0, (name, where, c.batch_size, n)
    backend = "gpu" if where == "1 GPU" else "tpu"
    assert splash.resolve_impl(c, backend)[0] == ("xla" if backend == "gpu" else "splash")


def test_gpt2_keeps_nanogpt_tokens_per_step():
    c = gpt2.get_config()
    assert c.batch_size * c.gradient_accumulation_steps * c.block_size == 480 * 1024 == 491520
    assert c.attention_impl == "auto" and c.dropout == 0.0
