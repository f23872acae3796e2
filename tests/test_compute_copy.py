"""Gradient accumulation casts the weights to the compute dtype once per step (step.compute_copy),
not once per micro-batch: the same training step to the bit."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import batches, datasets, parallel
from jaxgpt import step as step_lib
from jaxgpt.model import make_model
from tests.conftest import tiny


def _state(config):
    dataset = datasets.load(config)
    model = make_model(config, dataset.tokenizer.vocab_size)
    mesh = parallel.make_mesh(config)
    return dataset, step_lib.create_train_state(config, model, mesh)


def test_weights_are_cast_once_with_the_tied_embedding_kept(text_file):
    _, state = _state(tiny(text_file, dtype="bfloat16"))
    copy = step_lib.compute_copy(state.params, state.apply_fn)
    assert copy["wte"]["embedding"].dtype == jnp.float32  # tied: its gradients sum in float32
    assert copy["wpe"]["embedding"].dtype == jnp.bfloat16
    assert copy["h_0"]["attn"]["c_attn"]["kernel"].dtype == jnp.bfloat16
    assert copy["h_0"]["ln_1"]["scale"].dtype == jnp.float32  # 1-D: as the layer keeps it
    _, f32 = _state(tiny(text_file))
    assert step_lib.compute_copy(f32.params, f32.apply_fn) is f32.params


def test_accumulating_on_the_cast_copy_is_the_same_step(text_file, monkeypatch):
    config = tiny(text_file, dtype="bfloat16")
    dataset, state = _state(config)
    x, y = batches.get_batch(jnp.asarray(dataset.train), jax.random.PRNGKey(0), 8, 16)  # (8, T)
    batch = (x.reshape(4, 2, 16), y.reshape(4, 2, 16))  # (A, B, T): 4 micro-batches
    new, metrics = jax.jit(step_lib.train_step)(state, batch, jax.random.PRNGKey(1))
    monkeypatch.setattr(step_lib, "compute_copy", lambda params, apply_fn: params)
    ref, ref_metrics = jax.jit(step_lib.train_step)(state, batch, jax.random.PRNGKey(1))
    assert float(metrics["loss"]) == float(ref_metrics["loss"])
    assert float(metrics["grad_norm"]) == float(ref_metrics["grad_norm"])
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params)):
        np.testing.assert_array_equal(a, b)
