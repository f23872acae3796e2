"""nanoGPT, the lecture's gpt.py and Hugging Face GPT-2 weights <-> jaxgpt params (numpy).

The jaxgpt `GPT` with fused attention, exact GELU, LayerNorm eps 1e-5 and a tied head computes
nanoGPT's function, so a nanoGPT checkpoint runs here unchanged:

    ckpt = torch.load("out/ckpt.pt")
    config, params = from_nanogpt(ckpt["model"], ckpt["model_args"])
    logits = GPT(config).apply({"params": params}, idx)

torch is never imported: tensors are accepted through their `.numpy()` when torch is present.
The layouts differ in one place only: torch's `nn.Linear` stores (out, in), flax's `Dense`
kernel is (in, out); Hugging Face's GPT-2 uses `Conv1D`, already (in, out).
"""

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxgpt.errors import UserError
from jaxgpt.gpt_config import GPTConfig
from jaxgpt.model import GPT

_PREFIX = "_orig_mod."  # torch.compile's wrapper prefixes every key of a compiled model
_MODEL_ARGS = GPTConfig.keys("nanogpt")  # nanoGPT's GPTConfig: the keys of its model_args


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (bfloat16 has no numpy dtype: go via float32)
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value, np.float32)


def _linear(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)  # torch (out, in) <-> flax (in, out)


def _params(get, config: GPTConfig, linear_kernel) -> dict:
    """The jaxgpt param tree from `get(name)` in GPT-2 naming (no `transformer.` prefix)."""

    def dense(name):
        p = {"kernel": linear_kernel(get(f"{name}.weight"))}
        if config.bias:
            p["bias"] = get(f"{name}.bias")
        return p

    def norm(name):
        p = {"scale": get(f"{name}.weight")}
        if config.bias:
            p["bias"] = get(f"{name}.bias")
        return p

    params = {"wte": {"embedding": get("wte.weight")}, "wpe": {"embedding": get("wpe.weight")},
              "ln_f": norm("ln_f")}
    for i in range(config.n_layer):
        h = f"h.{i}"
        params[f"h_{i}"] = {
            "ln_1": norm(f"{h}.ln_1"),
            "attn": {"c_attn": dense(f"{h}.attn.c_attn"), "c_proj": dense(f"{h}.attn.c_proj")},
            "ln_2": norm(f"{h}.ln_2"),
            "mlp": {"c_fc": dense(f"{h}.mlp.c_fc"), "c_proj": dense(f"{h}.mlp.c_proj")},
        }
    return params


def _getter(weights: dict, source: str):
    def get(name):
        try:
            return weights[name]
        except KeyError:
            raise UserError(f"{source} has no weight {name!r}: is it a GPT-2 / nanoGPT model "
                            "with the model args given?") from None
    return get


def from_nanogpt(state_dict, model_args: dict) -> tuple[GPTConfig, dict]:
    """nanoGPT's `model.state_dict()` and `model_args` (both in its ckpt.pt) -> (config, params)."""
    missing = [k for k in _MODEL_ARGS if k not in model_args]
    if missing:
        raise UserError(f"model_args lacks {', '.join(missing)}: pass ckpt['model_args'] "
                        "of a nanoGPT checkpoint")
    weights = {}
    for key, value in state_dict.items():
        key = key.removeprefix(_PREFIX).removeprefix("transformer.")
        if not key.endswith(".attn.bias"):  # old nanoGPT's causal-mask buffer, not a weight
            weights[key] = _numpy(value)
    config = GPTConfig(**{k: model_args[k] for k in _MODEL_ARGS},
                       attention="fused", activation="gelu", tie_weights=True)
    return config, _params(_getter(weights, "state_dict"), config, _linear)


def to_nanogpt(config: GPTConfig, params) -> tuple[dict, dict]:
    """jaxgpt params -> (nanoGPT state_dict of numpy arrays, model_args); inverts from_nanogpt.

    The per-head (`attention="heads"`) form is fused on the way out. nanoGPT's GPT has exact
    GELU, a tied head and learned positions, so a ReLU / tanh-GELU / untied / rotary model
    cannot be expressed in it.
    """
    for key, need in (("activation", "gelu"), ("tie_weights", True), ("position", "learned")):
        if getattr(config, key) != need:
            raise UserError(f"to_nanogpt: nanoGPT's GPT has {key}={need!r}, this model has "
                            f"{getattr(config, key)!r}")
    sd = {"transformer.wte.weight": params["wte"]["embedding"],
          "transformer.wpe.weight": params["wpe"]["embedding"]}

    def dense(name, p):
        sd[f"{name}.weight"] = _linear(np.asarray(p["kernel"]))
        if config.bias:
            sd[f"{name}.bias"] = p["bias"]

    def norm(name, p):
        sd[f"{name}.weight"] = p["scale"]
        if config.bias:
            sd[f"{name}.bias"] = p["bias"]

    for i in range(config.n_layer):
        h, p = f"transformer.h.{i}", params[f"h_{i}"]
        attn = p["attn"] if config.attention == "fused" else fuse_heads(p["attn"], config)
        norm(f"{h}.ln_1", p["ln_1"])
        dense(f"{h}.attn.c_attn", attn["c_attn"])
        dense(f"{h}.attn.c_proj", attn["c_proj"])
        norm(f"{h}.ln_2", p["ln_2"])
        dense(f"{h}.mlp.c_fc", p["mlp"]["c_fc"])
        dense(f"{h}.mlp.c_proj", p["mlp"]["c_proj"])
    norm("transformer.ln_f", params["ln_f"])
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied, as nanoGPT stores it
    sd = {k: np.array(v, np.float32) for k, v in sd.items()}
    return sd, {k: getattr(config, k) for k in _MODEL_ARGS}


def from_lecture(state_dict, dropout: float = 0.2) -> tuple[GPTConfig, dict]:
    """The lecture's `GPTLanguageModel().state_dict()` (gpt.py) -> (config, params) of the
    `heads` GPT that computes the same function (configs/lecture.py's model).

    The sizes are read off the shapes; gpt.py's names map as token_embedding_table -> wte,
    position_embedding_table -> wpe, blocks.i -> h_i (sa.heads.h -> attn.heads_h, sa.proj ->
    attn.c_proj, ffwd.net.0 / net.2 -> mlp.c_fc / c_proj, ln1 / ln2 -> ln_1 / ln_2), ln_f,
    lm_head (with its bias). Its causal-mask buffers (`tril`) are not weights.
    """
    weights = {k.removeprefix(_PREFIX): _numpy(v) for k, v in state_dict.items()
               if not k.endswith(".tril")}
    get = _getter(weights, "state_dict")
    wte, wpe = get("token_embedding_table.weight"), get("position_embedding_table.weight")
    n_layer = len({k.split(".")[1] for k in weights if k.startswith("blocks.")})
    n_head = len({k.split(".")[4] for k in weights if k.startswith("blocks.0.sa.heads.")})
    config = GPTConfig(block_size=wpe.shape[0], vocab_size=wte.shape[0], n_layer=n_layer,
                       n_head=n_head, n_embd=wte.shape[1], dropout=dropout, bias=True,
                       attention="heads", activation="relu", tie_weights=False,
                       lm_head_bias=True, embd_dropout=False, scale_residual_init=False,
                       dtype="float32")

    def dense(name, bias=True):
        p = {"kernel": _linear(get(f"{name}.weight"))}
        if bias:
            p["bias"] = get(f"{name}.bias")
        return p

    def norm(name):
        return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}

    params = {"wte": {"embedding": wte}, "wpe": {"embedding": wpe}, "ln_f": norm("ln_f"),
              "lm_head": dense("lm_head")}
    for i in range(n_layer):
        b = f"blocks.{i}"
        heads = {f"heads_{h}": {name: dense(f"{b}.sa.heads.{h}.{name}", bias=False)
                                for name in ("key", "query", "value")} for h in range(n_head)}
        params[f"h_{i}"] = {
            "ln_1": norm(f"{b}.ln1"),
            "attn": {**heads, "c_proj": dense(f"{b}.sa.proj")},
            "ln_2": norm(f"{b}.ln2"),
            "mlp": {"c_fc": dense(f"{b}.ffwd.net.0"), "c_proj": dense(f"{b}.ffwd.net.2")},
        }
    return config, params


def from_hf_gpt2(directory) -> tuple[GPTConfig, dict]:
    """A local Hugging Face GPT-2 directory (config.json + model.safetensors) -> (config, params).

    GPT-2's GELU is the tanh approximation ("gelu_new"), so the config says gelu_tanh; the
    vocabulary stays 50257 (pad it yourself for training speed). Needs `safetensors` (the
    `[hf]` extra), never torch.
    """
    directory = Path(directory)
    config_file, weights_file = directory / "config.json", directory / "model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise UserError(f"{f} not found: pass a Hugging Face GPT-2 directory "
                            "(huggingface-cli download gpt2 --local-dir DIR)")
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise UserError("reading safetensors needs the safetensors package: "
                        "pip install -e '.[hf]'") from None
    hf = json.loads(config_file.read_text())
    activation = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                  "relu": "relu"}.get(hf.get("activation_function", "gelu_new"))
    if activation is None:
        raise UserError(f"{config_file}: activation_function "
                        f"{hf['activation_function']!r} is not supported")
    tied = hf.get("tie_word_embeddings", True)
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                       n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                       bias=True, activation=activation, tie_weights=tied)
    weights = {k.removeprefix("transformer."): v.astype(np.float32)
               for k, v in load_file(weights_file).items()}
    get = _getter(weights, str(weights_file))
    params = _params(get, config, lambda w: w)
    if not tied:  # GPT2LMHeadModel's lm_head is an nn.Linear: (out, in)
        params["lm_head"] = {"kernel": _linear(get("lm_head.weight"))}
    return config, params


# jaxgpt's activation -> GPT2Config's activation_function (GPT-2's own is "gelu_new")
HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def to_hf_gpt2(config: GPTConfig, params) -> tuple[dict, dict]:
    """jaxgpt params -> (GPT2Config as a dict, GPT2LMHeadModel's tensors); inverts
    from_hf_gpt2. GPT-2 always has biases: a bias=False model gets zero biases (the same
    function). Rotary positions and an lm_head bias have no place in GPT-2: refused."""
    for key, need in (("position", "learned"), ("lm_head_bias", False)):
        if getattr(config, key) != need:
            raise UserError(f"GPT-2's architecture cannot hold {key}={getattr(config, key)!r} "
                            f"(it has {key}={need!r}): this model cannot be exported to it")
    sd = {"transformer.wte.weight": params["wte"]["embedding"],
          "transformer.wpe.weight": params["wpe"]["embedding"]}

    def put(name, p, weight):
        sd[f"{name}.weight"] = p[weight]
        sd[f"{name}.bias"] = p["bias"] if config.bias else np.zeros(p[weight].shape[-1])

    for i in range(config.n_layer):
        h, p = f"transformer.h.{i}", params[f"h_{i}"]
        attn = p["attn"] if config.attention == "fused" else fuse_heads(p["attn"], config)
        put(f"{h}.ln_1", p["ln_1"], "scale")
        put(f"{h}.attn.c_attn", attn["c_attn"], "kernel")  # Conv1D: (in, out) as flax
        put(f"{h}.attn.c_proj", attn["c_proj"], "kernel")
        put(f"{h}.ln_2", p["ln_2"], "scale")
        put(f"{h}.mlp.c_fc", p["mlp"]["c_fc"], "kernel")
        put(f"{h}.mlp.c_proj", p["mlp"]["c_proj"], "kernel")
    put("transformer.ln_f", params["ln_f"], "scale")
    if not config.tie_weights:
        sd["lm_head.weight"] = _linear(np.asarray(params["lm_head"]["kernel"]))
    vocab_size, n_embd = np.shape(params["wte"]["embedding"])
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
          "vocab_size": int(vocab_size), "n_positions": config.block_size,
          "n_ctx": config.block_size, "n_embd": int(n_embd), "n_layer": config.n_layer,
          "n_head": config.n_head, "activation_function": HF_ACTIVATION[config.activation],
          "layer_norm_epsilon": 1e-5, "tie_word_embeddings": config.tie_weights,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
          "bos_token_id": 50256, "eos_token_id": 50256, "torch_dtype": "float32"}
    return hf, {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------
# The lecture's per-head params as the fused form's (same function, one batched op)


def fuse_heads(attn: dict, config: GPTConfig) -> dict:
    """A `MultiHeadAttention`'s params as `CausalSelfAttention`'s: the heads' key, query and
    value kernels side by side in one (C, 3C) c_attn (q | k | v, head h at columns h*hs)."""
    kernel = [jnp.concatenate([attn[f"heads_{h}"][name]["kernel"] for h in range(config.n_head)],
                              axis=1) for name in ("query", "key", "value")]  # (C, C) each
    c_attn = {"kernel": jnp.concatenate(kernel, axis=1)}  # (C, 3C)
    if config.bias:  # the lecture's heads have no bias: zeros are the same function
        c_attn["bias"] = jnp.zeros(3 * config.n_embd, jnp.float32)
    return {"c_attn": c_attn, "c_proj": attn["c_proj"]}


def fused(model: nn.Module, params):
    """(model, params) of a `heads` GPT as the same function in fused form; others unchanged.

    The lecture's per-head modules carry no KV cache: sampling runs their weights through
    `CausalSelfAttention` instead.
    """
    if not isinstance(model, GPT) or model.config.attention == "fused":
        return model, params
    cfg = model.config
    params = {name: {**p, "attn": fuse_heads(p["attn"], cfg)} if name.startswith("h_") else p
              for name, p in params.items()}
    return GPT(dataclasses.replace(cfg, attention="fused")), params
