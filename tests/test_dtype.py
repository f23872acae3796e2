"""dtype="auto" by the device, bfloat16 against float32, and float16 with dynamic loss scaling
(GPUs before Ampere).

The device choice is tested with faked device descriptions (what jax reports for each card);
the loss scaling numerically on the CPU, where float16 is slow but exact to its format."""

import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import batches, flops, training
from jaxgpt import step as step_lib
from jaxgpt.dtype import auto_dtype, resolve_dtype
from jaxgpt.model import GPT, GPTConfig, make_model
from jaxgpt.parallel import make_mesh
from tests.conftest import fresh_state, tiny


def gpu(kind, cc):
    return types.SimpleNamespace(platform="gpu", device_kind=kind, compute_capability=cc)


@pytest.mark.parametrize("device, want", [
    (gpu("NVIDIA H100 80GB HBM3", "9.0"), "bfloat16"),
    (gpu("NVIDIA A100-SXM4-40GB", "8.0"), "bfloat16"),
    (gpu("NVIDIA L4", "8.9"), "bfloat16"),
    (gpu("NVIDIA GeForce RTX 3090", "8.6"), "bfloat16"),
    (gpu("Tesla T4", "7.5"), "float16"),  # Colab's free GPU
    (gpu("Tesla V100-SXM2-16GB", "7.0"), "float16"),
    (gpu("NVIDIA GeForce RTX 2080 Ti", "7.5"), "float16"),
    (gpu("Tesla P100-PCIE-16GB", "6.0"), "float32"),
    (types.SimpleNamespace(platform="gpu", device_kind="AMD Instinct MI300X"), "bfloat16"),
    (types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite"), "bfloat16"),
    (types.SimpleNamespace(platform="cpu", device_kind="cpu"), "float32"),
])
def test_auto_picks_by_the_card(device, want):
    dtype, why = auto_dtype(device)
    assert dtype == want and why
    assert resolve_dtype("auto", device) == want
    assert resolve_dtype("float32", device) == "float32"  # a named dtype is itself


def test_this_cpu_runs_float32():
    assert resolve_dtype("auto") == "float32"  # bfloat16 on GPU / TPU
    assert GPTConfig(dtype="auto").compute_dtype == jnp.float32
    assert resolve_dtype("float16") == "float16"


@pytest.mark.parametrize("kind, dtype, tflops", [
    ("Tesla T4", "float16", 65.0), ("NVIDIA L4", "bfloat16", 121.0),
    ("Tesla V100-SXM2-16GB", "float16", 125.0), ("NVIDIA L40S", "bfloat16", 362.0),
])
def test_colab_cards_have_an_mfu_peak(kind, dtype, tflops):
    peak, source = flops.datasheet_peak(types.SimpleNamespace(device_kind=kind), dtype)
    assert peak == tflops * 1e12, source


@functools.cache
def _fp16_init():
    """One float16 state for every run of this module: a new one would be a new static tree
    (its model and optimizer objects) and so a new compile of the step."""
    c = tiny("", dtype="float16", grad_clip=0.0)
    return step_lib.create_train_state(c, make_model(c, vocab_size=20), make_mesh(c))


def _fp16_state(loss_scale):
    state = _fp16_init()
    assert state.loss_scale.dynamic  # float16 gets a dynamic loss scale by default
    # placed as the state's own scale is, as the step returns it: one program for every step
    scalar = state.loss_scale.scale.sharding
    return state.replace(loss_scale=jax.device_put(loss_scale, scalar))


_train_step = jax.jit(step_lib.train_step)  # one jit: each program compiles once in the module


def _steps(state, n):
    """n train steps on one fixed batch; (state, per-step metrics)."""
    x = jax.random.randint(jax.random.PRNGKey(0), (1, 8, 16), 0, 20)
    batch = (x, jnp.roll(x, -1, axis=-1))
    history = []
    for i in range(n):
        state, metrics = _train_step(state, batch, jax.random.PRNGKey(i))
        history.append(jax.device_get(metrics))
    return state, history


def test_the_scale_grows_after_period_finite_steps_and_halves_on_overflow():
    s = step_lib.LossScale.create(8.0, period=3)
    for finite, want in [(True, 8), (True, 8), (True, 16), (False, 8), (True, 8), (False, 4)]:
        s = s.adjust(jnp.bool_(finite))
        assert float(s.scale) == want
    fixed = step_lib.LossScale.create(8.0, dynamic=False)
    assert float(fixed.adjust(jnp.bool_(False)).scale) == 8.0
    assert step_lib.make_loss_scale(tiny("", dtype="bfloat16")) is None


def test_float16_overflow_is_skipped_and_the_scale_halves_until_it_trains():
    """A loss scale far too large overflows float16's backward pass (inf gradients). A fixed
    scale (no dynamic adjustment) then writes NaN into every weight; the dynamic scale skips
    those steps — the weights untouched, the step number advancing — halves itself, and
    trains once the gradients fit."""
    static, _ = _steps(_fp16_state(step_lib.LossScale.create(2.0**40, dynamic=False)), 2)
    assert not all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(static.params))

    start = _fp16_state(step_lib.LossScale.create(2.0**40, period=10**6))
    state, history = _steps(start, 30)
    scales = [float(m["loss_scale"]) for m in history]
    skipped = [not np.isfinite(m["grad_norm"]) for m in history]
    assert skipped[0] and not skipped[-1]  # overflowed first, trained at the end
    for i in range(1, 30):  # halved after each overflow, kept after a finite step
        assert scales[i] == scales[i - 1] / 2 if skipped[i - 1] else scales[i] == scales[i - 1]
    assert int(state.step) == 30
    assert all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(state.params))
    first_trained = skipped.index(False)
    losses = [float(m["loss"]) for m in history]
    assert losses[-1] < losses[first_trained] - 0.1  # it learns the batch
    # the skipped steps changed nothing: the run equals one that started at the good scale
    good = step_lib.LossScale.create(scales[first_trained], period=10**6)
    again, _ = _steps(_fp16_state(good), 1)
    trained, _ = _steps(start, first_trained + 1)
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(trained.params)):
        np.testing.assert_array_equal(a, b)


def _losses(config, steps=4):
    """Losses of `steps` optimizer steps on the same batches whatever the config."""
    dataset, _, _, state = fresh_state(config)
    step = jax.jit(step_lib.train_step)
    losses = []
    for i in range(steps):
        x, y = batches.get_batch(jnp.asarray(dataset.train), jax.random.PRNGKey(i), 8, 16)
        state, metrics = step(state, (x[None], y[None]), jax.random.PRNGKey(0))  # (1, B, T)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


def test_bfloat16_compute_tracks_float32(text_file):
    """bf16 compute (8-bit mantissa) stays within 0.03 of float32's loss (~2.9 -> ~2.7; measured
    ~2e-4) over 4 steps; params and Adam state stay float32, logits come out float32."""
    f32, _ = _losses(tiny(text_file, dtype="float32"))
    bf16, state = _losses(tiny(text_file, dtype="bfloat16"))
    np.testing.assert_allclose(bf16, f32, atol=0.03)
    assert f32[-1] < f32[0] - 0.1  # it is learning, so the comparison means something
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype("float32")}
    base = dict(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=16)
    idx = jnp.arange(8)[None] % 11  # (1, T)
    params = GPT(GPTConfig(**base)).init(jax.random.PRNGKey(0), idx)
    logits = GPT(GPTConfig(dtype="bfloat16", **base)).apply(params, idx)
    assert logits.dtype == jnp.float32
    diff = np.abs(logits - GPT(GPTConfig(**base)).apply(params, idx)).max()
    assert 1e-5 < diff < 0.05  # really computed in bf16, and close


def test_a_float16_run_trains_and_logs_its_loss_scale(tmp_path, text_file, capsys):
    c = tiny(text_file, dtype="float16", max_iters=20, eval_interval=20)
    training.train(c, tmp_path)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in lines if e["event"] == "train"]
    evals = [e for e in lines if e["event"] == "eval"]
    assert all(e["loss_scale"] == step_lib.INITIAL_LOSS_SCALE for e in train)  # no overflow
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    out = capsys.readouterr()
    assert "compute dtype: float16" in out.out + out.err


def test_the_auto_choice_is_printed(tmp_path, text_file, capsys):
    training.train(tiny(text_file, max_iters=1, eval_interval=1, eval_iters=1), tmp_path)
    out = capsys.readouterr()
    assert "compute dtype: float32 (auto: a CPU has no fast" in out.out + out.err
