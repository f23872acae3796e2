"""Pallas splash attention: causal attention whose (T, T) scores never leave the chip.

`jax.nn.dot_product_attention(implementation="xla")` writes every head's (T, T) scores and
softmax weights to HBM and reads them back in the backward pass; on a TPU the Pallas splash
kernel (`jax.experimental.pallas.ops.tpu.splash_attention`, a flash-attention variant) computes
them block by block in VMEM instead: one layer of GPT-2 124M (8 x 12 heads x 1024 x 64, bf16,
forward + backward on one v5e chip) compiles with 96.6 MiB of temporaries instead of 576.3 MiB.

- `attention(q, k, v, pos)`: q, k, v (B, nh, T, hs) -> y (B, nh, T, hs), causal, the same
  function as the explicit softmax path (tests/test_splash.py). One kernel per example
  (`jax.vmap`). XLA does not partition a Pallas call, so under a mesh (`jax.sharding.
  use_abstract_mesh`, which `parallel.traced_in` sets for the training, eval and HellaSwag
  calls) it runs under `jax.shard_map` over the batch axes (data, fsdp): every device runs the
  kernel on its own rows. Off a TPU the same kernel runs in Pallas's interpret mode (slow, exact).
- `block_sizes(T)`: the kernel's tiles: query and key blocks of min(512, T) (the largest of 512,
  256, 128 that divides T), forward and backward alike; all heads in one call (head_shards=1).
- `check(config)`: attention_impl="splash" needs block_size a multiple of 128 (one line if not).
- `resolve_impl(config, backend)`: what attention_impl="auto" means there (splash on a TPU where
  the shape allows, xla elsewhere) and why.

The KV-cache decode (T = 1 query against S slots), calls whose T is not a multiple of 128
(sampling's uncached forward, HellaSwag's rows) and training with attention dropout take the
other paths (attention.py, model.py): the kernel has no dropout and is written for S = T.
"""

import functools
import importlib

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxgpt.errors import UserError

LANES = 128  # a TPU vector register's lanes: every block must be a multiple
BLOCKS = (512, 256, 128)  # tried in order: the largest that divides T
BATCH_AXES = ("data", "fsdp")  # parallel.BATCH_AXES: the mesh axes the batch is split over
PALLAS = "jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_"


def _pallas(name: str):
    """JAX's splash module `name` ("kernel" or "mask"), imported when first used: importing
    Pallas's TPU lowering takes ≈ 0.2 s, which every start-up on a CPU or a GPU would pay."""
    return importlib.import_module(PALLAS + name)


def takes(T: int) -> bool:
    """Whether the kernel takes sequences of length T (queries = keys = T)."""
    return T >= LANES and T % LANES == 0


def block_sizes(T: int):
    """The kernel's tiles (BlockSizes) for sequences of T: query and key blocks of the largest
    of 512, 256, 128 dividing T, the same for the forward and both backward kernels (dq and
    dk/dv)."""
    b = next(b for b in BLOCKS if T % b == 0)
    return _pallas("kernel").BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def check(config) -> None:
    """One line if attention_impl="splash" cannot take the config's sequences (block_size)."""
    if config.attention_impl == "splash" and not takes(config.block_size):
        raise UserError(f"attention_impl='splash' needs block_size a multiple of {LANES} (128, "
                        f"256, ..., 1024, ...): block_size={config.block_size}; use "
                        "attention_impl='xla' for it")


def platform() -> str:
    """The platform being compiled for: the mesh's (set by the caller, e.g. a TPU slice's
    devices compiled on a CPU by jaxgpt.aot), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh.abstract_device.platform
    return jax.default_backend()


def resolve_impl(config, backend: str | None = None) -> tuple[str, str]:
    """(attention_impl, why) that config.attention_impl means on `backend` ("tpu", "gpu",
    "cpu"; default: `platform()`): "auto" is splash on a TPU when it takes block_size, else xla;
    any other value is itself."""
    impl = config.attention_impl
    if impl != "auto":
        return impl, "as configured"
    backend = backend or platform()
    if backend != "tpu":
        return "xla", f"auto: no splash kernel off a TPU ({backend})"
    if not takes(config.block_size):
        return "xla", (f"auto: block_size={config.block_size} is not a multiple of {LANES}, "
                       "which splash needs")
    return "splash", "auto: the Pallas splash kernel on a TPU"


def _kernel(n_head: int, T: int, interpret: bool):
    """The kernel for n_head heads of T (built while tracing: it holds its mask's block tables
    as arrays, which must belong to the trace that uses them)."""
    masks = _pallas("mask")
    mask = masks.MultiHeadMask([masks.CausalMask((T, T))] * n_head)
    return _pallas("kernel").make_splash_mha(mask, block_sizes=block_sizes(T), head_shards=1,
                                             q_seq_shards=1, interpret=interpret)


def _per_example(q, k, v, *, interpret: bool):
    """The kernel on rows q, k, v (b, nh, T, hs): one call per example, q pre-scaled."""
    _, nh, T, hs = q.shape
    scaled = q * np.asarray(hs ** -0.5, q.dtype)  # (b, nh, T, hs) the kernel does not scale
    return jax.vmap(_kernel(nh, T, interpret))(scaled, k, v)  # (b, nh, T, hs)


def attention(q, k, v, pos=0):
    """Causal attention q, k, v (B, nh, T, hs) -> y (B, nh, T, hs) with the splash kernel.

    Keys are the queries' own positions (S = T, `pos` 0: training, eval, prefill). Under a mesh
    whose batch axes divide B, each device runs the kernel on its rows (shard_map); without
    one (a single device: sampling) the kernel runs as is.
    """
    del pos  # S = T: the window starts at position 0 (attention.attention_mask)
    B, nh, T, hs = q.shape
    if k.shape[2] != T or not takes(T):
        raise UserError(f"splash attention takes queries and keys of the same length, a multiple "
                        f"of {LANES}: got {T} queries and {k.shape[2]} keys")
    call = functools.partial(_per_example, interpret=platform() != "tpu")
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names) if not mesh.empty else ()
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if shards == 1 or B % shards:
        return call(q, k, v)  # (B, nh, T, hs)
    spec = P(axes)  # rows split over the batch axes; heads, positions and channels whole
    return jax.shard_map(call, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         axis_names=set(axes), check_vma=False)(q, k, v)  # (B, nh, T, hs)
