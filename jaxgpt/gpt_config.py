"""The model's hyperparameters (nanoGPT's GPTConfig, plus the lecture's variants) and their
checks: the one list of model keys, read by config.py's defaults, the resume and pretrained
checks and convert.py's nanoGPT args. A run's config is validated by building one."""

import dataclasses

import jax.numpy as jnp

from jaxgpt import splash
from jaxgpt.dtype import DTYPES, resolve_dtype
from jaxgpt.errors import UserError

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")  # nanoGPT (exact erf) | GPT-2's original | lecture
ATTENTIONS = ("fused", "heads")  # one batched op (exercise 1, nanoGPT) | one `Head` per head
# explicit softmax | jax.nn.dot_product_attention | Pallas splash (TPU) | auto (splash.resolve_impl)
ATTENTION_IMPLS = ("softmax", "xla", "cudnn", "splash", "auto")
POSITIONS = ("learned", "rope")  # a learned embedding per position (wpe) | rotary q and k


def _key(default, *, weights: bool = False, nanogpt: bool = False):
    """A GPTConfig field. weights: the params depend on it, so a resumed run and a run started
    from trained weights must keep it; nanogpt: one of nanoGPT's `model_args`."""
    return dataclasses.field(default=default, metadata={"weights": weights, "nanogpt": nanogpt})


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The model's hyperparameters; building one checks them (a UserError per bad value)."""

    # context length: the positions a token can look back over
    block_size: int = _key(1024, weights=True, nanogpt=True)
    # GPT-2's 50257 padded up to a multiple of 64, as nanoGPT (a run's config: 0 = the
    # tokenizer's size)
    vocab_size: int = _key(50304, weights=True, nanogpt=True)
    n_layer: int = _key(12, weights=True, nanogpt=True)
    n_head: int = _key(12, weights=True, nanogpt=True)
    n_embd: int = _key(768, weights=True, nanogpt=True)
    dropout: float = _key(0.0, nanogpt=True)
    # biases in Linears and LayerNorms, as GPT-2
    bias: bool = _key(True, weights=True, nanogpt=True)
    # "fused": all heads in one batched op (CausalSelfAttention, exercise 1, nanoGPT) |
    # "heads": one `Head` module per head (the lecture)
    attention: str = _key("fused", weights=True)
    # the fused path: explicit softmax | a kernel of attention.py's KERNELS ("xla", "cudnn",
    # "splash": Pallas, TPU; interpreted elsewhere) | "auto" (splash on a TPU if it fits, else xla)
    attention_impl: str = _key("softmax")
    # gelu (nanoGPT, exact erf) | gelu_tanh (GPT-2's original) | relu (the lecture)
    activation: str = _key("gelu", weights=True)
    # lm_head shares wte's weights (nanoGPT); the lecture has its own output layer
    tie_weights: bool = _key(True, weights=True)
    # a bias in the untied lm_head (the lecture's nn.Linear)
    lm_head_bias: bool = _key(False, weights=True)
    # dropout on tok_emb + pos_emb (nanoGPT); the lecture has none
    embd_dropout: bool = _key(True)
    # GPT-2's 1/sqrt(2 n_layer) init of residual projections; the lecture inits all at 0.02
    scale_residual_init: bool = _key(True)
    # "learned": a position table (wpe) added to tok_emb | "rope": q and k rotated (RoPE),
    # whose KV cache keeps decoding past block_size one token at a time (docs/sampling.md)
    position: str = _key("learned", weights=True)
    # compute dtype; "auto": by the device (dtype.auto_dtype: bfloat16 on TPUs and GPUs from
    # Ampere, float16 with loss scaling on older GPUs, float32 on CPUs); params always float32
    dtype: str = _key("auto")
    # recompute each Block in the backward pass (jax.checkpoint): memory for compute
    remat: bool = _key(False)

    def __post_init__(self):
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) <= 0:
                raise UserError(f"{key}={getattr(self, key)}: must be a positive integer")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                            "pick n_embd a multiple of n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout={self.dropout}: must be in [0, 1)")
        _one_of("activation", self.activation, ACTIVATIONS)
        _one_of("attention", self.attention, ATTENTIONS)
        _one_of("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        splash.check(self)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("position", self.position, POSITIONS)
        if self.position == "rope" and self.head_size % 2:
            raise UserError(f"position='rope' rotates pairs of channels: head_size="
                            f"{self.head_size} (n_embd / n_head) must be even")
        if self.lm_head_bias and self.tie_weights:
            raise UserError("lm_head_bias=True needs an untied lm_head: set tie_weights=False "
                            "(the tied head is wte's transpose, with no bias)")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self):
        return jnp.dtype(resolve_dtype(self.dtype))

    @classmethod
    def keys(cls, marker: str | None = None) -> tuple[str, ...]:
        """The field names, in order; with a marker ("weights", "nanogpt") those it marks."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if marker is None or f.metadata[marker])

    @classmethod
    def from_config(cls, config, vocab_size: int) -> "GPTConfig":
        """The model part of a run's ml_collections config; `vocab_size` from the tokenizer."""
        names = set(cls.keys()) - {"vocab_size"}
        return cls(vocab_size=config.vocab_size or vocab_size, **{n: config[n] for n in names})


# the keys a run's params depend on: `model` (gpt | bigram) and GPTConfig's weight keys
WEIGHT_KEYS = ("model", *GPTConfig.keys("weights"))


def _one_of(key, value, allowed):
    if value not in allowed:
        raise UserError(f"{key}={value!r}: must be one of {', '.join(allowed)}")
