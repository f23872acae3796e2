"""Shared fixtures: a tiny config on a small generated text, so every test runs in seconds."""

import os
import shutil
import tempfile

# The suite trains the same tiny models many times, in this process, in pytest-xdist's workers
# and in the subprocesses tests start: one compilation cache for the whole session (made by the
# first process, inherited by the others through the environment) compiles each program once.
# Not ~/.cache/jaxgpt, train()'s default; the test of the cache gives it a directory of its own.
# Set before jax is imported: JAX reads the threshold (by default only programs that took over
# a second to compile are kept) from the environment once.
_OWN_CACHE = "JAXGPT_COMPILATION_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["JAXGPT_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="jaxgpt-test-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# The suite runs a worker per core: no core is idle for train()'s compile ahead (ahead.py), so
# its runs compile one program after the other (tests/test_ahead.py runs train() with it on)
os.environ.setdefault("JAXGPT_COMPILE_AHEAD", "0")
# The suite's programs are tiny, so compiling them is most of its time: LLVM at -O0 compiles
# them faster (the whole suite: 0.66x its wall on 2 cores) and computes the same functions.
# Subprocesses inherit it; those that need N CPU devices add that flag with `xla_flags(N)`.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess with `devices` CPU devices (JAX fixes the count at import)."""
    return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"


def optimized_env() -> dict:
    """The environment for a subprocess compiled at XLA's default optimisation: for the few
    tests whose run time, not their compiles, is most of their cost (-O0 code runs ~1.5x
    slower)."""
    flags = [f for f in os.environ["XLA_FLAGS"].split()
             if not f.startswith("--xla_backend_optimization_level")]
    return dict(os.environ, XLA_FLAGS=" ".join(flags))


import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxgpt import datasets, parallel  # noqa: E402
from jaxgpt import step as step_lib  # noqa: E402
from jaxgpt.config import base_config  # noqa: E402
from jaxgpt.model import make_model  # noqa: E402


def pytest_sessionfinish(session):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAXGPT_COMPILATION_CACHE"], ignore_errors=True)

SHAKESPEARE = os.environ.get("JAXGPT_SHAKESPEARE", "")  # the real text, for opt-in slow tests


def synthetic_text(n_chars: int = 5000, seed: int = 0) -> str:
    """A small learnable text for tests: short words from a fixed vocabulary, with newlines."""
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    out, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(words, size=rng.integers(3, 8))) + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:n_chars]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(synthetic_text(20000))
    return path


def tiny(data_path="", **overrides):
    """A 2-layer, 32-wide GPT config on `data_path`; overrides as keyword arguments."""
    c = base_config()
    c.dataset = "char"
    c.data_path = str(data_path)
    c.block_size, c.n_layer, c.n_head, c.n_embd = 16, 2, 4, 32
    c.batch_size, c.max_iters, c.eval_interval, c.eval_iters = 8, 20, 10, 2
    c.learning_rate, c.warmup_iters, c.lr_decay_iters, c.min_lr = 3e-3, 2, 20, 3e-4
    c.log_interval, c.steps_per_call = 1, 5
    for k, v in overrides.items():
        c[k] = v
    return c


@pytest.fixture
def tiny_config(text_file):
    return tiny(text_file)


def fresh_state(config):
    """(dataset, model, mesh, a fresh TrainState) of a config, as a run starts."""
    dataset = datasets.load(config)
    model = make_model(config, dataset.tokenizer.vocab_size)
    mesh = parallel.make_mesh(config)
    return dataset, model, mesh, step_lib.create_train_state(config, model, mesh)


def byte_encoding():
    """A stand-in for GPT-2's BPE tables where they cannot be downloaded (offline CI): byte-level
    BPE (no merges, ids < 256) with GPT-2's split pattern, <|endoftext|> = 256."""
    import tiktoken

    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("bytes", pat_str=pat,
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A local GCS emulator with the bucket `test-bucket`, the clients pointed at it through
    their environment variables (kept for the whole test run; subprocesses inherit them)."""
    from tests.gcs_emulator import Emulator

    emulator = Emulator(tmp_path_factory.mktemp("gcs") / "server.log")
    saved = {k: os.environ.get(k) for k in emulator.env}
    os.environ.update(emulator.env)
    yield emulator
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    emulator.stop()
