"""attention_impl="splash" (jaxgpt/splash.py): the Pallas kernel, in interpret mode on a CPU,
computes the explicit softmax path's function: logits, gradients, training steps and the eval
loss, on one device and on a 2-device mesh split for data and for FSDP; "auto" picks it on TPUs
only; a sequence length it cannot take is one line.

Run as a script (`python tests/test_splash.py OUT.json TEXT`) it is the 2-device worker: JAX's
device count is fixed at import, so the test starts a fresh interpreter with XLA_FLAGS set."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # the worker: 2 CPU devices, set before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=2")
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxgpt import parallel, splash, training  # noqa: E402
from jaxgpt.config import base_config  # noqa: E402
from jaxgpt.errors import UserError  # noqa: E402
from jaxgpt.model import GPT, GPTConfig  # noqa: E402

STEPS = 3
# the smallest shape the kernel takes: T = 128 (one 128-wide block); 2 heads of 64 as GPT-2's
SMALL = dict(block_size=128, vocab_size=67, n_layer=1, n_head=2, n_embd=128, dtype="float32",
             bias=False)


def run_config(text, impl, **overrides):
    c = base_config()
    c.dataset, c.data_path = "char", str(text)
    for k, v in SMALL.items():
        if k != "vocab_size":
            c[k] = v
    c.attention_impl, c.dropout = impl, 0.0
    c.batch_size, c.gradient_accumulation_steps, c.steps_per_call = 4, 2, STEPS
    c.max_iters, c.eval_interval, c.eval_iters, c.log_interval = STEPS, STEPS, 2, 1
    c.learning_rate, c.warmup_iters, c.lr_decay_iters, c.min_lr = 3e-3, 1, 4, 3e-4
    for k, v in overrides.items():
        c[k] = v
    return c


def loss_and_grads(model, params, idx):
    def loss(params):
        logits = model.apply({"params": params}, idx)  # (B, T, V)
        return jnp.mean(logits ** 2), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads


def max_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def worker(out, text):
    """On 2 CPU devices: for a data-parallel and an FSDP mesh, logits and gradients of one
    batch and STEPS training steps (accumulating 2 micro-batches) and the eval loss, splash
    against softmax; writes the largest differences."""
    assert len(jax.devices()) == 2
    result = {}
    for name, (data, fsdp) in {"data": (2, 1), "fsdp": (1, 2)}.items():
        runs = {}
        for impl in ("softmax", "splash"):
            c = run_config(text, impl)
            c.mesh.data, c.mesh.fsdp = data, fsdp
            s = training.setup(c)
            V = s.model.config.vocab_size
            idx = jax.device_put(np.arange(4 * 128).reshape(4, 128) % V,
                                 NamedSharding(s.mesh, P(parallel.BATCH_AXES)))  # (B, T)
            fn = jax.jit(parallel.traced_in(s.mesh, lambda p, i, m=s.model: loss_and_grads(m, p,
                                                                                          i)))
            logits, grads = fn(s.state.params, idx)
            fsdp_split = sum("fsdp" in str(x.sharding.spec)
                             for x in jax.tree.leaves(s.state.params))
            state, metrics = s.train_call(s.state, s.batches.train_data(0, STEPS),
                                          num_steps=STEPS)
            keys = jax.random.split(jax.random.PRNGKey(0), 2)
            val = s.evaluate(state.params, s.batches.eval_data("val", keys), keys)
            s.batches.close()
            runs[impl] = dict(logits=logits, grads=grads, losses=metrics["loss"],
                              params=state.params, val=val, fsdp_split=fsdp_split)
        a, b = runs["softmax"], runs["splash"]
        result[name] = {k: max_diff(a[k], b[k]) for k in ("logits", "grads", "losses", "params",
                                                          "val")}
        result[name]["loss_values"] = np.asarray(b["losses"]).tolist()
        result[name]["fsdp_split"] = b["fsdp_split"]
        result[name]["grads_scale"] = max_diff(a["grads"], jax.tree.map(jnp.zeros_like,
                                                                         a["grads"]))
    Path(out).write_text(json.dumps(result))


def test_splash_equals_softmax_on_one_device():
    """Logits and gradients of one GPT, splash (interpreted) against the explicit softmax."""
    idx = jnp.arange(2 * 128).reshape(2, 128) % 67  # (B, T)
    ref = GPT(GPTConfig(**SMALL, attention_impl="softmax"))
    params = ref.init(jax.random.PRNGKey(0), idx)["params"]
    logits, grads = jax.jit(lambda p: loss_and_grads(ref, p, idx))(params)
    model = GPT(GPTConfig(**SMALL, attention_impl="splash"))
    s_logits, s_grads = jax.jit(lambda p: loss_and_grads(model, p, idx))(params)
    assert max_diff(logits, s_logits) < 1e-5
    assert max_diff(grads, s_grads) < 1e-6
    assert max_diff(grads, jax.tree.map(jnp.zeros_like, grads)) > 1e-4  # not all zeros


def test_splash_trains_like_softmax_on_a_2_device_mesh(tmp_path, text_file):
    """Data parallel (data=2) and FSDP (fsdp=2): the kernel runs under shard_map over the batch
    axes; logits, gradients, 3 accumulating steps and the eval loss equal softmax's."""
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, __file__, str(out), str(text_file)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["fsdp"]["fsdp_split"] > 0 and r["data"]["fsdp_split"] == 0
    for name in ("data", "fsdp"):
        d = r[name]
        assert d["logits"] < 1e-5 and d["grads"] < 1e-6 < d["grads_scale"], d
        assert d["losses"] < 1e-5 and d["params"] < 1e-5 and d["val"] < 1e-5, d
        assert d["loss_values"][-1] < d["loss_values"][0]  # it learns


def test_a_sequence_length_splash_cannot_take_is_one_line():
    with pytest.raises(UserError) as e:
        GPTConfig(block_size=100, attention_impl="splash")
    assert "\n" not in str(e.value) and "multiple of 128" in str(e.value)
    assert "block_size=100" in str(e.value)
    GPTConfig(block_size=100, attention_impl="auto")  # auto: xla for it, no error


@pytest.mark.parametrize("backend,block_size,expected", [
    ("tpu", 1024, "splash"), ("tpu", 100, "xla"), ("gpu", 1024, "xla"), ("cpu", 1024, "xla")])
def test_auto_is_splash_on_a_tpu_where_the_shape_allows(backend, block_size, expected):
    impl, why = splash.resolve_impl(GPTConfig(block_size=block_size, attention_impl="auto"),
                                    backend)
    assert impl == expected and why
    assert splash.resolve_impl(GPTConfig(attention_impl="xla"), "tpu")[0] == "xla"


def test_auto_on_this_cpu_is_the_xla_path():
    """Off a TPU "auto" resolves to xla while tracing: the same logits as xla's."""
    idx = jnp.arange(64)[None] % 67  # (1, T) T = 64: neither splash's nor relevant here
    cfg = dict(SMALL, block_size=64)
    params = GPT(GPTConfig(**cfg)).init(jax.random.PRNGKey(0), idx)
    a = GPT(GPTConfig(**cfg, attention_impl="auto")).apply(params, idx)
    b = GPT(GPTConfig(**cfg, attention_impl="xla")).apply(params, idx)
    np.testing.assert_array_equal(a, b)


def test_block_sizes_are_the_largest_that_divide():
    assert splash.block_sizes(1024).block_q == 512 and splash.block_sizes(128).block_kv == 128
    assert splash.block_sizes(384).block_q_dkv == 128 and splash.block_sizes(768).block_q == 256
    assert not splash.takes(64) and not splash.takes(200) and splash.takes(2048)


if __name__ == "__main__":
    worker(*sys.argv[1:])
