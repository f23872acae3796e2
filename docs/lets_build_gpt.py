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
# code, spelled out* chapter by chapter, in JAX and Flax instead of PyTorch. The model is the
# same; the style is functional: a module holds no weights, parameters are a value you pass in,
# randomness is a key you pass in, and a training step is a pure function that `jax.jit`
# compiles once. Where the lecture writes a PyTorch line, the cell often shows it in a comment
# beside the JAX one.
#
# Each chapter ends with where the idea lives in `jaxgpt` and which test proves its claim;
# [lecture.md](lecture.md) has the whole table.
#
# **Running it.** From a checkout: `pip install -e ".[notebook]"`, then open this notebook
# (`docs/lets_build_gpt.ipynb`; its source is `docs/lets_build_gpt.py`, a jupytext pair). On
# Colab: upload or clone the repository, `%pip install -e <repo>[notebook]`, open the notebook
# from `docs/`. Every cell runs on a laptop CPU. The outputs saved in the notebook come from a
# run at the settings below on a 2-core CPU shared with other jobs, which took 6 minutes, 4.4
# of them in the 2000 training steps (about 40 s on an idle machine, see `docs/performance.md`).
# A GPU or TPU runtime runs the same code.

# %%
import contextlib
import io
import math
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

try:
    import jaxgpt
except ImportError:  # a checkout that is not pip-installed, opened in docs/
    sys.path.insert(0, str(Path.cwd().parent))
    import jaxgpt
sys.path.insert(0, str(Path(jaxgpt.__file__).resolve().parents[1]))  # the recipes in configs/

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging as absl_logging

from jaxgpt import batches, model, plot, pretrained, sampling, training
from jaxgpt.tokenizer import CharTokenizer

absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's informational warnings
print(f"jax {jax.__version__} on {jax.devices()[0].platform}: {jax.devices()}")

# %% [markdown]
# **Parameters.** `JAXGPT_NOTEBOOK_SMALL=1` shrinks the training runs and the models so that
# CI can execute every cell in a minute or two; the numbers printed are then not the
# lecture's. `TRAIN_LECTURE` (or `JAXGPT_NOTEBOOK_LECTURE=1`) also trains the lecture's full
# model near the end: meant for a GPU/TPU runtime.

# %%
SMALL = os.environ.get("JAXGPT_NOTEBOOK_SMALL") == "1"
TRAIN_LECTURE = os.environ.get("JAXGPT_NOTEBOOK_LECTURE") == "1"
BIGRAM_STEPS = 300 if SMALL else 10_000  # the lecture trains the bigram for 10000 steps
GPT_ITERS = 30 if SMALL else 2000  # configs/shakespeare_cpu.py: nanoGPT's CPU recipe

# %% [markdown]
# ## Reading the data
#
# Tiny Shakespeare: all of Shakespeare's works in one 1 MB file. The path comes from
# `JAXGPT_SHAKESPEARE` if set; otherwise it is downloaded once, as the lecture's `wget` does,
# into `~/.cache/jaxgpt` (where `train.py` keeps it too).

# %%
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_PATH = Path(os.environ.get("JAXGPT_SHAKESPEARE") or
                 Path.home() / ".cache" / "jaxgpt" / "shakespeare_char" / "input.txt")
if not DATA_PATH.is_file():
    DATA_PATH.parent.mkdir(parents=True, exist_ok=True)
    try:
        urllib.request.urlretrieve(URL, DATA_PATH)
    except OSError as e:
        raise RuntimeError(f"could not download {URL} ({e}); offline? download it elsewhere and "
                           "set JAXGPT_SHAKESPEARE=/path/to/input.txt before starting") from None
text = DATA_PATH.read_text(encoding="utf-8")
print("length of dataset in characters:", len(text))
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
# The whole text as one array of token ids, then the first 90 % for training and the rest for
# validation. A JAX array is immutable, like every value in this notebook.

# %%
data_all = jnp.array(encode(text), dtype=jnp.int32)  # PyTorch: torch.tensor(encode(text))
print(data_all.shape, data_all.dtype)
print(data_all[:100])
n = int(0.9 * len(data_all))  # first 90% will be train, rest val
train_data, val_data = data_all[:n], data_all[n:]
print(len(train_data), len(val_data))

# %% [markdown]
# *In jaxgpt:* `tokenizer.CharTokenizer`, `datasets.load` (the 90/10 split). *Tests:*
# `test_data.py::test_char_tokenizer_round_trip`, `test_data.py::test_split_is_90_10_in_order`,
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
# function takes a key, and the same key gives the same numbers. A training loop derives the
# key of step `s` from one root key with `jax.random.fold_in(root, s)` — so step 1234's batch
# is the same whether or not steps 0..1233 ran in this process (which is how a resumed run
# continues the same stream). `batches.get_batch` is the lecture's `get_batch` as a pure function
# of (data, key), so it can run inside a compiled step.

# %%
batch_size = 4  # how many independent sequences will we process in parallel?
root = jax.random.PRNGKey(1337)  # PyTorch: torch.manual_seed(1337)
xb, yb = batches.get_batch(train_data, jax.random.fold_in(root, 0), batch_size, block_size)
print("inputs:", xb.shape, "\n", xb)
print("targets:", yb.shape, "\n", yb)
for b in range(batch_size):  # batch dimension
    for t in range(block_size):  # time dimension
        print(f"when input is {xb[b, : t + 1].tolist()} the target: {int(yb[b, t])}")
    break  # the first row is enough to see the pattern

# %% [markdown]
# *In jaxgpt:* `batches.get_batch`. *Test:* `test_data.py::test_get_batch_windows_are_shifted_by_one`.
#
# ## The bigram model
#
# The simplest language model: the current token alone picks a row of a `vocab_size x
# vocab_size` table, read as the logits of the next token.
#
# **The functional lens: params as a pytree, `init` and `apply`.** A flax module is a
# description. `model.init(key, example)` returns the parameters — a nested dict of arrays (a
# *pytree*) — and `model.apply({"params": params}, idx)` is the forward pass as a function of
# them. PyTorch's `model = BigramLanguageModel(vocab_size)` creates the weights inside the
# object; here nothing is hidden.

# %%
bigram = model.BigramLanguageModel(model.GPTConfig(vocab_size=vocab_size))
params = bigram.init(jax.random.PRNGKey(0), xb)["params"]
print(jax.tree.map(jnp.shape, params))  # the pytree's structure, with shapes as leaves


def loss_fn(params, xb, yb):
    logits = bigram.apply({"params": params}, xb)  # (B, T, C); PyTorch: logits = m(xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()  # F.cross_entropy


logits = bigram.apply({"params": params}, xb)
print(logits.shape)
print(f"loss at init {loss_fn(params, xb, yb):.4f}; a uniform guess would be -ln(1/{vocab_size}) "
      f"= {math.log(vocab_size):.4f}")

# %% [markdown]
# The loss at init is near `ln 65 ≈ 4.17`, a little above it because the table starts as
# N(0, 1) noise (the lecture gets 4.87). *Test:* `test_model.py::test_loss_at_init_is_about_ln_vocab`.
#
# **Generation**, the lecture's loop: take the logits at the last position, sample, append,
# repeat. Each step gets its own key.

# %%
@jax.jit
def next_token(params, idx, key):
    """idx (B, T) -> (B, 1): sample the token that follows each row."""
    logits = bigram.apply({"params": params}, idx)[:, -1, :]  # (B, C) the last position
    return jax.random.categorical(key, logits)[:, None]  # (B, 1); torch.multinomial(probs, 1)


def generate_loop(params, idx, max_new_tokens, rng):
    """The lecture's generate: idx (B, T) -> (B, T + max_new_tokens), one Python step a token."""
    keys = jax.random.split(rng, max_new_tokens)
    for i in range(max_new_tokens):
        # the bigram reads only the last token (the lecture passes all of idx): JAX compiles a
        # function once per input shape, and a growing input would compile at every step
        idx_next = next_token(params, idx[:, -1:], keys[i])  # (B, 1)
        idx = np.concatenate([idx, idx_next], axis=1)  # (B, T+1), grown on the host
    return idx


start = np.zeros((1, 1), dtype=np.int32)  # token 0 is the newline
print(decode(generate_loop(params, start, 100, jax.random.PRNGKey(1))[0].tolist()))

# %% [markdown]
# Garbage, as expected from random weights. Now train it.
#
# **The functional lens: `jax.value_and_grad`, optax, `jax.jit`.** PyTorch's
# `loss.backward(); optimizer.step()` mutates `.grad` and the weights. In JAX
# `jax.value_and_grad(loss_fn)` is a *new function* returning the loss and the gradient
# pytree; the optax optimizer turns gradients and its own state into updates; the step returns
# the new params and optimizer state. Being pure, the whole step compiles with `jax.jit` into
# one XLA program, the batch sampling included.

# %%
optimizer = optax.adamw(1e-3, weight_decay=0.01)  # torch.optim.AdamW(m.parameters(), lr=1e-3)
opt_state = optimizer.init(params)


@jax.jit
def train_step(params, opt_state, rng):
    xb, yb = batches.get_batch(train_data, rng, 32, block_size)  # sample a batch of data
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)  # loss.backward()
    updates, opt_state = optimizer.update(grads, opt_state, params)  # optimizer.step()
    return optax.apply_updates(params, updates), opt_state, loss


t0 = time.perf_counter()
for steps in range(BIGRAM_STEPS):
    params, opt_state, loss = train_step(params, opt_state, jax.random.fold_in(root, steps))
print(f"loss after {BIGRAM_STEPS} steps: {float(loss):.4f} ({time.perf_counter() - t0:.1f} s)")

# %% [markdown]
# **The functional lens: `jax.lax.scan` for the sampler.** The loop above returns to Python
# after every token, and its `idx` changes shape at every step. A sampler that is one compiled
# program carries a fixed-shape state through `jax.lax.scan` instead: here the last token, since
# the bigram looks at nothing else. With the same keys it draws exactly the same tokens as the
# loop.

# %%
@jax.jit
def generate_scan(params, last, rng_keys):
    """last (B,) token ids, rng_keys (N, 2) -> (B, N) new tokens, one compiled loop."""

    def step(tok, key):  # carry: the last token (B,); one key per step
        logits = bigram.apply({"params": params}, tok[:, None])[:, -1, :]  # (B, C)
        tok = jax.random.categorical(key, logits)  # (B,)
        return tok, tok

    _, toks = jax.lax.scan(step, last, rng_keys)  # toks (N, B)
    return toks.T  # (B, N)


rng = jax.random.PRNGKey(2)
looped = generate_loop(params, start, 50, rng)[:, 1:]
scanned = generate_scan(params, start[:, -1], jax.random.split(rng, 50))
assert (looped == scanned).all()  # the same tokens from the same keys
print(decode(generate_scan(params, start[:, -1], jax.random.split(rng, 500))[0].tolist()))

# %% [markdown]
# Still not Shakespeare, but it has learned which letters follow which. *In jaxgpt:*
# `model.BigramLanguageModel`, `configs/bigram.py` (`python train.py --config
# configs/bigram.py`). The tokens do not talk to each other yet: that is the next step.
#
# ## The mathematical trick in self-attention
#
# We want token `t` to see a summary of tokens `0..t` and nothing of the future. The simplest
# summary is the mean. Four ways to compute it:

# %%
B, T, C = 4, 8, 2  # batch, time, channels
x = jax.random.normal(jax.random.PRNGKey(1337), (B, T, C))

# version 1: a loop over the past (PyTorch: xbow[b, t] = torch.mean(xprev, 0))
xbow = np.zeros((B, T, C))
for b in range(B):
    for t in range(T):
        xprev = x[b, : t + 1]  # (t+1, C)
        xbow[b, t] = xprev.mean(0)

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

print(wei)
print(np.allclose(xbow, xbow2, atol=1e-6), np.allclose(xbow, xbow3, atol=1e-6))
print(np.allclose(xbow, model.weighted_average(x), atol=1e-6))  # jaxgpt's, version 3

# %% [markdown]
# Version 3 is the one that generalises: the zeros are *affinities*, all equal here. Version 4,
# **self-attention**, makes them data-dependent: every token emits a query ("what am I looking
# for") and a key ("what do I contain"); the affinity of token `t` for token `s` is the dot
# product of `t`'s query with `s`'s key, and what is aggregated is each token's value.
#
# `nn.Dense` is flax's `nn.Linear`. Like every flax module it holds no weights: `init` makes
# them, `apply` uses them.

# %%
B, T, C = 4, 8, 32  # batch, time, channels
x = jax.random.normal(jax.random.PRNGKey(1337), (B, T, C))

head_size = 16
key = nn.Dense(head_size, use_bias=False)  # PyTorch: nn.Linear(C, head_size, bias=False)
query = nn.Dense(head_size, use_bias=False)
value = nn.Dense(head_size, use_bias=False)
kp, qp, vp = (layer.init(jax.random.PRNGKey(i), x)["params"]
              for i, layer in enumerate((key, query, value)))
k = key.apply({"params": kp}, x)  # (B, T, 16)
q = query.apply({"params": qp}, x)  # (B, T, 16)
wei = q @ jnp.swapaxes(k, -2, -1)  # (B, T, 16) @ (B, 16, T) ---> (B, T, T)
wei = jnp.where(tril == 0, -jnp.inf, wei)
wei = jax.nn.softmax(wei, axis=-1)
v = value.apply({"params": vp}, x)  # (B, T, 16)
out = wei @ v  # (B, T, T) @ (B, T, 16) ---> (B, T, 16)
print(out.shape)
print(np.round(wei[0], 2))

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
# `test_model.py::test_weighted_average_equals_the_lectures_loop`,
# `test_lecture.py::test_the_four_versions_of_the_trick_agree`.
#
# ## One head of self-attention
#
# `jaxgpt.model.Head` is the cell above as a module, with the scaling by `head_size ** -0.5`
# explained below. Given the same weights it computes the same thing.

# %%
cfg = model.GPTConfig(vocab_size=vocab_size, block_size=T, n_embd=C, n_head=2)  # head size 16
head = model.Head(cfg)
head_params = head.init(jax.random.PRNGKey(0), x)["params"]
print(jax.tree.map(jnp.shape, head_params))

head_params = {"key": kp, "query": qp, "value": vp}  # the weights of the cell above
scaled = jax.nn.softmax(jnp.where(tril == 0, -jnp.inf, q @ jnp.swapaxes(k, -2, -1)
                                  * head_size**-0.5), axis=-1)  # (B, T, T)
print(np.allclose(head.apply({"params": head_params}, x), scaled @ v, atol=1e-5))

# %% [markdown]
# *Test:* `test_model.py::test_head_is_softmax_of_scaled_affinities` (against a numpy
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

gpt = model.GPT(model.GPTConfig(vocab_size=vocab_size, block_size=T, n_layer=1, n_head=2,
                                n_embd=C))
gpt_params = jax.jit(gpt.init)(jax.random.PRNGKey(0), xb)["params"]
gpt_forward = jax.jit(gpt.apply)  # one compiled program instead of op-by-op dispatch
idx = xb[:1]  # (1, T) token ids
logits = gpt_forward({"params": gpt_params}, idx)
logits_shuffled = gpt_forward({"params": gpt_params}, idx[:, perm])
print("with position embeddings (the GPT) it changes:",
      not np.allclose(logits[:, -1], logits_shuffled[:, -1], atol=1e-5))

# %% [markdown]
# **Batch elements never talk to each other.** Every example in the batch is processed
# independently: change one row, and the others' outputs stay exactly as they were.

# %%
x_other = x.at[1].set(jax.random.normal(jax.random.PRNGKey(9), (T, C)))  # replace example 1
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
    k, q, v = (layer.apply({"params": p}, x) for layer, p in ((key, kp), (query, qp), (value, vp)))
    wei = q @ jnp.swapaxes(k, -2, -1) * head_size**-0.5  # (B, T, T)
    if masked:
        wei = jnp.where(tril == 0, -jnp.inf, wei)  # the decoder's line
    return jax.nn.softmax(wei, axis=-1) @ v  # (B, T, hs)


x_future = x.at[:, 5].set(jax.random.normal(jax.random.PRNGKey(7), (B, C)))  # change token 5
for masked in (True, False):
    before, after = attention(x, masked), attention(x_future, masked)
    print("decoder" if masked else "encoder", "outputs at 0..4 unchanged:",
          np.allclose(before[:, :5], after[:, :5], atol=1e-5))
print("jaxgpt's Head is the decoder:", np.allclose(head.apply(hv, x), attention(x, True), atol=1e-5))

# %% [markdown]
# **Self-attention vs cross-attention.** Here queries, keys and values all come from the same
# `x`: *self*-attention. In *cross*-attention (the encoder-decoder Transformer of "Attention
# is all you need") the queries come from `x` while the keys and values come from another
# source, say an encoded French sentence of a different length. GPT is decoder-only: it has
# self-attention only.

# %%
source = jax.random.normal(jax.random.PRNGKey(3), (B, 5, 20))  # (B, T_src, C_src)
k_x = nn.Dense(head_size, use_bias=False)  # keys and values read the source...
v_x = nn.Dense(head_size, use_bias=False)
k = k_x.apply(k_x.init(jax.random.PRNGKey(4), source), source)  # (B, 5, 16)
v = v_x.apply(v_x.init(jax.random.PRNGKey(5), source), source)  # (B, 5, 16)
wei = jax.nn.softmax(q @ jnp.swapaxes(k, -2, -1) * head_size**-0.5, axis=-1)  # (B, 8, 5)
print(wei.shape, (wei @ v).shape)  # ...the queries are still x's: 8 outputs, 5 sources each

# %% [markdown]
# **Scaled attention.** With unit-variance queries and keys, `q @ k.T` has variance
# `head_size`; multiplying by `head_size ** -0.5` brings it back to 1.

# %%
k = jax.random.normal(jax.random.PRNGKey(10), (B, T, head_size))
q = jax.random.normal(jax.random.PRNGKey(11), (B, T, head_size))
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
    k = jax.random.normal(jax.random.PRNGKey(12), (B, T, hs))
    q = jax.random.normal(jax.random.PRNGKey(13), (B, T, hs))
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
# ## Multi-head attention
#
# Several heads in parallel, each with a smaller head size, their outputs concatenated and
# projected back into the residual stream: several independent channels of communication.

# %%
mha = model.MultiHeadAttention(cfg)  # 2 heads of size 16
mha_params = mha.init(jax.random.PRNGKey(0), x)["params"]
print(jax.tree.map(jnp.shape, mha_params))

heads = [model.Head(cfg).apply({"params": mha_params[f"heads_{i}"]}, x) for i in range(2)]
proj = mha_params["c_proj"]
by_hand = jnp.concatenate(heads, axis=-1) @ proj["kernel"] + proj["bias"]  # (B, T, C)
print(np.allclose(mha.apply({"params": mha_params}, x), by_hand, atol=1e-5))

# %% [markdown]
# The lecture's exercise 1 does all heads in one batched matrix multiply: that is
# `model.CausalSelfAttention` (nanoGPT's form, the default `--config.attention=fused`).
# *Test:* `test_model.py::test_fused_heads_equal_multi_head_attention` (same output with the
# weights copied across), `test_lecture.py::test_multi_head_is_heads_side_by_side_projected`.
#
# ## Feed-forward: the computation
#
# After the tokens have talked, each thinks about what it gathered on its own: a small MLP
# applied to every position independently.

# %%
ff = model.FeedForward(cfg)
ff_params = ff.init(jax.random.PRNGKey(0), x)["params"]
print(jax.tree.map(jnp.shape, ff_params))
whole = ff.apply({"params": ff_params}, x)
one_at_a_time = jnp.concatenate([ff.apply({"params": ff_params}, x[:, t : t + 1])
                                 for t in range(T)], axis=1)
print("per token:", np.allclose(whole, one_at_a_time, atol=1e-5))

# %% [markdown]
# *Test:* `test_lecture.py::test_feed_forward_is_per_token`.
#
# ## Residual connections
#
# `x = x + self.sa(self.ln1(x))`, `x = x + self.ffwd(self.ln2(x))`: each block *adds* to a
# residual stream. Addition passes gradients through unchanged, a "gradient superhighway" from
# the loss to the first layer; the blocks' contributions start small (their output projections
# are initialised small) and grow as they learn. At init a `Block` is nearly the identity, and
# so is its gradient:

# %%
block = model.Block(cfg)
block_params = jax.jit(block.init)(jax.random.PRNGKey(0), x)["params"]
print(jax.tree.map(jnp.shape, block_params))
y, _ = block.apply({"params": block_params}, x)  # (B, T, C), and the KV cache: None here
print(f"|block(x) - x| / |x| = {jnp.linalg.norm(y - x) / jnp.linalg.norm(x):.3f}")


def last_token_out(v):  # the Block's output at the last token of x[0] as a function of its input
    y, _ = block.apply({"params": block_params}, x[:1].at[0, -1].set(v))  # (1, T, C)
    return y[0, -1]  # (C,)


jac = jax.jit(jax.jacobian(last_token_out))(x[0, -1])  # (C, C); transformations compose
print(f"d out / d in at the last token: |jacobian - identity| / |identity| = "
      f"{jnp.linalg.norm(jac - jnp.eye(C)) / jnp.linalg.norm(jnp.eye(C)):.3f}")

# %% [markdown]
# ## LayerNorm
#
# The lecture's `LayerNorm1d`: normalise each token's features (a row), not each feature
# across the batch (a column, BatchNorm). `gamma`, `beta` then rescale. jaxgpt applies it
# before each sub-layer (pre-norm, as GPT-2) and once at the end (`ln_f`).

# %%
class LayerNorm1d:  # the lecture's, in jax.numpy (no running buffers, no mutation)
    def __init__(self, dim, eps=1e-5):
        self.eps, self.gamma, self.beta = eps, jnp.ones(dim), jnp.zeros(dim)

    def __call__(self, x):
        xmean = x.mean(1, keepdims=True)  # batch mean
        xvar = x.var(1, keepdims=True)  # batch variance
        xhat = (x - xmean) / jnp.sqrt(xvar + self.eps)  # normalize to unit variance
        return self.gamma * xhat + self.beta


x100 = jax.random.normal(jax.random.PRNGKey(1337), (32, 100))  # batch size 32 of 100-dim vectors
x_ln = LayerNorm1d(100)(x100)
print(f"a feature across the batch: mean {x_ln[:, 0].mean():.4f} std {x_ln[:, 0].std():.4f}")
print(f"one example's features:     mean {x_ln[0, :].mean():.4f} std {x_ln[0, :].std():.4f}")
ln = nn.LayerNorm(epsilon=1e-5)  # flax's, as the model uses it
print("same as flax's:", np.allclose(ln.apply(ln.init(root, x100), x100), x_ln, atol=1e-5))

# %% [markdown]
# ## Dropout
#
# During training, dropout zeroes a random fraction of activations (and rescales the rest),
# so the network cannot rely on any one path: an ensemble of subnetworks. **Functional lens:**
# PyTorch switches it with `model.train()` / `model.eval()`, state on the module; here it is an
# argument, `deterministic=False`, and its randomness a key passed in `rngs`.

# %%
drop = nn.Dropout(rate=0.2)
ones = jnp.ones((2, 10))
print(drop.apply({}, ones, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}))
print(drop.apply({}, ones, deterministic=True))  # evaluation: the identity

# %% [markdown]
# *Test:* `test_model.py::test_dropout_only_when_not_deterministic`.
#
# ## The full GPT
#
# Token embeddings plus position embeddings, `n_layer` blocks, a final LayerNorm, a linear
# layer to the vocabulary: `jaxgpt.model.GPT`. Here at the size of nanoGPT's CPU recipe
# (`configs/shakespeare_cpu.py`: 4 layers, 4 heads, 128 wide, a context of 64 characters).

# %%
gpt_cfg = model.GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=4, n_head=4,
                          n_embd=128, bias=False)
gpt = model.GPT(gpt_cfg)
xb, yb = batches.get_batch(train_data, jax.random.fold_in(root, 1), 12, gpt_cfg.block_size)
gpt_params = jax.jit(gpt.init)(jax.random.PRNGKey(0), xb)["params"]
print(jax.tree.map(jnp.shape, {k: v for k, v in gpt_params.items() if k in ("wte", "wpe", "h_0")}))
n_params = sum(p.size for p in jax.tree.leaves(gpt_params))
print(f"{n_params / 1e6:.2f} M parameters; {len(gpt_params)} top-level modules: {list(gpt_params)}")
logits = jax.jit(gpt.apply)({"params": gpt_params}, xb)  # (B, T, vocab_size)
loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
print(f"loss at init {loss:.4f} vs ln {vocab_size} = {math.log(vocab_size):.4f}")

# %% [markdown]
# The lecture's own model (`configs/lecture.py`: 6 layers, 6 heads, 384 wide, a context of
# 256) is too big to train here in minutes. **Functional lens:** `jax.eval_shape` runs `init`
# abstractly — shapes and dtypes, no memory, no arithmetic — so counting its parameters is
# free.

# %%
from configs import lecture, shakespeare_cpu  # the recipes, beside jaxgpt/

lecture_config = lecture.get_config()
lecture_model = model.GPT(model.GPTConfig.from_config(lecture_config, vocab_size))
shapes = jax.eval_shape(lecture_model.init, root,
                        jax.ShapeDtypeStruct((1, lecture_config.block_size), jnp.int32))
print(f"{sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) / 1e6:.6f} M parameters "
      "(the lecture's gpt.py prints 10.788929 M)")

# %% [markdown]
# ## Training, with jaxgpt's loop
#
# The bigram's loop above is the whole idea. `training.train(config, workdir)` is the same
# loop grown up: one `jax.jit`-compiled call runs `steps_per_call` optimizer steps (a
# `lax.scan` over `train_step`, batches drawn on the device from `fold_in(root, step)`), it
# evaluates every `eval_interval` steps over `eval_iters` batches of each split (the
# lecture's `estimate_loss`), writes `metrics.jsonl` and an orbax checkpoint into `workdir`, and
# a second call resumes from it. The recipe is nanoGPT's CPU one; `python train.py --config
# configs/shakespeare_cpu.py` runs the same thing from a shell.

# %%
config = shakespeare_cpu.get_config()
config.data_path = str(DATA_PATH)
config.max_iters = config.lr_decay_iters = GPT_ITERS
if SMALL:  # CI: a 2-layer model, a few steps, tiny evals
    config.n_layer, config.n_embd, config.block_size, config.batch_size = 2, 64, 32, 8
    config.eval_interval, config.eval_iters, config.steps_per_call = 10, 2, 10
    config.warmup_iters = 5
workdir = Path(tempfile.mkdtemp(prefix="jaxgpt_notebook_")) / "shakespeare_cpu"
t0 = time.perf_counter()
with contextlib.redirect_stderr(io.StringIO()):  # the progress bar: noise in a saved notebook
    training.train(config, workdir)  # prints nanoGPT's eval lines
print(f"trained {GPT_ITERS} steps in {time.perf_counter() - t0:.0f} s into {workdir}")

# %% [markdown]
# nanoGPT reports a val loss of 1.88 with this recipe. An eval of 20 batches carries about
# ±0.02 of sampling noise; over 1000 batches the recipe's val loss is about 1.91
# (`docs/performance.md`). The picture of the run, the same one `python -m jaxgpt.plot WORKDIR`
# writes to `WORKDIR/loss.png`:

# %%
from IPython.display import Image, display

Image(filename=str(plot.save([workdir])))

# %% [markdown]
# ## Sampling
#
# `pretrained.load_run(workdir)` loads what a trained workdir holds — config, tokenizer, model
# and params (the checkpoint with the best val loss) — in one call; `sample.py` uses it too.
# `sampling.generate` is the lecture's `generate`, compiled: the prompt goes through the model
# once into a fixed-shape key/value cache, then a `jax.lax.scan` produces one token per step,
# attending to the cached keys instead of re-running the whole context (past `block_size`
# tokens it keeps the lecture's window of the last `block_size` exactly). The lecture samples
# at temperature 1.0; `sample.py` defaults to 0.8, a little more conservative.

# %%
run = pretrained.load_run(workdir)
print(f"step {run.step}, {type(run.model).__name__}, vocab {run.tokenizer.vocab_size}")
idx = jnp.zeros((1, 1), dtype=jnp.int32)  # start from a newline, as the lecture
out = sampling.generate(run.model, run.params, idx, 500, rng=jax.random.PRNGKey(1337),
                        temperature=1.0)
print(run.tokenizer.decode(out[0].tolist()))

# %% [markdown]
# *In jaxgpt:* `sampling.generate`; the lecture's loop (one full forward per token) is
# `sampling.generate_uncached`, the reference it is tested and timed against. *Tests:*
# `test_sampling.py::test_cached_greedy_equals_naive`,
# `test_sampling.py::test_cached_logits_equal_full_forward`,
# `test_sampling.py::test_one_compilation_for_any_prompt_length_and_new_tokens`.
#
# ## The lecture's model, full size
#
# `configs/lecture.py` is the lecture's `gpt.py`: 6 layers, 6 heads, 384 wide, one `Head`
# module per head, dropout 0.2, 5000 steps of AdamW at 3e-4. It takes hours on a CPU and
# minutes on a GPU; set `TRAIN_LECTURE = True` (or `JAXGPT_NOTEBOOK_LECTURE=1`) on a GPU/TPU
# runtime to train it here, or from a shell: `python train.py --config configs/lecture.py`.

# %%
if TRAIN_LECTURE:
    lecture_config.data_path = str(DATA_PATH)
    lecture_dir = Path("runs") / "lecture"
    training.train(lecture_config, lecture_dir)
    lecture_run = pretrained.load_run(lecture_dir)
    out = sampling.generate(lecture_run.model, lecture_run.params, idx, 500,
                            rng=jax.random.PRNGKey(1337))
    print(lecture_run.tokenizer.decode(out[0].tolist()))
    display(Image(filename=str(plot.save([lecture_dir]))))
else:
    print("skipped: set TRAIN_LECTURE = True (GPU/TPU runtime) to train configs/lecture.py")

# %% [markdown]
# ## PyTorch → JAX, the lens in one table
#
# | the lecture (PyTorch) | here (JAX / Flax / Optax) |
# |---|---|
# | `m = Model(); m.parameters()` | `params = m.init(key, x)["params"]`: a pytree you hold |
# | `logits = m(x)` | `logits = m.apply({"params": params}, x)` |
# | `torch.manual_seed(1337)` | `root = jax.random.PRNGKey(1337)`; `fold_in(root, step)` per step |
# | `loss.backward()` | `loss, grads = jax.value_and_grad(loss_fn)(params, ...)` |
# | `optimizer.step()` | `updates, opt_state = tx.update(grads, opt_state, params)` |
# | `model.train()` / `model.eval()` | `deterministic=False` / `True`, `rngs={"dropout": key}` |
# | (eager, op by op) | `jax.jit`: the whole step one compiled program |
# | `for _ in range(n): idx = cat(idx, next)` | `jax.lax.scan` over a fixed-shape cache |
