"""optimizer="muon": the update against numpy and against optax's Muon, the partition on every
model shape, an exact resume, FSDP shardings of its state, one-line errors."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import _muon as optax_muon

from jaxgpt import aot, bench, flops, optim, parallel, tpus, training
from jaxgpt.config import base_config, validate
from jaxgpt.errors import UserError
from jaxgpt.model import make_model
from tests.conftest import synthetic_text, tiny, xla_flags

ROOT = Path(__file__).resolve().parents[1]


def np_newton_schulz(g, steps):
    """Keller Jordan's zeropower_via_newtonschulz5, in numpy (float64), for (in, out) kernels."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.linalg.norm(x) + 1e-8)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if g.shape[0] > g.shape[1] else x


# Polar Express's 5-step coefficients and safety factor, as modded-nanogpt's train_gpt.py has them
NP_POLAR_EXPRESS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def np_polar_express(g, steps):
    """modded-nanogpt's polar_express in numpy (float64): a per-iteration (a, b, c)."""
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.linalg.norm(x) * 1.02 + 1e-8)
    for a, b, c in NP_POLAR_EXPRESS[:steps]:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def small_tree(seed):
    rng = np.random.default_rng(seed)
    shapes = {"h_0": {"attn": {"c_attn": {"kernel": (8, 24), "bias": (24,)}},
                      "mlp": {"c_proj": {"kernel": (32, 8)}}, "ln_1": {"scale": (8,)}},
              "wte": {"embedding": (11, 8)}}
    return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def muon_config(**kw):
    c = base_config()
    c.update(optimizer="muon", learning_rate=1e-3, min_lr=1e-4, warmup_iters=2, max_iters=10,
             grad_clip=0.0, muon_lr=0.02, muon_momentum=0.9, muon_weight_decay=0.1,
             muon_ns_steps=5, **kw)
    return c


@pytest.mark.parametrize("nesterov", [True, False])
def test_update_equals_numpy_newton_schulz_with_nesterov_momentum(nesterov):
    """Four steps on a small tree: the blocks' kernels move by numpy's orthogonalised
    (bias-corrected, optionally Nesterov) momentum, width-scaled, plus decoupled weight decay,
    at muon_lr on the schedule; the rest exactly as AdamW alone would."""
    config = muon_config(muon_nesterov=nesterov)
    tx, adamw = optim.make_optimizer(config), optim.adamw(config)
    params = small_tree(0)
    state, adam_state = tx.init(params), adamw.init(params)
    beta, lr = config.muon_momentum, optim.lr_schedule(config, peak=config.muon_lr)
    mu = {k: np.zeros_like(params["h_0"][k][n]["kernel"]) for k, n in (("attn", "c_attn"),
                                                                      ("mlp", "c_proj"))}
    p_np = jax.tree.map(lambda x: x.astype(np.float64), params)
    for t in range(1, 5):
        grads = small_tree(t)
        updates, state = tx.update(grads, state, params)
        adam_updates, adam_state = adamw.update(grads, adam_state, params)
        for k, n in (("attn", "c_attn"), ("mlp", "c_proj")):
            g = grads["h_0"][k][n]["kernel"].astype(np.float64)
            mu[k] = beta * mu[k] + (1 - beta) * g
            if nesterov:
                m = beta * mu[k] / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta**t)
            else:
                m = mu[k] / (1 - beta**t)
            fan_in, fan_out = g.shape
            o = np_newton_schulz(m, 5) * math.sqrt(max(1, fan_out / fan_in))
            w = p_np["h_0"][k][n]["kernel"]
            want = -float(lr(t - 1)) * (o + config.muon_weight_decay * w)
            np.testing.assert_allclose(updates["h_0"][k][n]["kernel"], want, rtol=2e-4,
                                       atol=1e-6)
        rest = [("h_0", "attn", "c_attn", "bias"), ("h_0", "ln_1", "scale"),
                ("wte", "embedding")]
        for path in rest:
            got, want = updates, adam_updates
            for key in path:
                got, want = got[key], want[key]
            np.testing.assert_array_equal(got, want)
        params = optax.apply_updates(params, updates)
        p_np = jax.tree.map(lambda x: np.asarray(x, np.float64), params)


def test_newton_schulz_and_momentum_equal_optax_muon():
    """The 2-D transformation gives optax.contrib.scale_by_muon's updates (three steps)."""
    params = {"a": jnp.ones((8, 24)), "b": jnp.ones((32, 8))}
    dims = jax.tree.map(lambda _: optax_muon.MuonDimensionNumbers(), params)
    ours = optim.scale_by_muon(0.95, 5, True, scale="none")
    theirs = optax_muon.scale_by_muon(ns_steps=5, beta=0.95, weight_dimension_numbers=dims)
    s1, s2 = ours.init(params), theirs.init(params)
    for t in range(3):
        grads = jax.tree.map(lambda x: jnp.asarray(x), small_tree(t)["h_0"]["attn"]["c_attn"])
        grads = {"a": grads["kernel"], "b": small_tree(t)["h_0"]["mlp"]["c_proj"]["kernel"]}
        u1, s1 = ours.update(grads, s1)
        u2, s2 = theirs.update(grads, s2)
        for k in params:
            np.testing.assert_allclose(u1[k], u2[k], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s1.mu["a"], s2.mu["a"], rtol=1e-6)


def muon_paths(config, vocab=11):
    model = make_model(config, vocab)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, config.block_size), jnp.int32))["params"]
    labels = optim.muon_labels(params)
    every = {"/".join(k.key for k in path): label
             for path, label in jax.tree_util.tree_leaves_with_path(labels)}
    return {p for p, label in every.items() if label == "muon"}, set(every)


@pytest.mark.parametrize("steps", [3, 5])
@pytest.mark.parametrize("shape", [(8, 24), (32, 8)])
def test_polar_express_equals_numpy(steps, shape):
    g = np.random.default_rng(steps).normal(size=shape)
    got = optim.newton_schulz(jnp.asarray(g, jnp.float32), steps, coeffs="polar_express")
    np.testing.assert_allclose(got, np_polar_express(g, steps), rtol=1e-4, atol=1e-5)


def test_polar_express_ends_closer_to_orthogonal_than_the_quintic():
    """Its purpose: in as many steps, the singular values of the result end nearer 1 (a
    gradient-like matrix: a few large directions over many small ones)."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    v, _ = np.linalg.qr(rng.normal(size=(256, 64)))
    g = (u * np.geomspace(1, 1e-3, 64)) @ v.T  # (64, 256), condition number 1e3
    spread = {}
    for coeffs in ("quintic", "polar_express"):
        for steps in (4, 5):
            s = np.linalg.svd(optim.newton_schulz(jnp.asarray(g, jnp.float32), steps,
                                                  coeffs=coeffs), compute_uv=False)
            spread[coeffs, steps] = np.abs(s - 1).max()
    for steps in (4, 5):
        assert spread["polar_express", steps] < spread["quintic", steps], spread


def test_partition_gpt2_shapes():
    c = base_config()  # GPT-2's layout: fused attention, biases, tied lm_head
    c.update(n_layer=2, n_head=2, n_embd=16, block_size=8)
    muon, every = muon_paths(c)
    assert muon == {f"h_{i}/{m}/kernel" for i in range(2)
                    for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")}
    assert {"wte/embedding", "wpe/embedding", "ln_f/scale", "h_0/attn/c_attn/bias"} <= every


def test_partition_lecture_shapes():
    c = base_config()  # the lecture's: one Head module per head, untied lm_head with a bias
    c.update(n_layer=2, n_head=3, n_embd=12, block_size=8, attention="heads", bias=True,
             tie_weights=False, lm_head_bias=True)
    muon, every = muon_paths(c)
    want = {f"h_{i}/attn/heads_{j}/{w}/kernel" for i in range(2) for j in range(3)
            for w in ("key", "query", "value")}
    want |= {f"h_{i}/{m}/kernel" for i in range(2)
             for m in ("attn/c_proj", "mlp/c_fc", "mlp/c_proj")}
    assert muon == want and "lm_head/kernel" in every - muon


def test_partition_bigram_has_no_muon_group():
    c = base_config()
    c.update(model="bigram", block_size=8)
    muon, every = muon_paths(c)
    assert muon == set() and every == {"token_embedding_table/embedding"}


def losses(workdir):
    events = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").open()]
    return [(e["event"], e["step"], e.get("loss", e.get("val_loss"))) for e in events]


def test_resume_with_muon_equals_uninterrupted(tmp_path):
    """With bfloat16 compute and 2 accumulated micro-batches, too."""
    data = tmp_path / "input.txt"
    data.write_text(synthetic_text(20000))
    config = lambda **kw: tiny(data, optimizer="muon", muon_lr=0.05,  # noqa: E731
                               dtype="bfloat16", gradient_accumulation_steps=2, **kw)
    training.train(config(), tmp_path / "straight")
    training.train(config(max_iters=10), tmp_path / "resumed")
    training.train(config(), tmp_path / "resumed")  # init_from=auto: continues at step 10
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [e[:2] for e in resumed] == [e[:2] for e in straight] and ("train", 19) in [
        e[:2] for e in straight]
    for (event, step, want), (_, _, got) in zip(straight, resumed):
        assert math.isclose(got, want, rel_tol=1e-6), (event, step)
    assert straight[-1][2] < straight[0][2] - 0.5  # it trains


FSDP_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    from jax.sharding import PartitionSpec as P
    from jaxgpt import optim, parallel, step
    from jaxgpt.model import make_model
    from tests.conftest import tiny
    c = tiny(optimizer="muon", n_embd=64, n_head=4)
    c.mesh.data, c.mesh.fsdp = 1, 2
    model = make_model(c, 65)
    state = step.create_train_state(c, model, parallel.make_mesh(c))
    muon_state = state.opt_state[1].inner_states["muon"].inner_state[0]
    spec = lambda x: str(x.sharding.spec)
    labels = jax.tree.leaves(optim.muon_labels(state.params))
    kernels = [p for p, l in zip(jax.tree.leaves(state.params), labels) if l == "muon"]
    mu = jax.tree.leaves(muon_state.mu)  # MaskedNodes (the other params) hold no leaf
    pairs = [(spec(p), spec(m), p.shape == m.shape) for p, m in zip(kernels, mu)]
    print(json.dumps({"pairs": pairs, "n_kernels": len(kernels), "n_mu": len(mu)}))
""")


def test_fsdp_shards_muon_state_like_the_params():
    """On a 2-device fsdp mesh, Muon's momentum of each kernel is sharded as that kernel."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(2),
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", FSDP_WORKER], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["n_mu"] == r["n_kernels"] == 8
    assert all(same_shape for _, _, same_shape in r["pairs"])
    assert sum("fsdp" in p for p, _, _ in r["pairs"]) >= 4  # c_fc, mlp c_proj: 64 x 256
    assert all(p == m for p, m, _ in r["pairs"])


@pytest.mark.parametrize("key, value, says", [
    ("optimizer", "sgd", "must be one of adamw, muon"),
    ("muon_lr", -0.01, "must be > 0"),
    ("muon_momentum", 1.0, "must be in [0, 1)"),
    ("muon_ns_steps", 0, "must be a positive integer"),
    ("muon_ns_coeffs", "cubic", "must be one of quintic, polar_express"),
    ("decay_shape", "step", "must be one of cosine, linear"),
])
def test_wrong_muon_keys_are_one_line(key, value, says):
    c = base_config()
    c[key] = value
    with pytest.raises(UserError) as e:
        validate(c)
    assert says in str(e.value) and f"config.{key}" in str(e.value)
    assert "\n" not in str(e.value)


def test_newton_schulz_flops_of_the_cpu_recipe():
    """Per (m <= n) matrix and iteration: X X^T 2m²n, A A 2m³, B X 2m²n; 4 layers, 5 steps."""
    c = base_config()
    c.update(n_layer=4, n_head=4, n_embd=128, block_size=64, optimizer="muon", muon_ns_steps=5)
    model = make_model(c, 65)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64), jnp.int32))
    per_layer = sum(4 * m * m * n + 2 * m**3 for m, n in
                    ((128, 384), (128, 128), (128, 512), (128, 512)))  # c_attn, c_proj, mlp
    assert flops.optimizer_flops(c, params["params"]) == 4 * 5 * per_layer == 2_348_810_240
    c.optimizer = "adamw"
    assert flops.optimizer_flops(c, params["params"]) == 0


def test_aot_counts_muon_state_and_newton_schulz_flops(tmp_path):
    """jaxgpt.aot on a TPU topology (fsdp 2): the optimizer state is one float32 moment per
    Muon kernel and AdamW's two per other param, each split as its param; the Newton–Schulz
    FLOPs are reported beside the analytic model FLOPs."""
    pytest.importorskip("libtpu")
    (tmp_path / "input.txt").write_text(synthetic_text(20000))
    c = tiny(tmp_path / "input.txt", n_layer=1, n_head=4, n_embd=128, block_size=16,
             batch_size=16, steps_per_call=2, eval_iters=2, optimizer="muon")
    c = aot.for_tpu(c)
    c.mesh.fsdp = 2
    topology = tpus.topology_name("v5p-8")
    built, seconds, compiled = aot.compile_all(c, tpus.devices(topology), everything=False)
    r = aot.report(built, topology, seconds, compiled)
    labels = jax.tree.leaves(optim.muon_labels(built.state.params))
    want = 0
    for p, label in zip(jax.tree.leaves(built.state.params), labels, strict=True):
        n = math.prod(p.shape)
        split = 2 if n >= parallel.FSDP_MIN_SIZE else 1
        want += (4 if label == "muon" else 8) * n // split
    assert want <= r["memory"]["opt_state"] <= want + 64  # + the step counts
    assert r["flops_per_step"]["optimizer"] == optim.newton_schulz_flops(built.state.params, 5)
    assert r["flops_per_step"]["xla"] > r["flops_per_step"]["analytic"]


def test_bench_prints_newton_schulz_flops_beside_the_model_flops(tiny_config):
    tiny_config.optimizer = "muon"
    r = bench.run(tiny_config, quick=True, only="train")
    t = r["train"]
    model = make_model(tiny_config, 65)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, tiny_config.block_size), jnp.int32))["params"]
    assert t["optimizer_flops_per_step"] == optim.newton_schulz_flops(params, 5) > 0
    assert t["mfu"] == pytest.approx(t["achieved_tflops"] / t["peak_tflops"])  # model FLOPs only
    assert "optimizer GFLOP / step" in bench.format_table(r)


def test_resuming_with_another_optimizer_is_one_line(tmp_path):
    data = tmp_path / "input.txt"
    data.write_text(synthetic_text(20000))
    training.train(tiny(data, max_iters=5, eval_interval=5), tmp_path / "run")
    with pytest.raises(UserError, match=r"optimizer \('adamw' -> 'muon'\)") as e:
        training.train(tiny(data, max_iters=10, eval_interval=5, optimizer="muon"),
                       tmp_path / "run")
    assert "\n" not in str(e.value)


def test_polar_express_has_coefficients_for_5_steps_at_most():
    c = base_config()
    c.muon_ns_coeffs, c.muon_ns_steps = "polar_express", 6
    with pytest.raises(UserError, match="muon_ns_steps=6: polar_express has coefficients for at "
                                        "most 5 steps"):
        validate(c)
