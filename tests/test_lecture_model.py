"""configs/lecture.py is the lecture's gpt.py: its weights map onto the `heads` GPT and give
gpt.py's logits (a numpy transcription of its modules below), its parameter count, its init,
its AdamW and its loop."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import lecture, lecture_cpu
from jaxgpt import optim, pretrained, training
from jaxgpt.config import validate
from jaxgpt.convert import from_lecture
from jaxgpt.errors import UserError
from jaxgpt.model import GPT, Block, GPTConfig, count_params, make_model
from tests.conftest import tiny

SIZES = dict(vocab_size=11, block_size=8, n_embd=12, n_head=3, n_layer=2)


def lecture_state_dict(seed=0, vocab_size=11, block_size=8, n_embd=12, n_head=3, n_layer=2):
    """gpt.py's GPTLanguageModel().state_dict() naming and torch (out, in) layouts; random
    values (biases and LayerNorm affine parameters too, so each one's mapping is checked)."""
    rng = np.random.default_rng(seed)
    C, hs = n_embd, n_embd // n_head
    r = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)  # noqa: E731
    sd = {"token_embedding_table.weight": r(vocab_size, C),
          "position_embedding_table.weight": r(block_size, C),
          "ln_f.weight": 1 + r(C), "ln_f.bias": r(C),
          "lm_head.weight": r(vocab_size, C), "lm_head.bias": r(vocab_size)}
    for i in range(n_layer):
        b = f"blocks.{i}"
        for h in range(n_head):
            for name in ("key", "query", "value"):
                sd[f"{b}.sa.heads.{h}.{name}.weight"] = r(hs, C)
            sd[f"{b}.sa.heads.{h}.tril"] = np.tril(np.ones((block_size, block_size), np.float32))
        sd[f"{b}.sa.proj.weight"], sd[f"{b}.sa.proj.bias"] = r(C, C), r(C)
        sd[f"{b}.ffwd.net.0.weight"], sd[f"{b}.ffwd.net.0.bias"] = r(4 * C, C), r(4 * C)
        sd[f"{b}.ffwd.net.2.weight"], sd[f"{b}.ffwd.net.2.bias"] = r(C, 4 * C), r(C)
        for ln in ("ln1", "ln2"):
            sd[f"{b}.{ln}.weight"], sd[f"{b}.{ln}.bias"] = 1 + r(C), r(C)
    return sd


def lecture_forward(sd, idx, n_layer, n_head):
    """GPTLanguageModel.forward of gpt.py in numpy (eval mode: dropout is the identity)."""
    linear = lambda x, n: x @ sd[n + ".weight"].T + sd.get(n + ".bias", 0)  # noqa: E731

    def layer_norm(x, n):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * sd[n + ".weight"] + sd[n + ".bias"]

    def head(x, n):
        T = x.shape[1]
        k, q, v = (linear(x, f"{n}.{name}") for name in ("key", "query", "value"))
        wei = q @ k.transpose(0, 2, 1) * k.shape[-1] ** -0.5  # (B, T, T)
        wei = np.where(sd[n + ".tril"][:T, :T] == 0, -np.inf, wei)
        wei = np.exp(wei - wei.max(-1, keepdims=True))
        return wei / wei.sum(-1, keepdims=True) @ v  # (B, T, hs)

    T = idx.shape[1]
    x = sd["token_embedding_table.weight"][idx] + sd["position_embedding_table.weight"][:T]
    for i in range(n_layer):
        b = f"blocks.{i}"
        h = layer_norm(x, b + ".ln1")
        x = x + linear(np.concatenate([head(h, f"{b}.sa.heads.{j}") for j in range(n_head)],
                                      -1), b + ".sa.proj")
        h = np.maximum(linear(layer_norm(x, b + ".ln2"), b + ".ffwd.net.0"), 0)  # ReLU
        x = x + linear(h, b + ".ffwd.net.2")
    return linear(layer_norm(x, "ln_f"), "lm_head")  # (B, T, vocab)


def test_from_lecture_gives_gpt_py_logits():
    sd = lecture_state_dict()
    config, params = from_lecture(sd)
    assert (config.vocab_size, config.block_size, config.n_embd, config.n_head,
            config.n_layer) == (11, 8, 12, 3, 2)
    idx = np.random.default_rng(1).integers(0, 11, (2, 8))
    want = lecture_forward(sd, idx, n_layer=2, n_head=3)
    got = GPT(config).apply({"params": params}, jnp.asarray(idx))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # the lm_head bias is part of it: without it the logits move by the bias
    no_bias = {**sd, "lm_head.bias": np.zeros_like(sd["lm_head.bias"])}
    assert np.abs(lecture_forward(no_bias, idx, 2, 3) - got).max() > 0.1


def test_from_lecture_params_are_the_lecture_configs_model():
    """The converted tree has exactly the shapes configs/lecture.py's model initialises."""
    config, params = from_lecture(lecture_state_dict())
    c = lecture.get_config()
    for k, v in SIZES.items():
        c[k] = v
    model = make_model(c, vocab_size=11)
    assert model.config == config
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, shapes["params"])


def test_from_lecture_names_a_missing_weight():
    sd = lecture_state_dict()
    del sd["lm_head.bias"]
    with pytest.raises(UserError, match="lm_head.bias"):
        from_lecture(sd)


def test_lecture_parameter_count_is_gpt_pys():
    """gpt.py prints 10.788929 M parameters: every parameter, position embeddings included."""
    model = make_model(lecture.get_config(), vocab_size=65)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    C, L, V, T = 384, 6, 65, 256
    per_block = 3 * C * C + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C) + 4 * C
    n = count_params(shapes["params"], non_embedding=False)
    assert n == L * per_block + V * C + T * C + 2 * C + (C * V + V)
    assert f"{n / 1e6} M parameters" == "10.788929 M parameters"


def test_lecture_init_is_normal_002_everywhere():
    c = lecture.get_config()
    c.n_layer = 6
    model = make_model(c, vocab_size=65)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    for name in (("h_5", "mlp", "c_proj"), ("h_5", "attn", "c_proj"), ("h_0", "mlp", "c_fc")):
        p = params[name[0]][name[1]][name[2]]
        assert abs(float(np.std(p["kernel"])) - 0.02) < 0.002, name  # not 0.02/sqrt(12)
        assert not np.any(p["bias"])
    assert abs(float(np.std(params["wpe"]["embedding"])) - 0.02) < 0.002
    assert not np.any(params["lm_head"]["bias"])


def test_no_dropout_on_the_embeddings():
    """The first Block sees tok_emb + pos_emb as they are (gpt.py), or dropped out (nanoGPT)."""
    def block_0_input(embd_dropout):
        config = GPTConfig(**SIZES, dropout=0.5, embd_dropout=embd_dropout)
        model, idx = GPT(config), jnp.arange(8)[None] % 11
        params = model.init(jax.random.PRNGKey(0), idx)["params"]
        seen = []

        def record(f, args, kwargs, context):
            if (isinstance(context.module, Block) and context.module.name == "h_0"
                    and context.method_name == "__call__"):
                seen.append(args[0])
            return f(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply({"params": params}, idx, deterministic=False,
                        rngs={"dropout": jax.random.PRNGKey(1)})
        emb = params["wte"]["embedding"][idx] + params["wpe"]["embedding"][:8]
        return seen[0], emb

    x, emb = block_0_input(embd_dropout=False)
    np.testing.assert_array_equal(x, emb)
    x, emb = block_0_input(embd_dropout=True)
    assert np.mean(np.asarray(x) == 0) > 0.3  # about half of it dropped


def test_decay_all_is_torch_adamw():
    """torch's AdamW decays every parameter: p -= lr * wd * p (zero grads: no Adam step)."""
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for decay_all, bias_after in ((True, 2.0 - 0.1 * 0.5 * 2.0), (False, 2.0)):
        c = lecture.get_config()
        c.learning_rate, c.weight_decay, c.decay_all = 0.1, 0.5, decay_all
        tx = optim.make_optimizer(c)
        updates, _ = tx.update(zeros, tx.init(params), params)
        new = optax.apply_updates(params, updates)
        np.testing.assert_allclose(new["kernel"], 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)
        np.testing.assert_allclose(new["bias"], bias_after, rtol=1e-6)


def test_lm_head_bias_needs_an_untied_head():
    with pytest.raises(UserError, match="tie_weights=False"):
        GPTConfig(**SIZES, lm_head_bias=True)


def test_the_lectures_loop_evaluates_before_the_last_step(text_file, tmp_path, capsys):
    """End to end (every case of the schedule: tests/test_schedule.py; nanoGPT's loop:
    test_training.py::test_metrics_jsonl_has_the_contracted_keys_and_nanogpts_lr)."""
    c = tiny(text_file, eval_before_last_step=True, max_iters=20, steps_per_call=4,
             param_count="all")
    state = training.train(c, tmp_path)
    assert int(state.step) == 20  # max_iters steps, the last after the last eval
    events = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [0, 10, 19]
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(20))
    out = capsys.readouterr()
    assert " M parameters (devices" in out.out + out.err  # gpt.py's count and wording
    assert pretrained.load_run(tmp_path, "latest").step == 20  # the final state is kept


@pytest.mark.parametrize("recipe", [lecture, lecture_cpu])
def test_lecture_recipes_validate(recipe):
    validate(recipe.get_config())
