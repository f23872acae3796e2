# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Let's build GPT — in JAX
#
# This notebook walks the path of Andrej Karpathy's lecture *Let's build GPT: from scratch, in
# code, spelled out* in JAX and Flax instead of PyTorch. As in the lecture, you write the model
# yourself, cell by cell — `Head`, `MultiHeadAttention`, `FeedForward`, `Block`, the GPT — and
# train each step, so the lecture's story of a falling validation loss comes out of this
# notebook's own runs. Then the notebook checks that what you wrote is exactly
# `jaxgpt.model.GPT` with the lecture's settings (`attention="heads"`), and only after that shows
# what nanoGPT changes and what each change buys.
#
# **What the lecture builds, and why.** ChatGPT is a language model: given a text, it predicts
# what comes next, one token at a time, and samples from that prediction — a probabilistic
# system, so one prompt gives many answers. The network underneath is the Transformer of the
# 2017 paper "Attention is all you need"; GPT stands for *generatively pretrained transformer*.
# Training ChatGPT itself takes a large slice of the internet and a great deal of compute; the
# lecture trains the same kind of model, a character-level decoder-only Transformer, on a small
# text — tiny Shakespeare, about a million characters — until it writes text that looks like
# Shakespeare. nanoGPT is the lecture author's repository that trains such models (up to GPT-2)
# on one file of model code and one of training code; jaxgpt is both, in JAX.
#
# The style is functional: a module holds no weights, parameters are a value you pass in,
# randomness is a key you pass in, and a training step is a pure function that `jax.jit`
# compiles once. Where the lecture writes a PyTorch line, a comment often shows it beside the JAX
# one; paragraphs marked **the functional lens** explain the JAX idiom a cell uses. Sections end
# with where the idea lives in `jaxgpt` and which test checks it; [lecture.md](lecture.md) has
# the whole table.
#
# **Running it.** The next cell sets up any runtime:
#
# - *a checkout* (`pip install -e ".[notebook]"` installs Jupyter too, then `jupyter lab
#   docs/lets_build_gpt.ipynb`): it finds the checkout and installs nothing;
# - *Colab* (File → Upload notebook, `docs/lets_build_gpt.ipynb`): jaxgpt is not on PyPI, so
#   first give the runtime a copy, in a cell of its own, then run the setup cell:
#   - a clone: `!git clone REPOSITORY_URL /content/jaxgpt` (REPOSITORY_URL: the URL of this
#     project's git repository; any folder one or two levels below the working folder works), or
#   - `%env JAXGPT_SOURCE=git+REPOSITORY_URL` (a git URL), a folder holding a checkout, or the
#     path of a jaxgpt wheel you uploaded (`%env JAXGPT_SOURCE=/content/jaxgpt-0.1.0-py3-none-any.whl`).
#
#   The cell pip-installs jaxgpt from it with the extra the runtime needs — `[cuda12]` on a GPU
#   runtime, `[tpu]` on a TPU runtime, none on a CPU one — plus matplotlib. A fresh install needs
#   no restart; if pip had to replace a package this kernel had already imported, the cell says
#   so and asks for *Runtime → Restart session*, then run it again. When something is missing it
#   prints one line that says what to run.
#
# jaxgpt needs Python 3.12 or newer (Colab's is).
#
# **How long it takes.** Every cell runs on a laptop CPU. Measured on a 2-core CPU that other
# work shared while it ran, so a quiet one is faster (the saved outputs' run; the last cell
# prints the times of your run):
#
# | part | measured on a 2-core CPU |
# |---|---|
# | the lecture's steps, trained one by one | 9 min |
# | the scaled-up GPT, your modules | 12 min |
# | training.train, configs/lecture_cpu.py | 10 min |
# | training.train, configs/shakespeare_cpu.py | 4 min |
# | sampling | under a minute |
# | exercises | 11 min |
# | full size, your GPTLanguageModel | off on a CPU (a GPU or TPU runtime: not measured here) |
# | in all (every cell) | 50 min |
#
# On a GPU or TPU runtime the same cells run unchanged (their times are not measured here), and
# the full-size switch below, on by default there, also trains your model at the lecture's full
# size — the lecture's own result, from your own code.
#
# Solutions to the exercises at the end start hidden (in Colab as forms: double-click to show
# the code): try each exercise first.

# %%
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path


class SetupError(Exception):
    """A setup problem a user can act on: IPython shows its one line, no traceback."""

    def _render_traceback_(self):
        return [f"setup: {self}"]


NOT_FOUND = ("jaxgpt is not installed and no copy of it is here: in Colab run  "
             "!git clone REPOSITORY_URL /content/jaxgpt  (REPOSITORY_URL: this project's git URL) "
             "or  %env JAXGPT_SOURCE=git+REPOSITORY_URL  (or a folder, or a .whl path) in a cell "
             "of its own, then run this cell again; elsewhere: pip install -e PATH_TO_CHECKOUT")

if sys.version_info < (3, 12):
    raise SetupError(f"jaxgpt needs Python 3.12 or newer; this kernel runs {sys.version.split()[0]}")


def is_package(name):
    """Whether `import name` gives a real package. A folder named `name` in a folder on sys.path
    (a clone at /content/jaxgpt, with /content on sys.path) imports as an empty namespace
    package: found by find_spec, but without an origin (no __init__.py)."""
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin is not None


def is_checkout(d):
    return (d / "jaxgpt" / "__init__.py").is_file() and (d / "pyproject.toml").is_file()


def find_checkout():
    """A jaxgpt checkout: this folder or one above it (docs/ of a clone), Colab's
    /content/jaxgpt, or a clone one or two folders below this one."""
    here = Path.cwd()
    below = sorted(p.parent.parent for pattern in ("*/jaxgpt/__init__.py", "*/*/jaxgpt/__init__.py")
                   for p in here.glob(pattern))
    return next((d for d in (here, *here.parents, Path("/content/jaxgpt"), *below)
                 if is_checkout(d)), None)


def accelerator_extra():
    """jaxgpt's extra for this runtime's accelerator: the JAX build that drives it."""
    if os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE") \
            or Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists():
        return "tpu"
    return "cuda12" if shutil.which("nvidia-smi") else None


def requirement(source, extras):
    """pip's requirement for `source`: a URL (git+https://..., git+file://..., a wheel's URL),
    a checkout folder, or a wheel (or sdist) file, with jaxgpt's extras."""
    tag = f"[{extras}]" if extras else ""
    if "://" in source:
        if not source.startswith("git+") and not source.endswith((".whl", ".tar.gz", ".zip")):
            source = "git+" + source  # https://host/owner/jaxgpt(.git): a git repository
        return f"jaxgpt{tag} @ {source}"
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        return f"{path}{tag}"
    if path.is_file():  # a file takes extras only as a file:// URL
        return f"jaxgpt{tag} @ {path.as_uri()}"
    raise SetupError(f"JAXGPT_SOURCE={source}: no such folder or file, and not a URL "
                     "(a git URL starts with git+https://)")


def pip_install(source):
    """Install jaxgpt (not editable: importable at once, no restart) with this runtime's extras."""
    req = requirement(source, ",".join(e for e in ("plot", accelerator_extra()) if e))
    before = {name: m.__version__ for name, m in list(sys.modules.items())
              if "." not in name and isinstance(getattr(m, "__version__", None), str)}
    print(f"pip install '{req}'")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-color", req],
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = [l.strip() for l in (done.stderr + done.stdout).splitlines() if l.strip()]
        error = next((l for l in lines if l.startswith("ERROR")), lines[-1] if lines else "")
        raise SetupError(f"pip could not install {req}: {error or done.returncode}")
    importlib.invalidate_caches()
    for name, version in before.items():  # a package this kernel already imported changed
        try:
            if importlib.metadata.version(name) != version:
                raise SetupError(f"pip replaced {name} {version}, which this kernel had already "
                                 "imported: restart the runtime (Colab: Runtime > Restart "
                                 "session), then run this cell again")
        except importlib.metadata.PackageNotFoundError:
            pass


def deps_installed():
    return all(importlib.util.find_spec(m) for m in ("jax", "flax", "optax", "ml_collections"))


if "jaxgpt" in sys.modules and getattr(sys.modules["jaxgpt"], "__file__", None) is None:
    del sys.modules["jaxgpt"]  # the namespace package an earlier run of this cell imported
checkout = find_checkout()
if not is_package("jaxgpt"):
    source = os.environ.get("JAXGPT_SOURCE")
    if source is None and checkout in (Path.cwd(), *Path.cwd().parents) and deps_installed():
        sys.path.insert(0, str(checkout))  # the checkout this notebook runs from: use it in place
    elif source or checkout:
        pip_install(source or str(checkout))
    else:
        raise SetupError(NOT_FOUND)

import jaxgpt  # noqa: E402  after the install

if getattr(jaxgpt, "__file__", None) is None:
    raise SetupError(f"jaxgpt imports as an empty folder ({list(jaxgpt.__path__)}): {NOT_FOUND}")
if not is_package("configs") and checkout is not None:
    sys.path.insert(0, str(checkout))  # an old install without the recipes: the checkout's
print(f"jaxgpt from {Path(jaxgpt.__file__).parent}; Python {sys.version.split()[0]}; "
      f"{os.cpu_count()} CPU cores")

# %%
import contextlib
import functools
import io
import math
import re
import tempfile
import time
import urllib.request

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from IPython.display import Markdown, display

from jaxgpt import batches, model, plot, pretrained, sampling, training
from jaxgpt.tokenizer import CharTokenizer

absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's informational warnings
print(f"jax {jax.__version__} on {jax.devices()[0].platform}: {jax.devices()}")

TIMES = {}  # seconds per part of the notebook, printed at the end
T_START = time.perf_counter()


@contextlib.contextmanager
def timed(part):
    t0 = time.perf_counter()
    yield
    TIMES[part] = TIMES.get(part, 0.0) + time.perf_counter() - t0


# %% [markdown]
# **Parameters.** `FULL_SIZE` trains your model at the lecture's full size near the end: on by
# default on a GPU or TPU runtime, off on a CPU (where it would take hours); set it here, or
# `JAXGPT_NOTEBOOK_FULL=1` / `0` before starting. `FULL_SIZE_DIR` is where that run keeps its
# checkpoints: point it at a mounted Google Drive folder and a Colab session that disconnects
# resumes where it stopped. `JAXGPT_NOTEBOOK_SMALL=1` shrinks every training run so that CI
# executes every cell in a few minutes; the numbers printed are then not the lecture's.

# %%
SMALL = os.environ.get("JAXGPT_NOTEBOOK_SMALL") == "1"
ACCELERATOR = jax.devices()[0].platform != "cpu"  # a GPU or TPU runtime
FULL_SIZE = os.environ.get("JAXGPT_NOTEBOOK_FULL", "1" if ACCELERATOR else "0") == "1"
FULL_SIZE_DIR = Path("runs") / "notebook_full_size"  # e.g. /content/drive/MyDrive/jaxgpt_full
STAGE_ITERS = 100 if SMALL else 5000  # each step of the lecture's story: its 5000 iterations
STAGE_EVAL_ITERS = 4 if SMALL else 200  # batches per split in each eval: the lecture's 200
BIGRAM_ITERS = 100 if SMALL else 3000  # bigram.py's 3000 iterations
SCALED_ITERS = 30 if SMALL else 2000  # the laptop-size GPT: configs/lecture_cpu.py's 2000
print(f"FULL_SIZE={FULL_SIZE} ({jax.devices()[0].platform}); SMALL={SMALL}")


def small_run(c):
    """CI's settings for a recipe (JAXGPT_NOTEBOOK_SMALL=1): a 2-layer model, tiny evals."""
    if SMALL:
        c.n_layer, c.n_embd, c.block_size = 2, 64, 32
        # one step a call: one compiled training call, where 10 would compile three (10, 9
        # and 1 steps: lecture_cpu.py also evaluates before its last step)
        c.eval_interval, c.eval_iters, c.steps_per_call = 10, 2, 1
    return c


runs_dir = Path(tempfile.mkdtemp(prefix="jaxgpt_notebook_"))  # this notebook run's workdirs

# %% [markdown]
# ## Reading the data
#
# Tiny Shakespeare: 40,000 lines from Shakespeare's plays, about a million characters in one
# file (the lecture's `input.txt`). The path comes from `JAXGPT_SHAKESPEARE` if set; otherwise it is
# downloaded once, as the lecture's `wget` does, into `~/.cache/jaxgpt` (where `train.py` keeps
# it too) — through a `.part` file renamed when complete, so an interrupted download is never
# mistaken for the text.

# %%
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_PATH = Path(os.environ.get("JAXGPT_SHAKESPEARE") or
                 Path.home() / ".cache" / "jaxgpt" / "shakespeare_char" / "input.txt")
if not DATA_PATH.is_file():
    DATA_PATH.parent.mkdir(parents=True, exist_ok=True)
    part = DATA_PATH.with_name(DATA_PATH.name + ".part")
    try:
        urllib.request.urlretrieve(URL, part)
    except OSError as e:
        raise SetupError(f"could not download {URL} ({e}); offline? download it elsewhere and "
                         "set JAXGPT_SHAKESPEARE=/path/to/input.txt before starting") from None
    part.replace(DATA_PATH)  # only a complete file gets the real name
text = DATA_PATH.read_text(encoding="utf-8")
print("length of dataset in characters:", len(text), "| lines:", text.count("\n"))
print(text[:500])

# %% [markdown]
# ## Tokenization and the train/val split
#
# The vocabulary is every character that occurs; a token is a character's index in it.

# %%
chars = sorted(set(text))
vocab_size = len(chars)
print("".join(chars))
print(vocab_size)

stoi = {ch: i for i, ch in enumerate(chars)}
itos = {i: ch for i, ch in enumerate(chars)}
encode = lambda s: [stoi[c] for c in s]  # encoder: take a string, output a list of integers
decode = lambda l: "".join(itos[i] for i in l)  # decoder: a list of integers -> a string
print(encode("hii there"))
print(decode(encode("hii there")))

tokenizer = CharTokenizer.from_text(text)  # jaxgpt's, the same table
assert tokenizer.encode("hii there") == encode("hii there")

# %% [markdown]
# **Other tokenizers.** Characters give a tiny vocabulary and long sequences. Real models use
# sub-word vocabularies: Google's SentencePiece, or OpenAI's tiktoken, whose GPT-2 encoding has
# 50,257 tokens — a much larger vocabulary, much shorter sequences. jaxgpt's GPT-2 recipes use it
# (`tokenizer.BPETokenizer`); the cell shows it where tiktoken and its tables are available.

# %%
try:
    import tiktoken

    enc = tiktoken.get_encoding("r50k_base")  # GPT-2's encoding
    print(f"GPT-2's BPE: {enc.n_vocab} tokens; 'hii there' -> {enc.encode('hii there')}; "
          f"the first 1000 characters: {len(enc.encode(text[:1000]))} tokens")
except Exception as e:  # noqa: BLE001  no tiktoken, or offline without its cached tables
    print(f"tiktoken's GPT-2 encoding is not available here ({type(e).__name__})")

# %% [markdown]
# The whole text as one array of token ids, then the first 90 % for training and the rest for
# validation. A JAX array is immutable, like every value in this notebook: where PyTorch writes
# `a[i] = v`, JAX writes `a = a.at[i].set(v)`, a new array (used below).

# %%
data_all = jnp.array(encode(text), dtype=jnp.int32)  # PyTorch: torch.tensor(encode(text))
print(data_all.shape, data_all.dtype)
print(data_all[:100])
n = int(0.9 * len(data_all))  # first 90% will be train, rest val
train_data, val_data = data_all[:n], data_all[n:]
print(len(train_data), len(val_data))

# %% [markdown]
# *In jaxgpt:* `tokenizer.CharTokenizer`, `datasets.load` (the 90/10 split). *Tests:*
# `test_tokenizer.py::test_char_tokenizer_round_trip`, `test_data.py::test_split_is_90_10_in_order`,
# `test_shakespeare.py::test_the_lectures_dataset_figures` (1,115,394 characters, 65 distinct).
#
# ## Batches of chunks
#
# A chunk of `block_size + 1` tokens holds `block_size` training examples at once: each
# prefix predicts the next token.

# %%
block_size = 8
print(train_data[: block_size + 1])
x, y = train_data[:block_size], train_data[1 : block_size + 1]
for t in range(block_size):
    context, target = x[: t + 1], y[t]
    print(f"when input is {context.tolist()} the target: {int(target)}")

# %% [markdown]
# **The functional lens: explicit random keys.** PyTorch draws from a global generator
# (`torch.manual_seed(1337)`, then `torch.randint(...)`). JAX has no hidden state: a random
# function takes a key, and *the same key gives the same numbers*. So a key is used for one
# draw only: two draws that should be independent — two layers' weights, two steps' batches —
# must get two keys, or they come out the same. Two ways to make new keys:
# `jax.random.split(key, n)` makes n independent keys from one, and `jax.random.fold_in(key, i)`
# makes the i-th key of a stream. A training loop takes step `s`'s batch key as
# `fold_in(batch_key, s)` — so step 1234's batch is the same whether or not steps 0..1233 ran in
# this process (which is how a resumed run continues the same stream). `batches.get_batch` is
# the lecture's `get_batch` as a pure function of (data, key), so it can run inside a compiled
# step.
#
# `jax.random.key(1337)` makes a *typed* key: a scalar of a key dtype (`key<fry>`), which JAX
# refuses to add or multiply by mistake. Older code, and many tutorials, use
# `jax.random.PRNGKey(1337)`, the legacy form: a raw `uint32[2]` array holding the same bits.
# Every `jax.random` function takes either; new code should make typed keys.

# %%
root = jax.random.key(1337)  # PyTorch: torch.manual_seed(1337)
batch_key, init_key, train_key, sample_key, demo_key = jax.random.split(root, 5)
print(root.dtype, root.shape, "| legacy:", jax.random.PRNGKey(1337).dtype,
      jax.random.PRNGKey(1337).shape, "| the same bits:", jax.random.key_data(root))

batch_size = 4  # how many independent sequences will we process in parallel?
xb, yb = batches.get_batch(train_data, jax.random.fold_in(batch_key, 0), batch_size, block_size)
print("inputs:", xb.shape, "\n", xb)
print("targets:", yb.shape, "\n", yb)
for b in range(batch_size):  # batch dimension
    for t in range(block_size):  # time dimension
        print(f"when input is {xb[b, : t + 1].tolist()} the target: {int(yb[b, t])}")
    break  # the first row is enough to see the pattern

# %% [markdown]
# *In jaxgpt:* `batches.get_batch`. *Test:* `test_batches.py::test_get_batch_windows_are_shifted_by_one`.
#
# ## The bigram model
#
# The simplest language model: the current token alone picks a row of a `vocab_size x
# vocab_size` table, read as the logits of the next token. You write it as a Flax module.
#
# **The functional lens: params as a pytree, `init` and `apply`.** A flax module is a
# description. `m.init(key, example)` returns the parameters — a nested dict of arrays (a
# *pytree*) — and `m.apply({"params": params}, idx)` is the forward pass as a function of them.
# PyTorch's `model = BigramLanguageModel(vocab_size)` creates the weights inside the object; here
# nothing is hidden. `@nn.compact` lets `__call__` declare its layers inline, as PyTorch's
# `__init__` + `forward` together (the other style, `setup`, comes with multi-head attention).

# %%
class BigramLanguageModel(nn.Module):
    vocab_size: int

    @nn.compact
    def __call__(self, idx, deterministic=True):
        # each token directly reads off the logits for the next token from a lookup table
        table = nn.Embed(self.vocab_size, self.vocab_size, name="token_embedding_table")
        return table(idx)  # (B, T, C); PyTorch: self.token_embedding_table(idx)


bigram = BigramLanguageModel(vocab_size)
params = bigram.init(init_key, xb)["params"]
print(jax.tree.map(jnp.shape, params))  # the pytree's structure, with shapes as leaves


def loss_fn(m, params, xb, yb, key=None):
    """Mean cross-entropy of m's logits against the targets; `key`: dropout's, when training."""
    logits = m.apply({"params": params}, xb, deterministic=key is None,
                     rngs={"dropout": key} if key is not None else {})  # (B, T, C)
    # F.cross_entropy wants the classes in dimension 1 — (N, C), or (B, C, T) — hence the
    # lecture's view(B*T, C), and averages by default; optax's wants them last, takes any
    # leading shape and returns one loss per position: (B, T, C), (B, T) -> (B, T), so .mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()


logits = bigram.apply({"params": params}, xb)
print(logits.shape)
print(f"loss at init {loss_fn(bigram, params, xb, yb):.4f}; a uniform guess would be "
      f"-ln(1/{vocab_size}) = {math.log(vocab_size):.4f}")

# %% [markdown]
# The loss at init is near `ln 65 ≈ 4.17`, the loss of a uniform guess, a little above it
# because the table starts as random noise (the lecture reports 4.87 with PyTorch's N(0, 1)
# init; flax's default here is N(0, 1/65)). jaxgpt's `model.BigramLanguageModel` is this module:
# given the same table it gives the same logits.

# %%
print("same as jaxgpt's:", np.allclose(
    model.BigramLanguageModel(model.GPTConfig(vocab_size=vocab_size)).apply(
        {"params": params}, xb), logits))

# %% [markdown]
# *Tests:* `test_lecture.py::test_loss_at_init_is_about_ln_vocab`,
# `test_lecture.py::test_bigram_reads_logits_off_the_table`.
#
# **Generation**, the lecture's loop: take the logits at the last position, sample, append,
# repeat. `jax.random.categorical` samples from *logits* (it applies the softmax itself), where
# the lecture's `torch.multinomial` takes probabilities. Each step gets its own key, and each
# sample in this notebook its own `sample_keys[i]`.
#
# **The functional lens: `jax.jit`.** `jax.jit(f)` *traces* `f` once — runs its Python with
# abstract arrays that have a shape and a dtype but no values — into one XLA program, compiles
# it, and runs that program on every later call with arguments of the same shapes and dtypes:
# Python runs only while tracing. The price: a function must be pure (no hidden state), and a new
# input shape traces and compiles again.

# %%
@jax.jit
def next_token(params, idx, key):
    """idx (B, T) -> (B, 1): sample the token that follows each row."""
    logits = bigram.apply({"params": params}, idx)[:, -1, :]  # (B, C) the last position
    return jax.random.categorical(key, logits)[:, None]  # (B, 1); torch.multinomial(probs, 1)


def generate_loop(params, idx, max_new_tokens, key):
    """The lecture's generate: idx (B, T) -> (B, T + max_new_tokens), one Python step a token."""
    keys = jax.random.split(key, max_new_tokens)  # one key per new token
    for i in range(max_new_tokens):
        # the bigram reads only the last token (the lecture passes all of idx): a growing input
        # would compile next_token again at every step
        idx_next = next_token(params, idx[:, -1:], keys[i])  # (B, 1)
        idx = np.concatenate([idx, idx_next], axis=1)  # (B, T+1), grown on the host
    return idx


sample_keys = jax.random.split(sample_key, 8)  # one key per sample drawn in this notebook
start = np.zeros((1, 1), dtype=np.int32)  # token 0 is the newline
print(decode(generate_loop(params, start, 100, sample_keys[0])[0].tolist()))

# %% [markdown]
# Garbage, as expected from random weights.
#
# **The functional lens: what `jit` sees.** Three consequences of tracing, each a common
# surprise. (1) A global a jitted function reads is read *once*, while tracing, and frozen into
# the compiled program as a constant: change it later and the function does not see it (pass
# it as an argument instead). (2) Python side effects — a `print`, appending to a list — run
# while tracing only, so they show *when* a function is traced: on the first call, and again for
# every new input shape or dtype. (3) An argument that must be a Python value while tracing (a
# number of steps for `range`, a shape) is declared static with `static_argnums`: each new value
# traces and compiles again, so keep such values few. And JAX runs asynchronously: a jitted call
# returns as soon as the work is queued, before it is done, so time it with
# `.block_until_ready()` on the result (or after converting it to a Python number).

# %%
scale = 2.0


@jax.jit
def scaled(x):
    return x * scale  # `scale` is read while tracing: 2.0 is now a constant of the program


print("scaled(1.0) =", scaled(1.0))
scale = 3.0
print("after scale = 3.0, scaled(1.0) =", scaled(1.0), "(the traced constant)")

traces = []


@functools.partial(jax.jit, static_argnums=1)
def powers(x, n):  # n is a Python int while tracing: range(n) needs one
    traces.append((x.shape, n))  # a side effect: runs only while tracing
    return sum(x**k for k in range(n))


powers(jnp.ones(3), 4)
powers(jnp.ones(3) * 2, 4)  # same shape, same n: the compiled program, no trace
powers(jnp.ones(5), 4)  # a new shape: traced again
powers(jnp.ones(5), 5)  # a new static value: traced again
print("traced for (shape, n):", traces)

big = jnp.ones((1000, 1000))
matmul = jax.jit(lambda a: a @ a)
matmul(big).block_until_ready()  # compile first: time only the run
t0 = time.perf_counter()
out = matmul(big)  # returns once queued
t1 = time.perf_counter()
out.block_until_ready()  # waits for the result
t2 = time.perf_counter()
print(f"the call returned after {1e3 * (t1 - t0):.2f} ms; the result was ready after "
      f"{1e3 * (t2 - t0):.2f} ms")

# %% [markdown]
# Now train the bigram.
#
# **The functional lens: `jax.value_and_grad`, optax, `lax.scan`, `vmap`.** PyTorch's
# `loss.backward(); optimizer.step()` mutates `.grad` and the weights. In JAX
# `jax.value_and_grad(loss_fn)` is a *new function* returning the loss and the gradient pytree;
# the optax optimizer turns gradients and its own state into updates, and `optax.apply_updates`
# adds them to the params; the step returns the new params and optimizer state. Being pure, the
# whole step compiles with `jax.jit` into one XLA program, the batch sampling included.
# `jax.lax.scan` runs many steps inside one compiled call (a loop whose carry is the params and
# optimizer state). `jax.vmap(f)` maps a function over a leading axis of its arguments as if it
# were written for the whole batch: `estimate_loss` below writes the loss of *one* batch drawn
# from *one* key, and `jax.vmap(one_batch)(keys)` would run it for all `eval_iters` keys at
# once, one batched computation instead of a Python loop. At the lecture's full size that many
# batches at once would not fit in a GPU's memory, so it uses `jax.lax.map(one_batch, keys,
# batch_size=10)`: a compiled loop over chunks of 10 keys, each chunk through `vmap`.
#
# The lecture's video trains every model with PyTorch's default init: uniform ±1/√fan_in for
# `nn.Linear`'s weight and bias, N(0, 1) for `nn.Embedding`. (The repository's `gpt.py`, updated
# after the video, adds `_init_weights` — normal(0.02), zero biases — "not covered in the
# original GPT video".) Params being a pytree, PyTorch's init is a plain function from one
# pytree to another: `pytorch_init` below redraws what `m.init` made.
#
# `estimate_loss` is the lecture's, in JAX: the mean loss over `eval_iters` batches of each
# split. PyTorch needs `@torch.no_grad()` there so that no graph is recorded; JAX computes a
# gradient only where you ask for one (`jax.grad`), so a forward pass records nothing.
#
# `train` takes one key and splits it five ways — init, PyTorch's init, batches, dropout,
# evals — so no key serves two draws. Every step of the story below passes the same `train_key`:
# the same batches in the same order for each model, as the lecture's `torch.manual_seed(1337)`
# at the top of each script gives each of its runs, so the curves differ by the model only.
# With `ckpt_dir` it saves params, optimizer state and curve with orbax after every eval, and
# a second call resumes from the last save (used by the full-size run).

# %%
def make_trainer(m, data, batch_key, dropout_key, *, learning_rate, batch_size, block_size,
                 eval_iters, steps_per_call):
    """(optimizer, train_steps, estimate_loss) for module m: the lecture's loop as two compiled
    functions. AdamW as torch.optim.AdamW's defaults (betas 0.9/0.999, weight decay 0.01 on
    every param)."""
    train_data, val_data = data
    optimizer = optax.adamw(learning_rate, weight_decay=0.01)

    def train_step(carry, step):
        params, opt_state = carry
        xb, yb = batches.get_batch(train_data, jax.random.fold_in(batch_key, step), batch_size,
                                   block_size)  # sample a batch: step's own key
        loss, grads = jax.value_and_grad(functools.partial(loss_fn, m))(
            params, xb, yb, jax.random.fold_in(dropout_key, step))  # loss.backward()
        updates, opt_state = optimizer.update(grads, opt_state, params)  # optimizer.step()
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def train_steps(params, opt_state, first_step):
        steps = first_step + jnp.arange(steps_per_call)
        (params, opt_state), losses = jax.lax.scan(train_step, (params, opt_state), steps)
        return params, opt_state, losses  # losses (steps_per_call,)

    @jax.jit
    def estimate_loss(params, key):
        out = {}
        for split, d in (("train", train_data), ("val", val_data)):
            keys = jax.random.split(jax.random.fold_in(key, split == "val"), eval_iters)
            one_batch = lambda k: loss_fn(m, params, *batches.get_batch(d, k, batch_size,
                                                                        block_size))
            # one_batch over every key: jax.vmap of chunks of 10 keys, in a compiled loop
            out[split] = jax.lax.map(one_batch, keys, batch_size=10).mean()
        return out

    return optimizer, train_steps, estimate_loss


def pytorch_init(params, key):
    """PyTorch's default init over a params pytree, or its shapes alone (`jax.eval_shape` of
    m.init): nn.Linear's weight and bias U(±1/√fan_in), nn.Embedding N(0, 1), LayerNorm's ones
    and zeros. A pure function: new params out."""
    if not isinstance(params, dict):
        return params
    if "scale" in params:  # a LayerNorm
        return {"scale": jnp.ones(params["scale"].shape), "bias": jnp.zeros(params["bias"].shape)}
    if "kernel" in params:  # a Dense layer: kernel (fan_in, out) [, bias (out,)]
        bound = params["kernel"].shape[0] ** -0.5
        return {name: jax.random.uniform(k, p.shape, minval=-bound, maxval=bound)
                for (name, p), k in zip(params.items(), jax.random.split(key, len(params)))}
    if "embedding" in params:
        return {"embedding": jax.random.normal(key, params["embedding"].shape)}
    return {name: pytorch_init(p, k)  # a module of modules
            for (name, p), k in zip(params.items(), jax.random.split(key, len(params)))}


def train(m, *, max_iters, key=train_key, data=(train_data, val_data), params=None,
          eval_interval=500, eval_iters=STAGE_EVAL_ITERS, learning_rate=1e-3, batch_size=32,
          block_size=8, name=None, pytorch_defaults=True, ckpt_dir=None):
    """Train m as the lecture does: an eval every eval_interval steps and at the end.
    params: start from these (finetuning), else init — with PyTorch's default init if
    pytorch_defaults (the video's), else the modules' own. ckpt_dir: save after every eval,
    resume from the last save. Returns (params, {"step", "train", "val"})."""
    init_k, torch_k, batch_k, dropout_k, eval_k = jax.random.split(key, 5)
    eval_interval = min(eval_interval, max_iters)
    optimizer, train_steps, estimate_loss = make_trainer(
        m, data, batch_k, dropout_k, learning_rate=learning_rate, batch_size=batch_size,
        block_size=block_size, eval_iters=eval_iters, steps_per_call=eval_interval)
    if params is None:
        example = jnp.zeros((1, block_size), jnp.int32)
        if pytorch_defaults:  # PyTorch's values on the params' shapes (eval_shape computes none)
            params = pytorch_init(jax.eval_shape(m.init, init_k, example)["params"], torch_k)
        else:
            params = jax.jit(m.init)(init_k, example)["params"]
    opt_state = optimizer.init(params)
    curve, first = {"step": [], "train": [], "val": []}, 0
    saver = None if ckpt_dir is None else ocp.CheckpointManager(
        Path(ckpt_dir).absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=1))
    if saver is not None and saver.latest_step() is not None:  # resume where the last save was
        first = saver.latest_step()
        saved = saver.restore(first, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"params": params, "opt_state": opt_state}),
            curve=ocp.args.JsonRestore()))
        params, opt_state, curve = saved.state["params"], saved.state["opt_state"], saved.curve
        print(f"resumed at step {first} from {ckpt_dir}")
    t0 = time.perf_counter()
    for step in range(first, max_iters + 1, eval_interval):
        if not curve["step"] or curve["step"][-1] != step:  # (a resumed step has its eval)
            losses = estimate_loss(params, jax.random.fold_in(eval_k, step))
            for split in ("train", "val"):
                curve[split].append(float(losses[split]))  # float(): waits for the result
            curve["step"].append(step)
            if saver is not None:
                saver.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                    curve=ocp.args.JsonSave(curve)))
        if step < max_iters:
            params, opt_state, _ = train_steps(params, opt_state, step)
    if saver is not None:
        saver.wait_until_finished()
    n_params = sum(p.size for p in jax.tree.leaves(params))
    print(f"{name or type(m).__name__}: {n_params:,} params, step {max_iters}: train loss "
          f"{curve['train'][-1]:.4f}, val loss {curve['val'][-1]:.4f} "
          f"({time.perf_counter() - t0:.0f} s)")
    return params, curve


RESULTS = {}  # stage -> its val-loss curve: the lecture's story, measured here

with timed("the lecture's steps, trained one by one"):  # bigram.py's settings
    params, RESULTS["bigram"] = train(bigram, max_iters=BIGRAM_ITERS, eval_interval=300,
                                      learning_rate=1e-2, name="bigram")
print(decode(generate_loop(params, start, 300, sample_keys[1])[0].tolist()))

# %% [markdown]
# **The functional lens: `jax.lax.scan` for the sampler.** The loop above returns to Python
# after every token, and its `idx` changes shape at every step. A sampler that is one compiled
# program carries a fixed-shape state through `jax.lax.scan` instead: here the last token, since
# the bigram looks at nothing else. Given the same keys as the loop — reused on purpose, to
# compare the two — it draws exactly the same tokens.

# %%
@jax.jit
def generate_scan(params, last, keys):
    """last (B,) token ids, keys (N,) -> (B, N) new tokens, one compiled loop."""

    def step(tok, key):  # carry: the last token (B,); one key per step
        logits = bigram.apply({"params": params}, tok[:, None])[:, -1, :]  # (B, C)
        tok = jax.random.categorical(key, logits)  # (B,)
        return tok, tok

    _, toks = jax.lax.scan(step, last, keys)  # toks (N, B)
    return toks.T  # (B, N)


looped = generate_loop(params, start, 50, sample_keys[2])[:, 1:]
scanned = generate_scan(params, start[:, -1], jax.random.split(sample_keys[2], 50))
assert (looped == scanned).all()  # the same tokens from the same keys
print("the scan draws the loop's tokens:", bool((looped == scanned).all()))

# %% [markdown]
# Not Shakespeare, but it has learned which letters follow which. The tokens do not talk to
# each other yet: that is the next step.
#
# ## Port our code to a script
#
# At this point the lecture moves the notebook's code into one file, `bigram.py`: the
# hyperparameters at the top, then the data, `get_batch`, `estimate_loss`, the model, the loop
# and a sample at the end, run with `python bigram.py`; it also moves tensors to the GPU when
# there is one (`device = 'cuda'`, `.to(device)`). In JAX there is nothing to move: arrays live
# on the default device, a GPU or TPU when there is one. In jaxgpt the script is `train.py`,
# one for every model, and the hyperparameters are a config file: `python train.py --config
# configs/bigram.py` trains this bigram with bigram.py's settings (the cell above used them
# too: lr 1e-2 for 3000 steps, an eval every 300), and any setting can be changed on the command
# line (`--config.learning_rate=3e-3`). Its settings:

# %%
from configs import bigram as bigram_recipe  # noqa: E402  the recipes, installed with jaxgpt

print({k: v for k, v in bigram_recipe.get_config().items()
       if k in ("batch_size", "block_size", "max_iters", "eval_interval", "learning_rate",
                "eval_iters")})

# %% [markdown]
# *In jaxgpt:* `model.BigramLanguageModel`, `configs/bigram.py`, `train.py`.
#
# ## The mathematical trick in self-attention
#
# First, a toy: multiplying by a lower-triangular matrix of ones *sums* the rows above; with each
# row of the triangle normalised to sum to 1, it *averages* them.

# %%
a = jnp.tril(jnp.ones((3, 3)))
a = a / a.sum(1, keepdims=True)
b = jax.random.randint(jax.random.key(42), (3, 2), 0, 10).astype(jnp.float32)
c = a @ b
print("a=\n", a, "\nb=\n", b, "\nc=\n", c)  # row t of c: the mean of rows 0..t of b

# %% [markdown]
# We want token `t` to see a summary of tokens `0..t` and nothing of the future. The simplest
# summary is the mean. Four ways to compute it:

# %%
B, T, C = 4, 8, 2  # batch, time, channels
x = jax.random.normal(demo_key, (B, T, C))

# version 1: a loop over the past (PyTorch: xbow[b, t] = torch.mean(xprev, 0))
xbow = np.zeros((B, T, C))
for b_ in range(B):
    for t in range(T):
        xprev = x[b_, : t + 1]  # (t+1, C)
        xbow[b_, t] = xprev.mean(0)

# version 2: a matrix multiply with a row-normalised lower-triangular matrix
wei = jnp.tril(jnp.ones((T, T)))
wei = wei / wei.sum(1, keepdims=True)
xbow2 = wei @ x  # (T, T) @ (B, T, C) ----> (B, T, C)

# version 3: softmax of zeros with the future masked to -inf
tril = jnp.tril(jnp.ones((T, T)))
wei = jnp.zeros((T, T))
wei = jnp.where(tril == 0, -jnp.inf, wei)  # PyTorch: wei.masked_fill(tril == 0, float('-inf'))
wei = jax.nn.softmax(wei, axis=-1)
xbow3 = wei @ x
average_wei = wei  # pictured below

print(wei)
print(np.allclose(xbow, xbow2, atol=1e-6), np.allclose(xbow, xbow3, atol=1e-6))
print(np.allclose(xbow, model.weighted_average(x), atol=1e-6))  # jaxgpt's, version 3

# %% [markdown]
# Version 3 is the one that generalises: the zeros are *affinities*, all equal here. Version 4,
# **self-attention**, makes them data-dependent: every token emits a query ("what am I looking
# for") and a key ("what do I contain"); the affinity of token `t` for token `s` is the dot
# product of `t`'s query with `s`'s key, and what is aggregated is each token's value.
#
# `nn.Dense` is flax's `nn.Linear`. Two differences from PyTorch: it infers its input size from
# the first input (so only the output size is given), and its weight, `kernel`, is stored as
# (in, out) — `x @ kernel` — where `nn.Linear.weight` is (out, in) — `x @ weight.T`. (The layers
# are called `key_layer` etc. here, so that "key" keeps meaning a random key.)

# %%
B, T, C = 4, 8, 32  # batch, time, channels
x = jax.random.normal(demo_key, (B, T, C))

head_size = 16
key_layer = nn.Dense(head_size, use_bias=False)  # PyTorch: nn.Linear(C, head_size, bias=False)
query_layer = nn.Dense(head_size, use_bias=False)
value_layer = nn.Dense(head_size, use_bias=False)
kp, qp, vp = (layer.init(k, x)["params"] for layer, k in
              zip((key_layer, query_layer, value_layer),
                  jax.random.split(jax.random.fold_in(init_key, 1), 3)))
print("kernel:", kp["kernel"].shape, "(in, out)")
k = key_layer.apply({"params": kp}, x)  # (B, T, 16)
q = query_layer.apply({"params": qp}, x)  # (B, T, 16)
wei = q @ jnp.swapaxes(k, -2, -1)  # (B, T, 16) @ (B, 16, T) ---> (B, T, T)
wei = jnp.where(tril == 0, -jnp.inf, wei)
wei = jax.nn.softmax(wei, axis=-1)
v = value_layer.apply({"params": vp}, x)  # (B, T, 16)
out = wei @ v  # (B, T, T) @ (B, T, 16) ---> (B, T, 16)
print(out.shape)
print(np.round(wei[0], 2))

fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
for ax, w, title in ((axes[0], average_wei, "version 3: the plain average"),
                     (axes[1], wei[0], "version 4: a head's affinities (random weights)")):
    ax.imshow(np.asarray(w), cmap="viridis", vmin=0, vmax=1)
    ax.set(title=title, xlabel="attends to token s", ylabel="token t")
plt.tight_layout()
plt.show()

# %% [markdown]
# Each row now weighs the past differently. And version 4 *contains* the other three: with a
# query of zeros every affinity is equal, and a value that copies its input gives back the
# plain average.

# %%
q0 = jnp.zeros((B, T, C))  # a query layer of zeros
wei0 = jax.nn.softmax(jnp.where(tril == 0, -jnp.inf, q0 @ jnp.swapaxes(x, -2, -1)), axis=-1)
print(np.allclose(wei0 @ x, model.weighted_average(x), atol=1e-6))

# %% [markdown]
# *In jaxgpt:* `model.weighted_average`. *Tests:*
# `test_lecture.py::test_weighted_average_equals_the_lectures_loop`,
# `test_lecture.py::test_the_four_versions_of_the_trick_agree`.
#
# ## One head of self-attention
#
# The cell above as a module, with the scaling by `head_size ** -0.5` explained below. Every
# linear layer and embedding is declared with normal(0.02) and zero biases, as the
# repository's `gpt.py` sets them in `_init_weights` (added after the lecture's video); the
# story's runs below redraw them with PyTorch's defaults (`pytorch_init`), which is what the
# video's code trained with. `self.sow` records the attention weights where a caller asks for
# them (`mutable=["intermediates"]`), for the heat maps later; otherwise it does nothing.

# %%
init_02 = nn.initializers.normal(0.02)  # gpt.py's _init_weights: normal(0, 0.02)


def Linear(features, bias=True, name=None):
    """PyTorch's nn.Linear(in, features) with gpt.py's init, in flax."""
    return nn.Dense(features, use_bias=bias, kernel_init=init_02, name=name)


class Head(nn.Module):
    """One head of self-attention."""

    head_size: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic=True):
        B, T, C = x.shape
        k = Linear(self.head_size, bias=False, name="key")(x)  # (B, T, hs)
        q = Linear(self.head_size, bias=False, name="query")(x)  # (B, T, hs)
        # compute attention scores ("affinities")
        wei = q @ k.swapaxes(-2, -1) * self.head_size**-0.5  # (B, T, hs) @ (B, hs, T) -> (B, T, T)
        wei = jnp.where(jnp.tril(jnp.ones((T, T), bool)), wei, -jnp.inf)  # (B, T, T)
        wei = jax.nn.softmax(wei, axis=-1)  # (B, T, T)
        self.sow("intermediates", "wei", wei)
        wei = nn.Dropout(self.dropout)(wei, deterministic=deterministic)
        # perform the weighted aggregation of the values
        v = Linear(self.head_size, bias=False, name="value")(x)  # (B, T, hs)
        return wei @ v  # (B, T, T) @ (B, T, hs) -> (B, T, hs)


head = Head(head_size)
head_params = {"key": kp, "query": qp, "value": vp}  # the weights of the cell above
scaled = jax.nn.softmax(jnp.where(tril == 0, -jnp.inf, q @ jnp.swapaxes(k, -2, -1)
                                  * head_size**-0.5), axis=-1)  # (B, T, T)
print("the module computes the cell above:",
      np.allclose(head.apply({"params": head_params}, x), scaled @ v, atol=1e-5))
cfg = model.GPTConfig(vocab_size=vocab_size, block_size=T, n_embd=C, n_head=2)  # head size 16
print("and so does jaxgpt's model.Head:",
      np.allclose(model.Head(cfg).apply({"params": head_params}, x), scaled @ v, atol=1e-5))

# %% [markdown]
# *Test:* `test_lecture.py::test_head_is_softmax_of_scaled_affinities` (against a numpy
# transcription of the lecture's `Head.forward`).
#
# ## Notes on attention
#
# **Attention is a communication mechanism.** Think of the tokens as nodes of a directed graph,
# each pointing at itself and every earlier node; every node aggregates the values of the
# nodes that point at it, weighted by data-dependent affinities. In the decoder the graph is
# the lower triangle: row `t` of `wei` above is who node `t` listens to.
#
# **There is no notion of space.** Attention acts on a *set* of vectors: the output at the
# last position is a weighted sum over the others, and shuffling them changes nothing. That is
# why the GPT adds position embeddings.

# %%
hv = {"params": head_params}
out = head.apply(hv, x)  # (B, T, hs)
perm = jnp.array([3, 0, 6, 1, 5, 2, 4, 7])  # shuffle tokens 0..6, keep the last one in place
out_shuffled = head.apply(hv, x[:, perm])
print("last position unchanged by shuffling its past:",
      np.allclose(out[:, -1], out_shuffled[:, -1], atol=1e-5))

# %% [markdown]
# **Batch elements never talk to each other.** Every example in the batch is processed
# independently: change one row (`x.at[1].set(...)`: a copy of x with row 1 replaced), and the
# others' outputs stay exactly as they were.

# %%
x_other = x.at[1].set(jax.random.normal(jax.random.fold_in(demo_key, 1), (T, C)))
out_other = head.apply(hv, x_other)
print("example 0 unchanged:", np.allclose(out[0], out_other[0]),
      "| example 1 changed:", not np.allclose(out[1], out_other[1]))

# %% [markdown]
# **Decoder vs encoder.** The triangular mask makes this a *decoder* block: a token never sees
# the future, which is what lets it learn to predict it. An *encoder* block (for sentiment
# analysis, say, where every token may see every other) deletes the single masking line.
# Change token 5: the decoder's outputs at 0..4 stay put; the encoder's all move.

# %%
def attention(x, masked):
    """The Head above with or without its masking line; x (B, T, C) -> (B, T, hs)."""
    k, q, v = (layer.apply({"params": p}, x) for layer, p in
               ((key_layer, kp), (query_layer, qp), (value_layer, vp)))
    wei = q @ jnp.swapaxes(k, -2, -1) * head_size**-0.5  # (B, T, T)
    if masked:
        wei = jnp.where(tril == 0, -jnp.inf, wei)  # the decoder's line
    return jax.nn.softmax(wei, axis=-1) @ v  # (B, T, hs)


x_future = x.at[:, 5].set(jax.random.normal(jax.random.fold_in(demo_key, 2), (B, C)))
for masked in (True, False):
    before, after = attention(x, masked), attention(x_future, masked)
    print("decoder" if masked else "encoder", "outputs at 0..4 unchanged:",
          np.allclose(before[:, :5], after[:, :5], atol=1e-5))
print("the Head is the decoder:", np.allclose(head.apply(hv, x), attention(x, True), atol=1e-5))

# %% [markdown]
# **Self-attention vs cross-attention.** Here queries, keys and values all come from the same
# `x`: *self*-attention. In *cross*-attention (the encoder-decoder Transformer of "Attention
# is all you need") the queries come from `x` while the keys and values come from another
# source, say an encoded French sentence of a different length. GPT is decoder-only: it has
# self-attention only.

# %%
source = jax.random.normal(jax.random.fold_in(demo_key, 3), (B, 5, 20))  # (B, T_src, C_src)
k_src, v_src = nn.Dense(head_size, use_bias=False), nn.Dense(head_size, use_bias=False)
src_keys = jax.random.split(jax.random.fold_in(init_key, 3), 2)
k = k_src.apply(k_src.init(src_keys[0], source), source)  # (B, 5, 16) keys and values read...
v = v_src.apply(v_src.init(src_keys[1], source), source)  # (B, 5, 16) ...the source
wei = jax.nn.softmax(q @ jnp.swapaxes(k, -2, -1) * head_size**-0.5, axis=-1)  # (B, 8, 5)
print(wei.shape, (wei @ v).shape)  # the queries are still x's: 8 outputs, 5 sources each

# %% [markdown]
# **Scaled attention.** With unit-variance queries and keys, `q @ k.T` has variance
# `head_size`; multiplying by `head_size ** -0.5` brings it back to 1.

# %%
kq_keys = jax.random.split(jax.random.fold_in(demo_key, 4), 2)
k = jax.random.normal(kq_keys[0], (B, T, head_size))
q = jax.random.normal(kq_keys[1], (B, T, head_size))
wei_raw = q @ jnp.swapaxes(k, -2, -1)
wei = wei_raw * head_size**-0.5
print(f"k.var() {k.var():.3f}  q.var() {q.var():.3f}  "
      f"(q @ k.T).var() {wei_raw.var():.3f}  scaled: {wei.var():.3f}")

# %% [markdown]
# Why it matters: softmax of large numbers converges to one-hot. Feed it values 8 times larger
# and it puts almost everything on the maximum — each token would listen to one other token
# only, especially at initialization.

# %%
z = jnp.array([0.1, -0.2, 0.3, -0.2, 0.5])
print(jax.nn.softmax(z))
print(jax.nn.softmax(z * 8))  # gets too peaky, converges to one-hot

print("head size | largest weight of a row (mean): unscaled  scaled")
for hs in (16, 64, 256, 1024):
    k = jax.random.normal(kq_keys[0], (B, T, hs))
    q = jax.random.normal(kq_keys[1], (B, T, hs))
    raw = q @ jnp.swapaxes(k, -2, -1)  # (B, T, T), no mask: every row has T choices
    print(f"{hs:9d} | {jax.nn.softmax(raw).max(-1).mean():.3f}  "
          f"{jax.nn.softmax(raw * hs**-0.5).max(-1).mean():.3f}")

# %% [markdown]
# Unscaled, the rows saturate as the head grows; scaled, they stay as diffuse as at size 16.
# *Tests:* `test_lecture.py::test_without_the_scale_softmax_saturates_as_heads_grow` (on
# `jaxgpt.model.Head` itself), `test_lecture.py::test_attention_has_no_notion_of_space`,
# `test_lecture.py::test_batch_elements_never_talk`,
# `test_lecture.py::test_decoder_mask_blocks_the_future_an_encoder_does_not`.
#
# ## A GPT to plug the pieces into, and positions
#
# The lecture grows one model class step by step, editing its `__init__` each time. Here the GPT
# takes its middle part as an argument, `body`: a list of modules applied in turn between the
# embeddings and the output layer, so each step of the story is the same class with a different
# body. Token embeddings say *what* each token is; **position embeddings** say *where* it is:
# attention has no notion of space, so without them "ab" and "ba" would look alike. A learned
# table of `block_size` vectors, added to the token embeddings. (The original Transformer used
# fixed sinusoids; exercise 4 below builds rotary embeddings.) The output layer `lm_head` maps
# each position's vector to logits over the vocabulary.
#
# **The functional lens: Flax's names.** Every submodule gets a name, and the params pytree is
# nested by those names. A name given (`name="lm_head"`) is used as is; a module held in a field
# of a dataclass module gets the field's name, with its index for a list or tuple: the body's
# modules are `body_0`, `body_1`, ...; one created inline in an `@nn.compact` method without a
# name gets its class's, `Dense_0`, `Dropout_0`. These names are the params' keys, so code that
# reads params by key (`to_jaxgpt` below, which renames your params to jaxgpt's) depends on them.

# %%
class GPTLanguageModel(nn.Module):
    """Token + position embeddings, the body's modules in turn, [ln_f], the lm_head."""

    vocab_size: int
    n_embd: int
    block_size: int
    body: tuple = ()  # modules applied in turn, each x (B, T, C) -> (B, T, C)
    ln_f: bool = False

    @nn.compact
    def __call__(self, idx, deterministic=True):
        B, T = idx.shape
        tok_emb = nn.Embed(self.vocab_size, self.n_embd, embedding_init=init_02,
                           name="token_embedding_table")(idx)  # (B, T, C)
        pos_emb = nn.Embed(self.block_size, self.n_embd, embedding_init=init_02,
                           name="position_embedding_table")(jnp.arange(T))  # (T, C)
        x = tok_emb + pos_emb  # (B, T, C)
        for layer in self.body:
            x = layer(x, deterministic)  # (B, T, C)
        if self.ln_f:
            x = nn.LayerNorm(epsilon=1e-5, name="ln_f")(x)  # (B, T, C) the final layer norm
        return Linear(self.vocab_size, name="lm_head")(x)  # (B, T, vocab_size)


n_embd = 32  # the lecture's size for the story: 32 wide, a context of 8, batches of 32
small = functools.partial(GPTLanguageModel, vocab_size, n_embd, block_size)
one_head_params = small(body=(Head(n_embd),)).init(jax.random.fold_in(init_key, 4),
                                                  train_data[None, :block_size])["params"]
print(jax.tree.map(jnp.shape, one_head_params))  # body_0: the body's first module
print(f"token embeddings at init: std "
      f"{float(one_head_params['token_embedding_table']['embedding'].std()):.3f}")

# %% [markdown]
# Does the order of the past reach the prediction? Swap the first two tokens of a context and
# see how far the last position's logits move — at PyTorch's default init, the init the story
# trains from, whose random affinities are far from uniform (at gpt.py's normal(0.02) every
# affinity is near 0, attention is a near-uniform average, and the effect is too small to see
# before training).

# %%
idx = train_data[None, :block_size]  # (1, T) token ids
swapped = idx[:, jnp.array([1, 0, 2, 3, 4, 5, 6, 7])]  # the first two tokens swapped
for body, what, positions in (((), "embeddings only", True), ((Head(n_embd),), "one head", True),
                              ((Head(n_embd),), "one head, positions zeroed", False)):
    m = small(body=body)
    p = pytorch_init(m.init(init_key, idx)["params"], jax.random.fold_in(init_key, 5))
    if not positions:
        p = {**p, "position_embedding_table": {"embedding": jnp.zeros((block_size, n_embd))}}
    last = lambda i: m.apply({"params": p}, i)[0, -1]  # the last position's logits (vocab,)
    print(f"{what:28s} swapping the first two tokens moves the last position's logits by "
          f"{float(jnp.abs(last(idx) - last(swapped)).max()):.1e}")

# %% [markdown]
# The embeddings alone predict from the last token only (a bigram with extra steps), so the past
# cannot matter at all; a head without positions reads its past as a set, so the swap changes
# nothing but float rounding; with position embeddings the swap moves the prediction by a
# visible amount: the order of the past is seen.
# *Test:* `test_lecture.py::test_position_embeddings_give_the_gpt_a_notion_of_space`.
#
# Now the lecture's story: each step adds one idea and is trained for the lecture's
# iterations, at its small size (32 wide, context 8, batch 32, learning rate 1e-3), from
# PyTorch's default init as in the video. (Started from gpt.py's normal(0.02) instead, these
# small models learn more slowly in 5000 steps and the story's order blurs: pass
# `pytorch_defaults=False` to `train` to see it.) The first step, token embeddings and an
# `lm_head`, is still a bigram model — the last token alone decides — whose table is the product
# of two smaller ones, so it cannot beat the bigram above; the first real gain is the next
# step's self-attention.

# %%
with timed("the lecture's steps, trained one by one"):
    _, RESULTS["embeddings + lm_head"] = train(small(), max_iters=STAGE_ITERS,
                                               name="embeddings + lm_head")
    _, RESULTS["+ one self-attention head"] = train(small(body=(Head(n_embd),)),
                                                    max_iters=STAGE_ITERS, name="one head")

# %% [markdown]
# ## Multi-head attention
#
# Several heads in parallel, each with a smaller head size, their outputs concatenated:
# several independent channels of communication. The lecture later, at the residual step,
# adds a projection of the concatenation back into the residual stream, `proj`; the `project`
# switch adds it, and the story turns it on where the lecture does.

# %%
class MultiHeadAttention(nn.Module):
    """Multiple heads of self-attention in parallel."""

    num_heads: int
    head_size: int
    n_embd: int
    dropout: float = 0.0
    project: bool = True  # the output projection, added by the lecture at the residual step

    @nn.compact
    def __call__(self, x, deterministic=True):
        heads = [Head(self.head_size, self.dropout, name=f"heads_{i}")
                 for i in range(self.num_heads)]
        out = jnp.concatenate([h(x, deterministic) for h in heads], axis=-1)  # (B, T, nh * hs)
        if self.project:
            out = Linear(self.n_embd, name="proj")(out)  # (B, T, C)
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


x = jax.random.normal(demo_key, (B, T, C))
mha = MultiHeadAttention(2, 16, C)
mha_params = mha.init(jax.random.fold_in(init_key, 6), x)["params"]
print(jax.tree.map(jnp.shape, mha_params))
heads_out = [head.apply({"params": mha_params[f"heads_{i}"]}, x) for i in range(2)]
by_hand = jnp.concatenate(heads_out, axis=-1) @ mha_params["proj"]["kernel"] \
    + mha_params["proj"]["bias"]  # (B, T, C)
print("heads side by side, projected:", np.allclose(mha.apply({"params": mha_params}, x), by_hand,
                                                    atol=1e-5))

# %% [markdown]
# **The functional lens: `setup` vs `@nn.compact`.** Flax has two ways to declare submodules.
# `@nn.compact` (used so far) creates them inline in `__call__`, as they are used. `setup`
# creates them up front and assigns them to attributes, like PyTorch's `__init__`: the shape of
# the lecture's code. A list assigned in `setup` names its modules after the attribute and
# their index — `self.heads = [...]` gives `heads_0`, `heads_1`, ... — which is why the compact
# version names its heads `heads_{i}` by hand: both forms make the same params tree, and each
# runs the other's params.

# %%
class MultiHeadAttentionSetup(nn.Module):
    """MultiHeadAttention in setup form: PyTorch's __init__ + forward, one to one."""

    num_heads: int
    head_size: int
    n_embd: int

    def setup(self):  # PyTorch: __init__
        self.heads = [Head(self.head_size) for _ in range(self.num_heads)]  # heads_0, heads_1, ...
        self.proj = Linear(self.n_embd)

    def __call__(self, x, deterministic=True):  # PyTorch: forward
        out = jnp.concatenate([h(x, deterministic) for h in self.heads], axis=-1)
        return self.proj(out)  # (B, T, C)


setup_form = MultiHeadAttentionSetup(2, 16, C)
same_tree = jax.tree.map(jnp.shape, setup_form.init(init_key, x)["params"]) == \
    jax.tree.map(jnp.shape, mha_params)
print("same params tree:", same_tree, "| same output from the same params:",
      np.allclose(setup_form.apply({"params": mha_params}, x),
                  mha.apply({"params": mha_params}, x), atol=1e-6))

# %% [markdown]
# The story's multi-head step, as the lecture trains it: 4 heads of size 8, concatenated, no
# projection yet.

# %%
with timed("the lecture's steps, trained one by one"):
    _, RESULTS["+ multi-head (4 heads of 8)"] = train(
        small(body=(MultiHeadAttention(4, n_embd // 4, n_embd, project=False),)),
        max_iters=STAGE_ITERS, name="multi-head")

# %% [markdown]
# *In jaxgpt:* `model.MultiHeadAttention`. The lecture's exercise 1 (below) does all heads in
# one batched matrix multiply: `model.CausalSelfAttention`, nanoGPT's form. *Tests:*
# `test_lecture.py::test_multi_head_is_heads_side_by_side_projected`,
# `test_lecture.py::test_fused_heads_equal_multi_head_attention`.
#
# ## Feed-forward: the computation
#
# After the tokens have talked, each thinks about what it gathered on its own: a small MLP
# applied to every position independently. The lecture's first version is one linear layer and
# a ReLU, `n_embd` wide; at the residual step it becomes the form of "Attention is all you
# need": 4× wider inside, then a projection back to `n_embd`. The `wide` switch picks the form.

# %%
class FeedForward(nn.Module):
    """A simple linear layer followed by a non-linearity."""

    n_embd: int
    dropout: float = 0.0
    wide: bool = True  # 4x inside and a projection back, as the lecture has from the residual step

    @nn.compact
    def __call__(self, x, deterministic=True):
        if not self.wide:  # the lecture's first FeedForward: Linear(C, C), ReLU
            return nn.relu(Linear(self.n_embd, name="fc")(x))  # (B, T, C)
        x = nn.relu(Linear(4 * self.n_embd, name="fc")(x))  # (B, T, 4C)
        x = Linear(self.n_embd, name="proj")(x)  # (B, T, C) the projection back
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)


ff = FeedForward(C)
ff_params = ff.init(jax.random.fold_in(init_key, 7), x)["params"]
whole = ff.apply({"params": ff_params}, x)
one_at_a_time = jnp.concatenate([ff.apply({"params": ff_params}, x[:, t : t + 1])
                                 for t in range(T)], axis=1)
print("per token:", np.allclose(whole, one_at_a_time, atol=1e-5))

with timed("the lecture's steps, trained one by one"):
    _, RESULTS["+ feed-forward"] = train(
        small(body=(MultiHeadAttention(4, n_embd // 4, n_embd, project=False),
                    FeedForward(n_embd, wide=False))),
        max_iters=STAGE_ITERS, name="attention + feed-forward")

# %% [markdown]
# *Test:* `test_lecture.py::test_feed_forward_is_per_token`.
#
# ## Blocks, residual connections, LayerNorm
#
# A `Block` is communication followed by computation; the GPT stacks them. Stacked plainly
# (`x = ffwd(sa(x))`), a deep network is hard to optimise. Two fixes make depth work:
#
# - **Residual connections**: `x = x + self.sa(x)`, `x = x + self.ffwd(x)`. Each block *adds*
#   to a residual stream; addition passes gradients through unchanged, a "gradient superhighway"
#   from the loss to the first layer, and the blocks' contributions start small and grow. With
#   them the lecture adds the projections back into the stream — attention's `proj` and the
#   wide feed-forward's — so the story's residual step turns on `project` and `wide` too.
# - **LayerNorm** (the lecture's `LayerNorm1d`, below): normalise each token's features before
#   each sub-layer (pre-norm, as GPT-2: `x = x + self.sa(self.ln1(x))`) and once at the end
#   (`ln_f`).
#
# The Block below has all of these as switches, so the story can train it as the lecture did
# at each step.

# %%
class Block(nn.Module):
    """Transformer block: communication followed by computation."""

    n_embd: int
    n_head: int
    dropout: float = 0.0
    residual: bool = True
    layer_norm: bool = True
    project: bool = True  # attention's proj and the 4x feed-forward: the lecture's final form

    @nn.compact
    def __call__(self, x, deterministic=True):
        sa = MultiHeadAttention(self.n_head, self.n_embd // self.n_head, self.n_embd,
                                self.dropout, self.project, name="sa")
        ffwd = FeedForward(self.n_embd, self.dropout, self.project, name="ffwd")
        ln1, ln2 = ((nn.LayerNorm(epsilon=1e-5, name=n) for n in ("ln1", "ln2"))
                    if self.layer_norm else (lambda x: x, lambda x: x))
        if not self.residual:
            return ffwd(sa(ln1(x), deterministic), deterministic)  # (B, T, C)
        x = x + sa(ln1(x), deterministic)  # (B, T, C)
        return x + ffwd(ln2(x), deterministic)  # (B, T, C)


def blocks(n, **kw):
    """n Blocks: n separate modules (one instance used n times would share its params)."""
    return tuple(Block(n_embd, 4, **kw) for _ in range(n))


with timed("the lecture's steps, trained one by one"):
    _, RESULTS["3 blocks, no residual"] = train(
        small(body=blocks(3, residual=False, layer_norm=False, project=False)),
        max_iters=STAGE_ITERS, name="3 blocks")
    _, RESULTS["+ residual, proj, 4x feed-forward"] = train(
        small(body=blocks(3, layer_norm=False)), max_iters=STAGE_ITERS,
        name="+ residual, proj, 4x feed-forward")

# %% [markdown]
# At init (gpt.py's normal(0.02), the modules' own) a residual `Block` is close to the identity,
# and so is its gradient: the superhighway.
# `jax.jacobian` differentiates the block's output at the last token by its input there;
# transformations compose, so `jax.jit(jax.jacobian(f))` is f's jacobian, compiled.

# %%
blk = Block(C, 2, layer_norm=False)
blk_params = jax.jit(blk.init)(jax.random.fold_in(init_key, 8), x)["params"]
y_blk = blk.apply({"params": blk_params}, x)  # (B, T, C)
print(f"|block(x) - x| / |x| = {jnp.linalg.norm(y_blk - x) / jnp.linalg.norm(x):.3f}")


def last_token_out(v):  # the Block's output at the last token of x[0] as a function of its input
    return blk.apply({"params": blk_params}, x[:1].at[0, -1].set(v))[0, -1]  # (C,)


jac = jax.jit(jax.jacobian(last_token_out))(x[0, -1])  # (C, C)
print(f"d out / d in at the last token: |jacobian - identity| / |identity| = "
      f"{jnp.linalg.norm(jac - jnp.eye(C)) / jnp.linalg.norm(jnp.eye(C)):.3f}")

# %% [markdown]
# The lecture's `LayerNorm1d`: normalise each token's features (a row), not each feature across
# the batch (a column, BatchNorm). `gamma`, `beta` then rescale. flax's `nn.LayerNorm` is the
# same function.

# %%
class LayerNorm1d:  # the lecture's, in jax.numpy (no running buffers, no mutation)
    def __init__(self, dim, eps=1e-5):
        self.eps, self.gamma, self.beta = eps, jnp.ones(dim), jnp.zeros(dim)

    def __call__(self, x):
        # dimension 1: over each example's features, a row (the lecture's comments, kept from
        # its BatchNorm1d, still say "batch mean" and "batch variance")
        xmean = x.mean(1, keepdims=True)  # each row's mean
        xvar = x.var(1, keepdims=True)  # each row's variance
        xhat = (x - xmean) / jnp.sqrt(xvar + self.eps)  # normalize to unit variance
        return self.gamma * xhat + self.beta


x100 = jax.random.normal(demo_key, (32, 100))  # batch size 32 of 100-dimensional vectors
x_ln = LayerNorm1d(100)(x100)
print(f"a feature across the batch: mean {x_ln[:, 0].mean():.4f} std {x_ln[:, 0].std():.4f}")
print(f"one example's features:     mean {x_ln[0, :].mean():.4f} std {x_ln[0, :].std():.4f}")
ln = nn.LayerNorm(epsilon=1e-5)
print("same as flax's:", np.allclose(ln.apply(ln.init(init_key, x100), x100), x_ln, atol=1e-5))

with timed("the lecture's steps, trained one by one"):
    _, RESULTS["+ LayerNorm"] = train(small(body=blocks(3), ln_f=True), max_iters=STAGE_ITERS,
                                      name="+ LayerNorm")

# %% [markdown]
# ## Dropout
#
# During training, dropout zeroes a random fraction of activations (and rescales the rest), so
# the network cannot rely on any one path: an ensemble of subnetworks. Every module above has a
# `dropout` rate. **Functional lens:** PyTorch switches it with `model.train()` /
# `model.eval()`, state on the module; here it is an argument, `deterministic=False`, and its
# randomness a key passed in `rngs` (`loss_fn` above gets a fresh one at every step). The
# full-size run below trains with dropout 0.2, as the lecture's.

# %%
drop = nn.Dropout(rate=0.2)
ones = jnp.ones((2, 10))
print(drop.apply({}, ones, deterministic=False, rngs={"dropout": jax.random.fold_in(demo_key, 9)}))
print(drop.apply({}, ones, deterministic=True))  # evaluation: the identity

# %% [markdown]
# *Test:* `test_lecture.py::test_dropout_only_when_not_deterministic`.
#
# ## Scaling up
#
# The lecture's last step scales the model up: 6 layers, 6 heads, 384 wide, a context of 256,
# dropout 0.2 — hours on a CPU; the full-size run further down trains it on a GPU or TPU. Here
# it is first scaled to a laptop the way nanoGPT scales its CPU recipe: `configs/lecture_cpu.py`,
# 4 layers, 4 heads, 128 wide, a context of 64, batches of 12, no dropout at this size, 2000
# iterations at 1e-3, initialised as the repository's `gpt.py` does (`_init_weights`,
# normal(0.02): the modules' own init), as jaxgpt's lecture recipes are.

# %%
from configs import lecture_cpu  # noqa: E402

lc = small_run(lecture_cpu.get_config())
scaled_gpt = GPTLanguageModel(vocab_size, lc.n_embd, lc.block_size, ln_f=True, body=tuple(
    Block(lc.n_embd, lc.n_head, lc.dropout) for _ in range(lc.n_layer)))
with timed("the scaled-up GPT, your modules"):
    scaled_params, RESULTS["scaled up (configs/lecture_cpu.py)"] = train(
        scaled_gpt, max_iters=SCALED_ITERS, eval_interval=lc.eval_interval,
        eval_iters=lc.eval_iters, learning_rate=lc.learning_rate, batch_size=lc.batch_size,
        block_size=lc.block_size, name="scaled up",
        pytorch_defaults=False)  # gpt.py's _init_weights: the modules' own normal(0.02)

# %% [markdown]
# **Saving your model.** Params are a pytree of arrays, so orbax — the checkpoint library of
# the JAX stack, which jaxgpt's runs use too — saves them in one call and restores them in
# another, given the tree's shapes and dtypes (so it can place each array where it belongs).
# In Colab, save into a mounted Google Drive folder to keep them past the runtime.

# %%
checkpointer = ocp.StandardCheckpointer()
saved_to = runs_dir / "my_gpt_params"
checkpointer.save(saved_to, scaled_params)
checkpointer.wait_until_finished()  # the save runs in the background
like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), scaled_params)
restored = checkpointer.restore(saved_to, like)
print("restored the same params:", jax.tree.all(jax.tree.map(np.array_equal, restored,
                                                               scaled_params)))

# %% [markdown]
# ### The story, measured
#
# Each row is this notebook's own run (the val loss at the last step, `eval_iters` batches).

# %%
rows = ["| step of the lecture | val loss | train loss |", "|---|---|---|"]
rows += [f"| {name} | {c['val'][-1]:.4f} | {c['train'][-1]:.4f} |" for name, c in RESULTS.items()]
display(Markdown("\n".join(rows)))

fig, ax = plt.subplots(figsize=(9, 5))
styles = [dict(ls=ls, marker=mk) for ls, mk in zip(["-", "--", "-.", ":"] * 3, "osD^vP*Xh")]
for (name, c), style in zip(RESULTS.items(), styles):
    ax.plot(c["step"], c["val"], lw=1.8, ms=4, label=name, **style)
later = [v for c in RESULTS.values() for v in c["val"][1:]]  # after step 0's ≈ ln(65)
ax.set_ylim(min(later) - 0.05, max(later) + 0.05)
ax.set(xlabel="step", ylabel="val loss",
       title="The lecture's steps, each trained from scratch (step 0, ≈ 4.2, is above the chart)")
ax.grid(alpha=0.3)
ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), handlelength=3)
plt.tight_layout()
plt.show()

# %% [markdown]
# The story's steps train at the lecture's small size for the same number of iterations each
# (the bigram at bigram.py's own settings); the scaled-up model trains longer per step on bigger
# batches, so its row is not a like-for-like comparison with the others (the lecture's own model
# reaches 1.48 at full size, as the lecture reports). The lecture reports, for the same steps,
# about 2.4 with one head, 2.28 with four, 2.24 with feed-forward, 2.08 with residual
# connections and 2.06 with LayerNorm; its plain stack of blocks did not improve on one block
# (depth without residuals is hard to optimise).
#
# ### What the heads look at
#
# The scaled-up model's attention weights on the start of a line of Shakespeare from the
# validation split, per head of the first and the last layer: recorded by `Head`'s `sow` (the
# caller asks for them with `mutable=["intermediates"]`; the forward pass is the same).

# %%
val_text = text[n:]
line = next((l for l in val_text.splitlines() if len(l) >= 24), val_text[:24])[:24]
line_ids = jnp.array([encode(line)])  # (1, T)
_, state = scaled_gpt.apply({"params": scaled_params}, line_ids, mutable=["intermediates"])
maps = state["intermediates"]  # body_i / sa / heads_h / wei: ((1, T, T),)
shown = (0, lc.n_layer - 1)
fig, axes = plt.subplots(len(shown), lc.n_head, figsize=(4.2 * lc.n_head, 4.4 * len(shown)),
                         squeeze=False)
for r, layer in enumerate(shown):
    for h in range(lc.n_head):
        w = maps[f"body_{layer}"]["sa"][f"heads_{h}"]["wei"][0][0]  # (T, T)
        ax = axes[r, h]
        im = ax.imshow(np.asarray(w), cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(line)), [repr(ch)[1:-1] for ch in line], fontsize=9)
        ax.set_yticks(range(len(line)), [repr(ch)[1:-1] for ch in line], fontsize=9)
        ax.set_title(f"layer {layer}, head {h}", fontsize=12)
        ax.set_xlabel("key: the token attended to", fontsize=10)
        if h == 0:
            ax.set_ylabel("query: the token attending", fontsize=10)
fig.colorbar(im, ax=axes, shrink=0.6, label="attention weight (each row sums to 1)")
fig.suptitle(f"attention weights on {line!r}", fontsize=13)
plt.show()

# %% [markdown]
# Row `t` is what token `t` listens to (each row sums to 1, nothing above the diagonal). Some
# heads look at the previous character or two; others spread over the word or the line. `python
# -m jaxgpt.plot WORKDIR --attention TEXT` draws the same maps for a run trained by `train.py`.
#
# ## What you wrote is jaxgpt's model
#
# `jaxgpt.model.GPT` with the lecture's settings — `attention="heads"` (one `Head` module per
# head), ReLU, biases, an untied `lm_head` with a bias, no dropout on the embeddings, every
# layer initialised normal(0.02) — is the model you just wrote. Only the names differ: jaxgpt
# uses nanoGPT's (`wte`, `h_0`, `attn`, `mlp`, ...). Moved under those names, your trained
# weights give jaxgpt's model the same logits.

# %%
def to_jaxgpt(p, n_layer, n_head):
    """Your GPTLanguageModel's params under jaxgpt.model.GPT's (nanoGPT's) names."""
    out = {"wte": p["token_embedding_table"], "wpe": p["position_embedding_table"],
           "ln_f": p["ln_f"], "lm_head": p["lm_head"]}
    for i in range(n_layer):
        b = p[f"body_{i}"]  # Flax's automatic names: the body's i-th module
        heads = {f"heads_{h}": b["sa"][f"heads_{h}"] for h in range(n_head)}
        out[f"h_{i}"] = {"ln_1": b["ln1"], "ln_2": b["ln2"],
                         "attn": {**heads, "c_proj": b["sa"]["proj"]},
                         "mlp": {"c_fc": b["ffwd"]["fc"], "c_proj": b["ffwd"]["proj"]}}
    return out


jaxgpt_lecture = model.make_model(lc, vocab_size)  # configs/lecture_cpu.py's model
print({k: lc[k] for k in ("attention", "activation", "bias", "tie_weights", "lm_head_bias",
                          "embd_dropout", "scale_residual_init")})
mapped = to_jaxgpt(scaled_params, lc.n_layer, lc.n_head)
xb, _ = batches.get_batch(val_data, jax.random.fold_in(demo_key, 10), 4, lc.block_size)
expected = jax.eval_shape(jaxgpt_lecture.init, init_key, xb)["params"]
assert jax.tree.map(jnp.shape, mapped) == jax.tree.map(lambda s: s.shape, expected)
yours = scaled_gpt.apply({"params": scaled_params}, xb)
theirs = jaxgpt_lecture.apply({"params": mapped}, xb)
assert np.allclose(yours, theirs, atol=1e-5), float(jnp.abs(yours - theirs).max())
print(f"same parameter tree; same logits (max difference {float(jnp.abs(yours - theirs).max()):.1e})")

# %% [markdown]
# *Tests:* `test_lecture.py::test_from_lecture_gives_gpt_py_logits` (jaxgpt's model
# against the lecture's own `gpt.py`), `test_lecture.py::test_fused_heads_equal_multi_head_attention`.
#
# ## nanoGPT's changes
#
# nanoGPT's GPT is this model with a handful of changes, and its CPU recipe
# (`configs/shakespeare_cpu.py`) trains it with a different schedule. Every one is a config key
# of jaxgpt:
#
# | | the lecture (`configs/lecture_cpu.py`) | nanoGPT (`configs/shakespeare_cpu.py`) | why |
# |---|---|---|---|
# | attention | one `Head` module per head | all heads in one batched matmul (exercise 1) | fewer, larger ops: faster |
# | activation | ReLU | GELU | smoother; GPT-2's choice |
# | output layer | its own `lm_head` with a bias | `wte` reused (weight tying) | vocab × n_embd fewer params; one table reads tokens in and writes them out |
# | biases | everywhere | none (`bias=False`) | "a bit better and faster", in nanoGPT's words |
# | init | normal(0.02) everywhere | residual projections scaled by 1/√(2·n_layer) | the residual stream's variance stays flat with depth |
# | embeddings | `tok_emb + pos_emb` | dropout on the sum | (a no-op at dropout 0) |
# | learning rate | constant | warmup, then cosine decay to `min_lr` | |
# | AdamW | β2 0.999, weight decay 0.01 on every param | β2 0.99, decay 0.1 on 2-D params only (matrices, embeddings), gradient clipping at 1.0 | nanoGPT's recipe |
#
# Both recipes through jaxgpt's training loop (`training.train`, what `train.py` runs): the
# lecture's model with the lecture's recipe, then nanoGPT's. The loop is the one you wrote above,
# grown up: one `jax.jit`-compiled call runs `steps_per_call` optimizer steps (a `lax.scan`
# over the train step), it evaluates every `eval_interval` steps (the lecture's
# `estimate_loss`), and it writes `metrics.jsonl` and orbax checkpoints into a workdir.

# %%
from configs import shakespeare_cpu  # noqa: E402

nano = small_run(shakespeare_cpu.get_config())
print("the keys that differ:", {k: (lc[k], nano[k]) for k in nano.keys() if k in lc and lc[k] != nano[k]
                                and k not in ("eval_before_last_step", "param_count")})
WORKDIRS = {}
for name, c in (("lecture_cpu", lc), ("shakespeare_cpu", nano)):
    c.data_path = str(DATA_PATH)
    c.max_iters = SCALED_ITERS
    if name == "shakespeare_cpu":
        c.lr_decay_iters = SCALED_ITERS
        c.warmup_iters = min(c.warmup_iters, SCALED_ITERS // 4)
    WORKDIRS[name] = runs_dir / name
    with timed(f"training.train, configs/{name}.py"), \
            contextlib.redirect_stderr(io.StringIO()):  # the progress bar: noise in a notebook
        training.train(c, WORKDIRS[name])  # prints nanoGPT's eval lines
print(f"trained {SCALED_ITERS} steps per recipe into {runs_dir}")

# %%
metrics = {name: plot.read_metrics(d) for name, d in WORKDIRS.items()}
evals = {name: m["eval"] for name, m in metrics.items()}
final = {name: e["val_loss"][-1] for name, e in evals.items()}
display(Markdown(
    f"With the same 2000-step budget (here {SCALED_ITERS}), the lecture's recipe ends at val "
    f"loss {final['lecture_cpu']:.4f} in jaxgpt's loop (your loop above: "
    f"{RESULTS['scaled up (configs/lecture_cpu.py)']['val'][-1]:.4f}; the two draw different "
    f"batches), nanoGPT's at {final['shakespeare_cpu']:.4f}: a difference of "
    f"{final['lecture_cpu'] - final['shakespeare_cpu']:+.4f}. Each eval here averages "
    f"{nano.eval_iters} batches, so it carries a few hundredths of sampling noise; "
    "`docs/performance.md` has the recipe over 1000 batches and several seeds."))

fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[3, 1])
for (name, e), color in zip(evals.items(), ("tab:blue", "tab:orange")):
    ax.plot(e["step"], e["val_loss"], color=color, lw=2.2, marker="o", label=f"{name}: val")
    ax.plot(e["step"], e["train_loss"], color=color, lw=1.4, ls=(0, (1, 1.5)), marker="x",
            label=f"{name}: train")
    ax_lr.plot(metrics[name]["train"]["step"], metrics[name]["train"]["lr"], color=color, lw=2)
later = [v for e in evals.values() for k in ("train_loss", "val_loss") for v in e[k][1:]]
ax.set_ylim(min(later) - 0.05, max(later) + 0.05)  # step 0 (≈ 4.2) is above the chart
ax.set(ylabel="loss", title="The lecture's recipe and nanoGPT's, in jaxgpt's loop")
ax.legend(fontsize=9, handlelength=4)
ax.grid(alpha=0.3)
ax_lr.set(xlabel="step", ylabel="learning rate")
ax_lr.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# The difference is the lecture's val loss minus nanoGPT's: negative where the lecture's recipe
# ends lower, as in the saved outputs. At this size and budget nanoGPT's changes do not buy a
# lower val loss; they are there for what nanoGPT trains next — speed (one batched attention,
# no biases), fewer parameters (tying), and steady training of deep, wide models such as GPT-2
# (the scaled residual init, warmup, clipping). `python -m jaxgpt.plot WORKDIR ...` draws such
# curves for any runs of `train.py`.
#
# ## Sampling
#
# `pretrained.load_run(workdir)` loads what a trained workdir holds — config, tokenizer, model
# and params (the checkpoint with the best val loss) — in one call; `sample.py` uses it too.
# `sampling.generate` is the lecture's `generate`, compiled: the prompt goes through the model
# once into a fixed-shape key/value cache, then a `jax.lax.scan` produces one token per step,
# reading the cached keys and values of earlier positions. That holds for the first
# `block_size` tokens. Past them the lecture keeps the last `block_size` tokens as the context;
# with learned position embeddings every token's position changes when that window slides, no
# cached key stays valid, and each further step runs the whole window through the model again,
# exactly as the lecture's loop does (rotary positions, exercise 4, avoid that). Sampling is
# with dropout off (`deterministic=True`); the lecture's `gpt.py` samples right after
# `estimate_loss`'s `model.train()`, so its samples are drawn with dropout on. The lecture samples
# at temperature 1.0; `sample.py` defaults to 0.8, a little more conservative.

# %%
run = pretrained.load_run(WORKDIRS["shakespeare_cpu"])
print(f"step {run.step}, {type(run.model).__name__}, vocab {run.tokenizer.vocab_size}")
idx = jnp.zeros((1, 1), dtype=jnp.int32)  # start from a newline, as the lecture
with timed("sampling"):
    out = sampling.generate(run.model, run.params, idx, 500, rng=sample_keys[3], temperature=1.0)
print(run.tokenizer.decode(out[0].tolist()))

# %% [markdown]
# Your own model samples through the same function: its weights under jaxgpt's names, in
# jaxgpt's `heads` model (which `sampling.generate` runs with all heads in one batched matmul).

# %%
with timed("sampling"):
    out = sampling.generate(jaxgpt_lecture, mapped, idx, 300, rng=sample_keys[4],
                             temperature=1.0)
print(decode(out[0].tolist()))

# %% [markdown]
# *In jaxgpt:* `sampling.generate`; the lecture's loop (one full forward per token) is
# `sampling.generate_uncached`, the reference it is tested against. *Tests:*
# `test_sampling.py::test_cached_greedy_equals_naive`,
# `test_sampling.py::test_cached_logits_equal_full_forward`,
# `test_sampling.py::test_one_compilation_for_any_prompt_length_and_new_tokens`.
#
# ## The lecture's model, full size
#
# The lecture's final model: 6 layers, 6 heads, 384 wide, a context of 256, dropout 0.2,
# batches of 64, 5000 steps of AdamW at 3e-4, from PyTorch's default init as in the video — the
# lecture reports val loss 1.48 for it. Here it is *your* `GPTLanguageModel`, trained by your
# `train`, with dropout on while training. It takes hours on a CPU, so `FULL_SIZE` (set at the
# top) is off there and on by default on a GPU or TPU runtime (how long there: not measured
# here). It saves a checkpoint after every eval into `FULL_SIZE_DIR`; if the runtime
# disconnects, run the notebook again up to here and this cell resumes from the last save.
# `configs/lecture.py` is the same model for `train.py` (`python train.py --config
# configs/lecture.py`), with gpt.py's normal(0.02) init.
#
# **The functional lens: `jax.eval_shape`** runs `init` abstractly — shapes and dtypes, no
# memory, no arithmetic — so counting the full-size model's parameters costs nothing, even on a
# CPU.

# %%
from configs import lecture  # noqa: E402

full = lecture.get_config()  # gpt.py's sizes and training settings
if SMALL:  # CI: a tiny run through the same code
    full.update(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8, max_iters=10,
                eval_interval=10, eval_iters=2)
full_gpt = GPTLanguageModel(vocab_size, full.n_embd, full.block_size, ln_f=True, body=tuple(
    Block(full.n_embd, full.n_head, full.dropout) for _ in range(full.n_layer)))
shapes = jax.eval_shape(full_gpt.init, init_key, jnp.zeros((1, full.block_size), jnp.int32))
print(f"your GPTLanguageModel at {full.n_layer} layers, {full.n_head} heads, {full.n_embd} wide: "
      f"{sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) / 1e6:.6f} M parameters "
      "(the lecture's gpt.py prints 10.788929 M)")
if FULL_SIZE or SMALL:
    settings = dict(eval_interval=full.eval_interval, eval_iters=full.eval_iters,
                    learning_rate=full.learning_rate, batch_size=full.batch_size,
                    block_size=full.block_size, name="your GPT, full size",
                    ckpt_dir=FULL_SIZE_DIR if FULL_SIZE else runs_dir / "full_size")
    with timed("full size, your GPTLanguageModel"):
        full_params, full_curve = train(full_gpt, max_iters=full.max_iters, **settings)
        if SMALL:  # CI: the same call again finds the last save and has nothing left to do
            full_params, full_curve = train(full_gpt, max_iters=full.max_iters, **settings)
    full_jaxgpt = model.make_model(full, vocab_size)  # to sample through jaxgpt's sampler
    out = sampling.generate(full_jaxgpt, to_jaxgpt(full_params, full.n_layer, full.n_head), idx,
                            30 if SMALL else 500, rng=sample_keys[5], temperature=1.0)
    print(decode(out[0].tolist()))
else:
    print("FULL_SIZE is off on a CPU: set FULL_SIZE = True at the top (or "
          "JAXGPT_NOTEBOOK_FULL=1) to train it here anyway")

# %% [markdown]
# ## Conclusions
#
# You wrote a decoder-only Transformer — the "Attention is all you need" architecture without
# its encoder and cross-attention — and trained it on tiny Shakespeare: token and position
# embeddings, masked multi-head self-attention, feed-forward layers, residual connections,
# LayerNorm and dropout, each added for a measured reason, and every piece shown equal to
# jaxgpt's model. At the lecture's full size it has about 10 million parameters, trained on a
# text of about a million characters, and it writes text that looks like Shakespeare and means
# nothing: GPT-3, for comparison, has 175 billion parameters and saw 300 billion tokens. On the functional side, everything
# that PyTorch keeps inside objects was a value you held: parameters (a pytree from `init`),
# optimizer state, random keys, the dropout switch; and every step that touches them was a pure
# function that `jax.jit` compiles once — which is what lets jaxgpt run the same code on a CPU,
# a GPU and a TPU pod.
#
# ## Where this leads: pretraining, finetuning, ChatGPT
#
# What you built is a *decoder-only* Transformer pretrained to continue text — the first stage
# of ChatGPT. The lecture's closing chapters, with where jaxgpt goes further:
#
# - **Scale.** GPT-3's largest model has 175 billion parameters and was trained on about 300
#   billion tokens; the model here has under a million parameters and sees about a million
#   characters. The architecture is the same. jaxgpt's `configs/gpt2.py` is nanoGPT's GPT-2
#   (124M) recipe on OpenWebText, `init_from=gpt2` starts from OpenAI's weights
#   (`pretrained.source`), and README's TPU VM section runs it on a pod slice.
# - **Pretraining vs finetuning.** A pretrained model completes documents; it does not answer
#   questions. ChatGPT's finetuning (as OpenAI describes it) has three stages: supervised
#   finetuning on written question–answer demonstrations, a reward model trained on human
#   rankings of several answers, and reinforcement learning (PPO) of the policy against that
#   reward model. jaxgpt covers the first kind of step: `--config.init_from=WORKDIR` finetunes a
#   run on new data ([finetuning.md](finetuning.md), `configs/finetune_shakespeare.py`); reward
#   models and RLHF are beyond it.
#
# ## Exercises
#
# The lecture ends with four exercises. Each has a prompt: try it first. The solution cell under
# it runs; its code starts hidden (Jupyter: click the cell's "…" to show it; Colab shows a form
# with the solution's title: double-click it, or *Show code*).
#
# ### EX1: all heads in one batched operation
#
# *Try it first:* write `MultiHeadAttention` with the heads as a batch dimension — one linear
# layer making q, k and v of every head at once, shapes (B, nh, T, hs) — and check it computes
# exactly what the `MultiHeadAttention` above computes, given the same weights.

# %% jupyter={"source_hidden": true} cellView="form"
# @title EX1, a solution: all heads in one batched operation
class CausalSelfAttention(nn.Module):
    """All heads in one batched op (nanoGPT's form, jaxgpt's model.CausalSelfAttention)."""

    n_head: int
    n_embd: int

    @nn.compact
    def __call__(self, x, deterministic=True):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = jnp.split(Linear(3 * C, bias=False, name="c_attn")(x), 3, axis=-1)  # (B, T, C) x3
        q, k, v = (t.reshape(B, T, nh, hs).swapaxes(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        wei = q @ k.swapaxes(-2, -1) * hs**-0.5  # (B, nh, T, T)
        wei = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), wei, -jnp.inf), -1)
        y = (wei @ v).swapaxes(1, 2).reshape(B, T, C)  # heads side by side again: (B, T, C)
        return Linear(C, name="proj")(y)  # (B, T, C)


nh = 4
mha = MultiHeadAttention(nh, C // nh, C)
mha_params = mha.init(jax.random.fold_in(init_key, 11), x)["params"]
kernel = jnp.concatenate([jnp.concatenate([mha_params[f"heads_{h}"][name]["kernel"]
                                           for h in range(nh)], axis=1)  # (C, C): heads in order
                          for name in ("query", "key", "value")], axis=1)  # (C, 3C)
fused_params = {"c_attn": {"kernel": kernel}, "proj": mha_params["proj"]}
same = np.allclose(CausalSelfAttention(nh, C).apply({"params": fused_params}, x),
                   mha.apply({"params": mha_params}, x), atol=1e-5)
print("batched heads == heads side by side:", same)

# %% [markdown]
# jaxgpt's version is `model.CausalSelfAttention` (with a KV cache for sampling and an optional
# fused attention kernel).
#
# ### EX2: a GPT that adds
#
# *Try it first:* train the GPT on `a+b=c` problems instead of Shakespeare. Hints from the
# lecture: predict the digits of c in reverse (the order a carry is computed), and count the
# loss on c only (the targets over `a+b=` carry nothing to learn: a and b are random).
#
# The solution below uses your modules: two-digit numbers, so 10,000 problems, of which 500
# are held out and never trained on. Each problem is one fixed-length sequence, `12+34=640`
# for 12 + 34 = 46 (c written with 3 digits, units first); the model reads all but the last
# character and predicts each next one, and a mask keeps only the predictions of c's digits in
# the loss. It reports the exact-match accuracy of greedy decoding on the held-out problems.
# jaxgpt's version is `jaxgpt/addition.py` and `configs/addition.py` (`python train.py
# --config configs/addition.py`).

# %% jupyter={"source_hidden": true} cellView="form"
# @title EX2, a solution: the data, the loss mask, training, held-out accuracy
digits = 2
add_chars = "0123456789+="
add_encode = lambda s: [add_chars.index(ch) for ch in s]
add_decode = lambda l: "".join(add_chars[i] for i in l)


def problem(a, b):  # "12+34=640": a, b with `digits` digits, then c's digits+1 digits reversed
    return f"{a:0{digits}d}+{b:0{digits}d}=" + f"{a + b:0{digits + 1}d}"[::-1]


every = [problem(a, b) for a in range(10**digits) for b in range(10**digits)]
seqs = jnp.array([add_encode(s) for s in every])  # (10000, 9) token ids
order = jax.random.permutation(jax.random.fold_in(demo_key, 12), len(seqs))
held_out, train_set = seqs[order[:500]], seqs[order[500:]]  # 500 never trained on
prompt_len = 2 * digits + 2  # "12+34=": the model's input before c
mask = jnp.arange(seqs.shape[1] - 1) >= prompt_len - 1  # (8,) the targets that are c's digits
print(f"{len(every)} problems, e.g. {every[1234]!r}; x = {every[1234][:-1]!r}, "
      f"y = {every[1234][1:]!r}")
print("loss mask over y:", mask.astype(int), "(only c's digits count)")

add_gpt = GPTLanguageModel(len(add_chars), 64, seqs.shape[1] - 1, ln_f=True,
                           body=tuple(Block(64, 4) for _ in range(2)))


def masked_loss(params, seq):
    """seq (B, 9): the mean cross-entropy over c's digits only."""
    x, y = seq[:, :-1], seq[:, 1:]  # (B, 8) each
    logits = add_gpt.apply({"params": params}, x)  # (B, 8, 12)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)  # (B, 8)
    return (losses * mask).sum() / (mask.sum() * seq.shape[0])


add_opt = optax.adamw(1e-3, weight_decay=0.01)


@jax.jit
def add_steps(params, opt_state, key):
    """100 steps on batches of 64 training problems."""

    def step(carry, k):
        params, opt_state = carry
        batch = train_set[jax.random.randint(k, (64,), 0, len(train_set))]  # (64, 9)
        loss, grads = jax.value_and_grad(masked_loss)(params, batch)
        updates, opt_state = add_opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state),
                                               jax.random.split(key, 100))
    return params, opt_state, losses.mean()


@jax.jit
def solve(params, prompts):
    """prompts (N, 6) "a+b=" -> (N, 3) c's digits, greedy, one token at a time."""
    idx = prompts
    for _ in range(digits + 1):
        logits = add_gpt.apply({"params": params}, idx)[:, -1]  # (N, 12)
        idx = jnp.concatenate([idx, logits.argmax(-1)[:, None]], axis=1)
    return idx[:, prompt_len:]


add_keys = jax.random.split(jax.random.fold_in(demo_key, 13), 2)
add_params = add_gpt.init(add_keys[0], train_set[:1, :-1])["params"]
add_state = add_opt.init(add_params)
with timed("exercises"):
    for call in range(2 if SMALL else 20):  # 100 steps a call
        add_params, add_state, loss = add_steps(add_params, add_state,
                                                jax.random.fold_in(add_keys[1], call))
        if (call + 1) % (2 if SMALL else 5) == 0:
            accuracy = (solve(add_params, held_out[:, :prompt_len])
                        == held_out[:, prompt_len:]).all(axis=1).mean()
            print(f"step {100 * (call + 1)}: loss on c {float(loss):.4f}, held-out exact-match "
                  f"accuracy {float(accuracy):.3f}")
c_digits = solve(add_params, jnp.array([add_encode("12+34=")]))[0].tolist()
print("12+34= ->", add_decode(c_digits), "-> read back reversed:", add_decode(c_digits)[::-1])

# %% [markdown]
# *Tests* of jaxgpt's version: `test_addition.py::test_masked_targets_do_not_count`,
# `test_addition.py::test_accuracy_agrees_with_a_hand_count`.
#
# ### EX3: pretrain on a large corpus, then finetune
#
# *Try it first:* find a dataset so large that you see no gap between train and val loss,
# pretrain on it, then initialise from that model and finetune on tiny Shakespeare with fewer
# steps and a lower learning rate. Does pretraining lower the validation loss?
#
# The solution below needs no download: the different text is Python's own documentation,
# which ships with Python (`pydoc_data`), English prose of about half a million characters,
# written in Shakespeare's 65 characters (any other character becomes a space). The model is
# the story's last small one (3 blocks with LayerNorm, 32 wide): pretrained on the documentation
# for the story's number of steps — at that size the gap between its train and val loss stays a
# few hundredths at most, the exercise's condition — then finetuned on Shakespeare for a tenth of them at a third of the
# learning rate, against the same model trained on Shakespeare alone for the same short budget
# at the story's rate. `--config.init_from=WORKDIR` does the same for `train.py`'s runs
# ([finetuning.md](finetuning.md): the King James Bible, then Shakespeare, at a larger size).

# %% jupyter={"source_hidden": true} cellView="form"
# @title EX3, a solution: pretrain on another text, finetune on Shakespeare, compare
import pydoc_data.topics  # noqa: E402  Python's documentation, in the standard library

docs_text = "\n\n".join(pydoc_data.topics.topics.values())
docs_text = re.sub(r" +", " ", "".join(ch if ch in stoi else " " for ch in docs_text))
print(f"Python's documentation: {len(docs_text):,} characters, e.g.:\n{docs_text[2000:2300]}\n")
docs = jnp.array(encode(docs_text), dtype=jnp.int32)
docs_split = (docs[: int(0.9 * len(docs))], docs[int(0.9 * len(docs)):])
ft_iters = STAGE_ITERS // 10
ex3_model = small(body=blocks(3), ln_f=True)
with timed("exercises"):
    pre_params, pre_curve = train(ex3_model, max_iters=STAGE_ITERS, data=docs_split,
                                  key=jax.random.fold_in(train_key, 3), name="pretrained on the docs")
    ft_params, finetuned = train(ex3_model, max_iters=ft_iters, params=pre_params,
                                 learning_rate=3e-4, name=f"finetuned on Shakespeare, {ft_iters} steps")
    _, scratch = train(ex3_model, max_iters=ft_iters, name=f"Shakespeare alone, {ft_iters} steps")
    _, _, estimate = make_trainer(  # the eval alone: how much do two evals of one model differ?
        ex3_model, (train_data, val_data), *jax.random.split(jax.random.fold_in(demo_key, 15)),
        learning_rate=0.0, batch_size=32, block_size=block_size, eval_iters=STAGE_EVAL_ITERS,
        steps_per_call=1)
    evals_twice = [float(estimate(ft_params, jax.random.fold_in(demo_key, 16 + i))["val"])
                   for i in range(2)]
print(f"pretraining: train {pre_curve['train'][-1]:.4f}, val {pre_curve['val'][-1]:.4f} on the "
      f"docs (gap {pre_curve['val'][-1] - pre_curve['train'][-1]:+.4f})")
print(f"two evals of the finetuned model on other batches: {evals_twice[0]:.4f}, "
      f"{evals_twice[1]:.4f} (the noise of one eval)")
print(f"Shakespeare val loss: pretrained, not finetuned {finetuned['val'][0]:.4f}; finetuned "
      f"{finetuned['val'][-1]:.4f} vs from scratch {scratch['val'][-1]:.4f} after {ft_iters} "
      f"steps ({scratch['val'][-1] - finetuned['val'][-1]:+.4f} for pretraining); the story's "
      f"model after {STAGE_ITERS} steps: {RESULTS['+ LayerNorm']['val'][-1]:.4f}")

# %% [markdown]
# Each eval averages the lecture's 200 batches; the two evals of one model on other batches
# show how much of a difference is noise. What the documentation teaches — which letters follow which in
# English, where spaces and capitals go — carries over to Shakespeare; what it cannot teach
# (the plays' names, verse, archaic words) is what the finetuning adds. Pretraining on a text
# from another domain buys a head start on a short budget, not a better model than training on
# the target text alone for long: the comparison with the story's full-length run says how
# much of the gap is left.
#
# ### EX4: a feature from a later paper — rotary position embeddings
#
# *Try it first:* pick a Transformer improvement from a paper after GPT-2 and add it. The
# solution here is RoPE (Su et al. 2021): instead of adding a position vector to the input,
# rotate each query and key by an angle proportional to its position, channel pair by channel
# pair. Write the rotation, check that a query–key score then depends only on the distance
# between the two positions, and train the laptop-size GPT with it.

# %% jupyter={"source_hidden": true} cellView="form"
# @title EX4, a solution: rotary position embeddings
def rope_by_hand(x, positions):
    """x (T, hs): channel pairs (i, i + hs/2) rotated by position * 10000^(-2i/hs)."""
    hs = x.shape[-1]
    theta = 10000.0 ** (-np.arange(0, hs, 2) / hs)  # (hs/2,)
    angle = np.asarray(positions)[:, None] * theta  # (T, hs/2)
    x1, x2 = np.split(np.asarray(x), 2, axis=-1)
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                           x1 * np.sin(angle) + x2 * np.cos(angle)], axis=-1)


qv, kv = (np.asarray(jax.random.normal(k, (16,)))
          for k in jax.random.split(jax.random.fold_in(demo_key, 14), 2))
score = lambda m, n: rope_by_hand(qv[None], [m])[0] @ rope_by_hand(kv[None], [n])[0]
print("q at 5 . k at 2 =", round(float(score(5, 2)), 4), "| q at 9 . k at 6 =",
      round(float(score(9, 6)), 4), "(the same distance: the same score)")
print("jaxgpt's attention.rope is the same rotation:", np.allclose(
    jaxgpt.attention.rope(jnp.asarray(qv)[None], jnp.array([5])), rope_by_hand(qv[None], [5]), atol=1e-5))

rope_cfg = small_run(shakespeare_cpu.get_config())
rope_cfg.update(data_path=str(DATA_PATH), position="rope", max_iters=SCALED_ITERS,
                lr_decay_iters=SCALED_ITERS, warmup_iters=nano.warmup_iters)
with timed("exercises"), contextlib.redirect_stderr(io.StringIO()):
    training.train(rope_cfg, runs_dir / "rope")
rope_val = plot.read_metrics(runs_dir / "rope")["eval"]["val_loss"][-1]
print(f"nanoGPT's recipe, learned positions: val loss {final['shakespeare_cpu']:.4f}; "
      f"rotary positions: {rope_val:.4f} (one seed each)")

# %% [markdown]
# [sampling.md](sampling.md) measures RoPE over several seeds and shows its other payoff: the KV
# cache stays valid past `block_size`. *Test:* `test_rope.py::test_rolling_cache_is_sliding_window_attention`.
#
# ## PyTorch → JAX, the lens in one table
#
# | the lecture (PyTorch) | here (JAX / Flax / Optax) |
# |---|---|
# | `m = Model(); m.parameters()` | `params = m.init(key, x)["params"]`: a pytree you hold |
# | `logits = m(x)` | `logits = m.apply({"params": params}, x)` |
# | `__init__` + `forward` | `setup` + `__call__`, or one `@nn.compact` `__call__` |
# | `nn.Linear(i, o).weight`, (o, i) | `nn.Dense(o)`'s `kernel`, (i, o) |
# | `torch.manual_seed(1337)` | `root = jax.random.key(1337)`; `split` for new keys, `fold_in(key, step)` per step |
# | `a[i] = v` | `a = a.at[i].set(v)` |
# | `F.cross_entropy(logits.view(B*T, C), targets.view(B*T))` | `optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()` |
# | `torch.multinomial(F.softmax(logits), 1)` | `jax.random.categorical(key, logits)` |
# | `@torch.no_grad()` | nothing: gradients exist only where `jax.grad` is called |
# | `loss.backward()` | `loss, grads = jax.value_and_grad(loss_fn)(params, ...)` |
# | `optimizer.step()` | `updates, opt_state = tx.update(grads, opt_state, params)`; `params = optax.apply_updates(params, updates)` |
# | `model.train()` / `model.eval()` | `deterministic=False` / `True`, `rngs={"dropout": key}` |
# | (eager, op by op) | `jax.jit`: the whole step one compiled program, traced once per shape |
# | a loop over a batch | `jax.vmap`, `jax.lax.map` |
# | `for _ in range(n): idx = cat(idx, next)` | `jax.lax.scan` over a fixed-shape cache |
# | `torch.save(model.state_dict(), path)` | `ocp.StandardCheckpointer().save(path, params)` |
#
# ## Appendix: linen and NNX
#
# This notebook, and jaxgpt, use Flax's *linen* API: a module is a description, and the
# parameters are a separate value that every call takes — pure functions over params, which is
# what this project is about (every transformation, `jit`, `grad`, `vmap`, sees plain functions
# of arrays). Flax's newer *NNX* API goes back to PyTorch's shape: a module object holds its
# parameters as attributes, created with an explicit `rngs` in `__init__`, and `nnx.jit` /
# `nnx.grad` handle the state for you. The lecture's `Head` in NNX, given the linen head's
# weights from above, computes the same:

# %%
from flax import nnx  # noqa: E402


class HeadNNX(nnx.Module):
    """One head of self-attention, as an NNX object that holds its weights."""

    def __init__(self, n_embd, head_size, rngs):
        self.key = nnx.Linear(n_embd, head_size, use_bias=False, rngs=rngs)
        self.query = nnx.Linear(n_embd, head_size, use_bias=False, rngs=rngs)
        self.value = nnx.Linear(n_embd, head_size, use_bias=False, rngs=rngs)

    def __call__(self, x):  # (B, T, C) -> (B, T, hs), as Head.__call__
        T = x.shape[1]
        wei = self.query(x) @ self.key(x).swapaxes(-2, -1) * self.key.out_features**-0.5
        wei = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), wei, -jnp.inf), -1)
        return wei @ self.value(x)


head_nnx = HeadNNX(C, head_size, nnx.Rngs(0))
for name in ("key", "query", "value"):  # the weights live in the object: assign them
    getattr(head_nnx, name).kernel.value = head_params[name]["kernel"]
print("NNX head == linen head:", np.allclose(head_nnx(x), head.apply({"params": head_params}, x),
                                             atol=1e-5))

# %% [markdown]
# How long each part took on this run's machine:

# %%
print(f"{jax.devices()[0].platform}, {os.cpu_count()} CPU cores"
      f"{' (JAXGPT_NOTEBOOK_SMALL settings)' if SMALL else ''}")
for part, seconds in TIMES.items():
    print(f"{seconds:7.1f} s  {part}")
print(f"{time.perf_counter() - T_START:7.1f} s  in all (every cell)")
