"""convert.py against an independent numpy forward pass of nanoGPT's GPT (model.py, by hand).

Tolerance 5e-5 on logits: float32 rounding is ~2e-6 here, while tanh-GELU instead of exact GELU
alone moves them by ~8e-4, so a wrong activation, layout or split order fails.
"""

import json
import math

import jax
import numpy as np
import pytest

from jaxgpt.convert import from_hf_gpt2, from_nanogpt, to_nanogpt
from jaxgpt.errors import UserError
from jaxgpt.model import GPT, GPTConfig

ARGS = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)
_erf = np.vectorize(math.erf)


def nanogpt_forward(sd, args, idx, gelu="exact"):
    """nanoGPT's GPT.forward in numpy: torch Linear is x @ W.T + b, LayerNorm eps 1e-5."""
    C, nh = args["n_embd"], args["n_head"]
    get = lambda k: sd.get(k)  # noqa: E731  (bias=False: no bias keys)

    def linear(x, name):
        b = get(name + ".bias")
        return x @ sd[name + ".weight"].T + (0 if b is None else b)

    def layer_norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        b = get(name + ".bias")
        return (x - mu) / np.sqrt(var + 1e-5) * sd[name + ".weight"] + (0 if b is None else b)

    def act(x):
        if gelu == "exact":
            return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    B, T = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    for i in range(args["n_layer"]):
        h = f"transformer.h.{i}"
        q, k, v = np.split(linear(layer_norm(x, h + ".ln_1"), h + ".attn.c_attn"), 3, axis=-1)
        q, k, v = (t.reshape(B, T, nh, C // nh).transpose(0, 2, 1, 3) for t in (q, k, v))
        att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(C // nh)
        att = np.where(np.tril(np.ones((T, T), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + linear(y, h + ".attn.c_proj")
        m = act(linear(layer_norm(x, h + ".ln_2"), h + ".mlp.c_fc"))
        x = x + linear(m, h + ".mlp.c_proj")
    x = layer_norm(x, "transformer.ln_f")
    return x @ sd["lm_head.weight"].T


def random_state_dict(bias: bool, seed=0):
    """nanoGPT's state_dict naming and (out, in) Linear layout, random values."""
    rng = np.random.default_rng(seed)
    C, V, T = ARGS["n_embd"], ARGS["vocab_size"], ARGS["block_size"]
    r = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)  # noqa: E731
    sd = {"transformer.wte.weight": r(V, C), "transformer.wpe.weight": r(T, C)}
    linears = {"attn.c_attn": (3 * C, C), "attn.c_proj": (C, C), "mlp.c_fc": (4 * C, C),
               "mlp.c_proj": (C, 4 * C)}
    norms = [f"transformer.h.{i}.{n}" for i in range(ARGS["n_layer"]) for n in ("ln_1", "ln_2")]
    for name in norms + ["transformer.ln_f"]:
        sd[name + ".weight"] = 1 + r(C)
        if bias:
            sd[name + ".bias"] = r(C)
    for i in range(ARGS["n_layer"]):
        for name, shape in linears.items():
            sd[f"transformer.h.{i}.{name}.weight"] = r(*shape)
            if bias:
                sd[f"transformer.h.{i}.{name}.bias"] = r(shape[0])
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


IDX = np.random.default_rng(1).integers(0, ARGS["vocab_size"], (2, ARGS["block_size"]))


@pytest.mark.parametrize("bias", [True, False])
def test_from_nanogpt_computes_nanogpts_function(bias):
    sd = random_state_dict(bias)
    args = {**ARGS, "bias": bias}
    compiled = {"_orig_mod." + k: v for k, v in sd.items()}  # torch.compile's key prefix
    config, params = from_nanogpt(compiled, args)
    logits = GPT(config).apply({"params": params}, IDX)
    np.testing.assert_allclose(logits, nanogpt_forward(sd, args, IDX), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_to_nanogpt_inverts_from_nanogpt_exactly(bias):
    sd = random_state_dict(bias)
    args = {**ARGS, "bias": bias}
    back, back_args = to_nanogpt(*from_nanogpt(sd, args))
    assert back_args == args and back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_heads_model_exports_as_fused_nanogpt():
    """The lecture's per-head form, exported: nanoGPT's forward on the result = our forward."""
    config = GPTConfig(**ARGS, bias=False, attention="heads")
    model = GPT(config)
    params = model.init(jax.random.PRNGKey(0), IDX)["params"]
    sd, args = to_nanogpt(config, params)
    np.testing.assert_allclose(model.apply({"params": params}, IDX),
                               nanogpt_forward(sd, args, IDX), atol=5e-5, rtol=5e-5)


def test_from_hf_gpt2_reads_a_safetensors_directory(tmp_path):
    save_file = pytest.importorskip("safetensors.numpy").save_file
    sd = random_state_dict(bias=True, seed=2)
    # Hugging Face's GPT2Model: no "transformer." prefix, Conv1D weights stored (in, out)
    conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
              ".mlp.c_proj.weight")
    hf = {k.removeprefix("transformer."): (v.T.copy() if k.endswith(conv1d) else v)
          for k, v in sd.items() if k != "lm_head.weight"}
    save_file(hf, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "n_positions": ARGS["block_size"], "vocab_size": ARGS["vocab_size"],
        "n_layer": ARGS["n_layer"], "n_head": ARGS["n_head"], "n_embd": ARGS["n_embd"],
        "activation_function": "gelu_new"}))
    config, params = from_hf_gpt2(tmp_path)
    assert config.activation == "gelu_tanh"
    np.testing.assert_allclose(GPT(config).apply({"params": params}, IDX),
                               nanogpt_forward(sd, {**ARGS, "bias": True}, IDX, gelu="tanh"),
                               atol=5e-5, rtol=5e-5)


def test_bad_inputs_are_clear_errors(tmp_path):
    sd = random_state_dict(bias=True)
    with pytest.raises(UserError, match="model_args lacks"):
        from_nanogpt(sd, {"n_layer": 2})
    del sd["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(UserError, match="h.1.mlp.c_fc.weight"):
        from_nanogpt(sd, {**ARGS, "bias": True})
    relu = GPTConfig(**ARGS, activation="relu")
    with pytest.raises(UserError, match="activation"):
        to_nanogpt(relu, {})
    with pytest.raises(UserError, match="config.json not found"):
        from_hf_gpt2(tmp_path)
