"""configs/gpt2_fineweb.py (build-nanogpt's run) and its fixed val set, on a small local
FineWeb-shaped dataset: sharded token files as `jaxgpt.prepare --shard_tokens` writes them."""

import json

import jax
import numpy as np
import pytest

from configs import gpt2_fineweb
from jaxgpt import batches, bins, metrics, parallel, step, training
from jaxgpt import config as config_lib
from jaxgpt import tokenizer as tokenizers
from jaxgpt.errors import UserError
from tests.conftest import byte_encoding, tiny


def test_the_recipe_is_build_nanogpt_train_gpt2():
    c = gpt2_fineweb.get_config()
    config_lib.validate(c)
    assert c.batch_size * c.gradient_accumulation_steps * c.block_size == 524288
    assert (c.learning_rate, c.min_lr, c.warmup_iters, c.max_iters) == (6e-4, 6e-5, 715, 19073)
    assert c.lr_decay_iters == 19073 and c.weight_decay == 0.1 and c.grad_clip == 1.0
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size) == (12, 12, 768, 50304)
    assert c.bias and c.activation == "gelu_tanh" and c.dropout == 0.0
    assert c.fixed_val and c.hellaswag_path.endswith("hellaswag_val.jsonl")
    assert c.eval_iters * c.batch_size * c.block_size == 20 * 64 * 1024 * 8
    for devices in (1, 4, 8):  # 1 GPU, v4-8 / v5p-8, v5litepod-8 / v6e-8
        assert c.batch_size % devices == 0


def write_shards(d, sizes, seed=0):
    """FineWeb-shaped bins: train_00000N.bin / val_000000.bin and meta.json listing them."""
    d.mkdir(parents=True, exist_ok=True)
    rng, files = np.random.default_rng(seed), {}
    for split, counts in sizes.items():
        files[split] = []
        for i, n in enumerate(counts):
            name = f"{split}_{i:06d}.bin"
            rng.integers(0, 300, n).astype(bins.BIN_DTYPE).tofile(d / name)
            files[split].append({"name": name, "tokens": n})
    (d / bins.META).write_text(json.dumps({"files": files, "vocab_size": 320}))
    return d


def small(d, **kw):
    c = tiny("", dataset="fineweb", data_dir=str(d.parent), vocab_size=320, batch_size=4,
             eval_iters=4, fixed_val=True, hellaswag_path="", **kw)
    c.dataset = d.name
    return c


def val_windows(source, calls):
    """The val windows of `calls` eval calls (after one train call, as estimate_loss does)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    source.eval_data("train", keys)
    return [np.asarray(source.eval_data("val", keys)[0]) for _ in range(calls)]


def test_fixed_val_is_the_first_windows_each_once(tmp_path):
    d = write_shards(tmp_path / "fineweb", {"train": [3000, 3000], "val": [2000]})
    c = small(d)
    s = training.setup(c)
    calls = c.eval_iters // batches.eval_batches_per_call(c.eval_iters)
    got = np.concatenate([w.reshape(-1, c.block_size) for w in val_windows(s.batches, calls)])
    val = np.fromfile(d / "val_000000.bin", bins.BIN_DTYPE)
    T = c.block_size
    expected = val[:c.eval_iters * c.batch_size * T].reshape(-1, T)  # windows 0, 1, ...
    np.testing.assert_array_equal(got, expected)
    # the next eval (or a resumed run's first) scores the same windows, whatever the keys
    again = val_windows(s.batches, calls)
    np.testing.assert_array_equal(np.concatenate([w.reshape(-1, T) for w in again]), expected)
    s.batches.close()


def test_fixed_val_is_the_same_on_any_split_of_the_rows():
    """Processes read their own rows: the rows of 1, 2 or 4 processes compose the same batch."""
    data = np.arange(5000, dtype=bins.BIN_DTYPE)
    whole = batches.fixed_windows(data, 8, (2, 4), 16, np.arange(4))[0]
    halves = [batches.fixed_windows(data, 8, (2, 4), 16, np.array(r))[0] for r in ([0, 1],
                                                                                  [2, 3])]
    np.testing.assert_array_equal(np.concatenate(halves, axis=1), whole)
    np.testing.assert_array_equal(whole[0, 0], np.arange(8 * 16, 9 * 16))


def test_a_val_split_too_small_for_the_fixed_set_is_one_line(tmp_path):
    d = write_shards(tmp_path / "fineweb", {"train": [3000], "val": [200]})
    with pytest.raises(UserError, match="fixed_val: the val split has 200 tokens") as e:
        training.setup(small(d))
    assert "\n" not in str(e.value)


def test_the_eval_loss_of_the_fixed_set_is_the_heldout_loss(tmp_path):
    """estimate_loss's val figure on the fixed set equals step.heldout_loss over its tokens."""
    d = write_shards(tmp_path / "fineweb", {"train": [3000], "val": [2000]})
    c = small(d)
    s = training.setup(c)
    losses = training.estimate_loss(s, s.state.params, jax.random.PRNGKey(3))
    s.batches.close()
    val = np.fromfile(d / "val_000000.bin", bins.BIN_DTYPE)
    n = c.eval_iters * c.batch_size * c.block_size + 1
    mesh = parallel.one_device_mesh()
    params = jax.device_put(s.state.params, parallel.replicated(mesh))
    ref = step.heldout_loss(s.model, params, val[:n], c.block_size, c.batch_size)
    np.testing.assert_allclose(losses["val"], ref, rtol=1e-5)


def test_a_resumed_run_scores_the_same_fixed_val_set(tmp_path, monkeypatch):
    """A run's eval at step 4 (its second, after step 0's) and a later start from its
    checkpoint that evaluates it (eval_only: a fresh setup, its first eval call) score the same
    windows: the same val loss."""
    monkeypatch.setattr(tokenizers, "_gpt2_encoding", byte_encoding)  # resuming reloads it
    d = write_shards(tmp_path / "fineweb", {"train": [3000], "val": [2000]})
    workdir = tmp_path / "run"
    for eval_only in (False, True):
        training.train(small(d, max_iters=4, eval_interval=4, lr_decay_iters=4,
                             steps_per_call=2, eval_only=eval_only), workdir)
    evals = [r for r in metrics.read(workdir) if "val_loss" in r and r["step"] == 4]
    assert len(evals) == 2, evals
    assert evals[0]["val_loss"] == evals[1]["val_loss"]
