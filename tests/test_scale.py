"""Mixed precision, gradient accumulation, fused attention, remat, BPE token files, start-up
and the GPT-2 recipe, on one CPU device (multi-device runs: test_parallel.py)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gpt2
from jaxgpt import batches, datasets, parallel, prepare
from jaxgpt import config as config_lib
from jaxgpt import step as step_lib
from jaxgpt import tokenizer as tokenizers
from jaxgpt.data import Dataset
from jaxgpt.errors import UserError
from jaxgpt.dtype import resolve_dtype
from jaxgpt.model import GPT, GPTConfig, count_params, make_model
from jaxgpt.tokenizer import BPETokenizer
from tests.conftest import byte_encoding, tiny


def _setup(config):
    dataset = datasets.load(config)
    model = make_model(config, dataset.tokenizer.vocab_size)
    mesh = parallel.make_mesh(config)
    return dataset, model, mesh, step_lib.create_train_state(config, model, mesh)


def test_gradient_accumulation_k_by_b_equals_one_batch_of_k_times_b(tiny_config):
    """nanoGPT's semantics: 4 micro-batches of 2 step exactly like one batch of 8."""
    dataset, _, _, state = _setup(tiny_config)
    x, y = batches.get_batch(jnp.asarray(dataset.train), jax.random.PRNGKey(0), 8, 16)  # (8, T)
    step = jax.jit(step_lib.train_step)
    key = jax.random.PRNGKey(1)
    big, big_m = step(state, (x[None], y[None]), key)  # (1, 8, T)
    acc, acc_m = step(state, (x.reshape(4, 2, 16), y.reshape(4, 2, 16)), key)  # (4, 2, T)
    np.testing.assert_allclose(acc_m["loss"], big_m["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc_m["grad_norm"], big_m["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _losses(config, steps=4):
    """Losses of `steps` optimizer steps on the same batches whatever the config."""
    dataset, _, _, state = _setup(config)
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


def test_dtype_auto_is_float32_on_cpu():
    assert resolve_dtype("auto") == "float32"  # bfloat16 on GPU / TPU
    assert GPTConfig(dtype="auto").compute_dtype == jnp.float32
    assert resolve_dtype("float16") == "float16"


def _model_pair(dtype="float32", dropout=0.0, **kw):
    base = dict(block_size=16, vocab_size=23, n_layer=2, n_head=4, n_embd=32, dtype=dtype,
                dropout=dropout, **kw)
    a, b = GPT(GPTConfig(attention_impl="softmax", **base)), GPT(GPTConfig(attention_impl="xla",
                                                                        **base))
    idx = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 23)  # (B, T)
    params = a.init(jax.random.PRNGKey(1), idx)["params"]
    return a, b, params, idx


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("bfloat16", 0.05)])
def test_dot_product_attention_matches_explicit_softmax(dtype, atol):
    """jax.nn.dot_product_attention (XLA here, cuDNN on GPUs) = the lecture's masked softmax,
    forward and backward (bf16: both round q, k, v and the output to bf16)."""
    a, b, params, idx = _model_pair(dtype)
    np.testing.assert_allclose(b.apply({"params": params}, idx),
                               a.apply({"params": params}, idx), atol=atol)

    def grads(model):
        return jax.grad(lambda p: model.apply({"params": p}, idx).sum())(params)

    for ga, gb in zip(jax.tree.leaves(grads(a)), jax.tree.leaves(grads(b))):
        np.testing.assert_allclose(gb, ga, atol=atol * 10, rtol=1e-3 if dtype == "float32" else 0.1)


def test_fused_attention_falls_back_to_softmax_with_dropout():
    """The fused kernel has no attention dropout: training with dropout > 0 takes the explicit
    path, so both impls give the same dropped-out logits for the same rng."""
    a, b, params, idx = _model_pair(dropout=0.1)
    rngs = {"dropout": jax.random.PRNGKey(2)}
    out_a = a.apply({"params": params}, idx, deterministic=False, rngs=rngs)
    out_b = b.apply({"params": params}, idx, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(out_a, out_b)


def test_remat_gives_the_same_grads():
    base = dict(block_size=16, vocab_size=23, n_layer=2, n_head=4, n_embd=32)
    plain, remat = GPT(GPTConfig(**base)), GPT(GPTConfig(remat=True, **base))
    idx = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 23)  # (B, T)
    params = plain.init(jax.random.PRNGKey(1), idx)["params"]

    def grads(model):
        loss = lambda p: step_lib.cross_entropy(model.apply({"params": p}, idx), idx)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    for g1, g2 in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat))):
        np.testing.assert_allclose(g2, g1, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# BPE token files


def test_prepare_bpe_writes_nanogpt_bins(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("First Citizen:\nBefore we proceed")
    (src / "sub" / "b.jsonl").write_text(json.dumps({"text": "any further, hear me"}) + "\n\n" +
                                         json.dumps({"text": "speak."}) + "\n")
    tok = BPETokenizer(byte_encoding())  # GPT-2's tables need a download; same code path
    meta = prepare.prepare_bpe(src, tmp_path / "out", val_fraction=0.25, tokenizer=tok)
    docs = ["First Citizen:\nBefore we proceed", "any further, hear me", "speak."]
    expected = sum((tok.encode(d) + [tok.eot_token] for d in docs), [])  # nanoGPT: EOT after each
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert np.concatenate([train, val]).tolist() == expected
    chars = sum(map(len, docs))  # byte tokens: one a character; val is the last 25 % of them
    assert len(val) - val.tolist().count(tok.eot_token) == chars - int(chars * 0.75)
    assert meta["val_tokens"] == len(val)
    assert meta["tokenizer"] == {"kind": "gpt2"} and not list((tmp_path / "out").glob("*.part"))

    config = tiny(dataset="owt", data_dir=str(tmp_path / "out"), block_size=4)
    dataset = datasets.load(config)
    assert dataset.on_host and isinstance(dataset.train, np.memmap)
    assert dataset.tokenizer.vocab_size == 50257  # GPT-2's, known without loading its tables


def test_prepare_cli_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizers, "_gpt2_encoding", byte_encoding)
    (tmp_path / "t.txt").write_text("hello world\n" * 50)
    prepare.prepare_bpe(tmp_path / "t.txt", tmp_path / "owt")
    with pytest.raises(UserError, match="no such file"):
        prepare.prepare_bpe(tmp_path / "missing.txt", tmp_path / "x")
    r = subprocess.run([sys.executable, "-m", "jaxgpt.prepare", str(tmp_path / "missing.txt"),
                        str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "jaxgpt.prepare", str(tmp_path / "t.txt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "expected SOURCE OUT_DIR" in r.stderr
    with pytest.raises(UserError, match="no train.bin/val.bin"):
        datasets.load(tiny(dataset="openwebtext", data_dir=str(tmp_path / "nothing")))
    # data_dir/DATASET also works (nanoGPT's data/openwebtext layout)
    assert datasets.load(tiny(dataset="owt", data_dir=str(tmp_path), block_size=4)).on_host


def test_large_text_files_are_read_in_pieces(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("".join(f"line {i} of the corpus\n" for i in range(2000)))
    pieces = list(prepare._text_chunks(path, chunk_bytes=4096))
    assert len(pieces) > 5 and "".join(pieces) == path.read_text()
    assert all(p.endswith("\n") for p in pieces)  # cut after a newline, never mid-word


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


def test_host_batches_prefetch_in_step_order():
    data = np.arange(5000, dtype=np.uint16)
    config = tiny(seed=0, gradient_accumulation_steps=2, batch_size=4, block_size=8)
    dataset = Dataset(train=data, val=data, tokenizer=None, on_host=True)
    loader = batches.make(dataset, config, parallel.make_mesh(config))
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


# ---------------------------------------------------------------------------------------------
# Start-up and recipes


def test_initialize_distributed(monkeypatch):
    for k in ("JAXGPT_COORDINATOR", "JAXGPT_NUM_PROCESSES", "JAXGPT_PROCESS_ID",
              "JAXGPT_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    assert parallel.initialize_distributed() is False  # single process: nothing to join
    assert parallel.initialize_distributed("127.0.0.1:1234", 1, 0) is False
    with pytest.raises(UserError, match="num_processes"):
        parallel.initialize_distributed("127.0.0.1:1234")
    monkeypatch.setenv("JAXGPT_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.setenv("JAXGPT_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXGPT_PROCESS_ID", "2")
    with pytest.raises(UserError, match="process_id"):
        parallel.initialize_distributed()


def test_batch_must_divide_across_data_parallel_devices():
    mesh = parallel.make_mesh(tiny())
    parallel.check_batch(tiny(batch_size=3), mesh)  # 1 device divides anything
    fake = type("M", (), {"shape": {"data": 4, "fsdp": 2}})()
    with pytest.raises(UserError, match="batch_size=12 does not divide across 8"):
        parallel.check_batch(tiny(batch_size=12), fake)


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


def test_cudnn_attention_needs_a_gpu():
    with pytest.raises(UserError, match="attention_impl='cudnn' needs a GPU"):
        config_lib.validate(tiny(attention_impl="cudnn", dtype="bfloat16"))
