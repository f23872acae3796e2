"""jaxgpt.batches: the lecture's get_batch, the batch of a step from (seed, step) alone in any
split over processes, the host prefetch thread, and which source a dataset gets. Shards of
token files read through local_batch: test_prepare.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import batches, parallel
from jaxgpt.data import Dataset
from tests.conftest import tiny


def test_get_batch_windows_are_shifted_by_one():
    arr = np.arange(100, dtype=np.int32)
    x, y = jax.jit(batches.get_batch, static_argnums=(2, 3))(arr, jax.random.PRNGKey(0), 6, 10)
    assert x.shape == y.shape == (6, 10)
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_array_equal(y, x + 1)  # y is x shifted one token on
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)  # contiguous windows
    assert x.min() >= 0 and y.max() <= 99


def test_local_batches_compose_into_the_global_batch():
    """Any split of the rows over processes reads exactly the global batch's rows, and the
    global batch depends on (seed, step) only."""
    data = np.arange(1000, dtype=np.uint16)
    full_x, full_y = batches.local_batch(data, (1, 0), 7, (2, 8), 16, np.arange(8))  # (A, B, T)
    assert full_x.shape == (2, 8, 16) and full_x.dtype == np.int32
    np.testing.assert_array_equal(full_x[..., 1:], full_y[..., :-1])  # y is x shifted by one
    rows = np.array([2, 3, 6, 7])
    part_x, _ = batches.local_batch(data, (1, 0), 7, (2, 8), 16, rows)
    np.testing.assert_array_equal(part_x, full_x[:, rows])
    other, _ = batches.local_batch(data, (1, 0), 8, (2, 8), 16, np.arange(8))
    assert not np.array_equal(other, full_x)


def host_batches(data, **overrides):
    config = tiny(seed=0, gradient_accumulation_steps=2, batch_size=4, block_size=8,
                  **overrides)
    dataset = Dataset(train=data, val=data, tokenizer=None, on_host=True)
    return batches.make(dataset, config, parallel.make_mesh(config)), config


def test_host_batches_prefetch_in_step_order():
    data = np.arange(5000, dtype=np.uint16)
    loader, _ = host_batches(data)
    try:
        x, y = loader.train_data(0, 3)  # (n, A, B, T)
        x2, _ = loader.train_data(3, 2)
        again, _ = loader.train_data(1, 1)  # out of order (a resumed run): restarts the thread
    finally:
        loader.close()
    assert x.shape == (3, 2, 4, 8) and x2.shape == (2, 2, 4, 8)
    expected, _ = batches.local_batch(data, (0, 0), 4, (2, 4), 8, np.arange(4))
    np.testing.assert_array_equal(x2[1], expected)
    np.testing.assert_array_equal(again[0], x[1])


def test_host_batches_are_what_their_abstract_description_says():
    """abstract_data (what ahead-of-time compiling lowers) = train_data / eval_data's arrays."""
    loader, config = host_batches(np.arange(5000, dtype=np.uint16), eval_iters=6)
    mesh = parallel.make_mesh(config)
    try:
        train, val = loader.train_data(0, 3), loader.eval_data("val", jax.random.split(
            jax.random.PRNGKey(0), 6))
    finally:
        loader.close()
    want_train, want_val = batches.HostBatches.abstract_data(config, mesh, 3)
    for got, want in zip((*train, *val, *val), (*want_train, *want_val, *loader.eval_spec())):
        assert (got.shape, got.dtype, got.sharding) == (want.shape, want.dtype, want.sharding)
    assert val[0].shape == (batches.eval_batches_per_call(6), 4, 8)  # (E, B, T)


def test_a_failure_in_the_prefetch_thread_surfaces_in_the_loop():
    loader, _ = host_batches(np.arange(5, dtype=np.uint16))  # shorter than one window
    try:
        with pytest.raises(ValueError):
            loader.train_data(0, 1)
    finally:
        loader.close()


@pytest.mark.parametrize("eval_iters, per_call", [(200, 10), (20, 10), (12, 6), (7, 7),
                                                  (13, 1), (1, 1)])
def test_an_eval_is_calls_of_the_largest_divisor_up_to_10(eval_iters, per_call):
    assert batches.eval_batches_per_call(eval_iters) == per_call


def test_a_text_is_drawn_on_the_device_and_token_files_on_the_host():
    data = np.arange(500, dtype=np.int32)
    config = tiny(gradient_accumulation_steps=3, batch_size=2, block_size=8)
    mesh = parallel.make_mesh(config)
    on_device = batches.make(Dataset(train=data, val=data, tokenizer=None), config, mesh)
    assert isinstance(on_device, batches.DeviceBatches)
    x, y = jax.jit(on_device.train_batch)(on_device.train_data(0, 1), 0, jax.random.PRNGKey(0))
    assert x.shape == y.shape == (3, 2, 8) and x.dtype == np.int32  # (A, B, T)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) + 1)  # the text's next tokens
    keys = jax.random.split(jax.random.PRNGKey(1), batches.eval_batches_per_call(config.eval_iters))
    evals = on_device.eval_data("val", keys)  # (E, B, T) each: batch i from keys[i]
    for i, key in enumerate(keys):
        want = batches.get_batch(jnp.asarray(data), key, 2, 8)  # the lecture's draw, one key
        got = jax.jit(on_device.eval_batch)(evals, i, key)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    for got, spec in zip(evals, on_device.eval_spec()):
        assert (got.shape, got.dtype) == (spec.shape, spec.dtype)
        assert got.sharding.is_equivalent_to(spec.sharding, got.ndim)
    on_host = batches.make(Dataset(train=data, val=data, tokenizer=None, on_host=True),
                           config, mesh)
    assert isinstance(on_host, batches.HostBatches)
    on_host.close()
