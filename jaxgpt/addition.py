"""The lecture's exercise 2: a GPT that adds. Problems `a+b=c` of `digits`-digit numbers.

Every problem is one fixed-length sequence: a and b zero-padded to `digits` digits, c to
`digits + 1` (its carry), optionally written least significant digit first (`reverse`: the
order in which a carry is computed). "03+45=048" (or "03+45=840" reversed): the model reads
x = seq[:-1] and learns y = seq[1:], with the targets over `a+b=` set to -1, which the loss
ignores: only c is predicted (the problem itself is random, nothing to learn).

The problems are split once (from the run's seed): `eval_problems` of them are held out, never
trained on. `draw` picks problems on the device where batches.DeviceBatches draws text windows,
so the same compiled train step serves both; `accuracy` decodes c greedily with
jaxgpt.sampling for every held-out problem, reported at each eval.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import sampling
from jaxgpt.data import Dataset
from jaxgpt.errors import UserError
from jaxgpt.tokenizer import CharTokenizer

CHARS = "0123456789+="  # token id of digit d is d
TOKENIZER = CharTokenizer(CHARS)
PLUS, EQUALS = 10, 11
MAX_DIGITS = 3  # 10**6 problems: their ids fit in a 4 MB array


def seq_len(digits: int) -> int:
    """a + b = c: digits + 1 + digits + 1 + (digits + 1) tokens."""
    return 3 * digits + 3


def problem_ids(n_digits: int, eval_problems: int, seed: int):
    """(train ids, held-out ids): a problem's id is a * 10**digits + b; a seeded permutation."""
    n = 10 ** (2 * n_digits)
    perm = np.random.default_rng(seed).permutation(n).astype(np.int32)
    return perm[eval_problems:], perm[:eval_problems]


def digits_of(v, n: int):
    """(...,) ints -> (..., n) their n decimal digits, most significant first."""
    return (v[..., None] // 10 ** jnp.arange(n - 1, -1, -1)) % 10


def encode(ids, n_digits: int, reverse: bool):
    """(...,) problem ids -> (..., seq_len) token sequences `a+b=c`. Jittable."""
    a, b = ids // 10**n_digits, ids % 10**n_digits
    c = digits_of(a + b, n_digits + 1)  # (..., digits+1)
    if reverse:
        c = c[..., ::-1]
    shape = (*ids.shape, 1)
    return jnp.concatenate([digits_of(a, n_digits), jnp.full(shape, PLUS),
                            digits_of(b, n_digits), jnp.full(shape, EQUALS), c],
                           axis=-1).astype(jnp.int32)


def inputs_targets(seq, n_digits: int):
    """seq (..., L) -> x, y (..., L-1): y is seq shifted, -1 where it is a, +, b or =."""
    x, y = seq[..., :-1], seq[..., 1:]
    y = jnp.where(jnp.arange(y.shape[-1]) >= 2 * n_digits + 1, y, -1)  # only c's digits count
    return x, y


def draw(ids, key, n: int, n_digits: int, reverse: bool):
    """n problems drawn uniformly from `ids` on the device -> x, y (n, L-1): the task's
    examples for batches.DeviceBatches (Dataset.draw), traced inside the compiled call."""
    pick = jax.random.randint(key, (n,), 0, ids.shape[0])  # (n,)
    return inputs_targets(encode(ids[pick], n_digits, reverse), n_digits)  # (n, L-1) each


def accuracy(model, params, ids, n_digits: int, reverse: bool) -> float:
    """Exact-match accuracy: the fraction of problems `ids` whose c, decoded greedily after
    the prompt `a+b=`, is right in every digit."""
    seq = np.asarray(encode(jnp.asarray(ids), n_digits, reverse))  # (N, L)
    prompt, want = seq[:, :2 * n_digits + 2], seq[:, 2 * n_digits + 2:]  # `a+b=`, c
    got = np.concatenate(list(sampling.generate_chunks(
        model, params, prompt, n_digits + 1, rng=jax.random.PRNGKey(0), temperature=0.0,
        chunk=n_digits + 1)), axis=1)  # (N, digits+1)
    return float(np.mean(np.all(got == want, axis=1)))


def load(config, tokenizer=None) -> Dataset:
    """The task as a data.Dataset: problem ids per split, the 12-character tokenizer and how to
    draw examples (`Accuracy` scores the held-out problems). `tokenizer` (weights to start
    from) must be the task's own."""
    a = config.addition
    if tokenizer is not None and tokenizer.to_dict() != TOKENIZER.to_dict():
        raise UserError(f"dataset=addition needs the vocabulary {CHARS!r}, but "
                        f"init_from={config.init_from}'s weights have another: start from a "
                        "run trained on the addition task, or from scratch")
    if not 1 <= a.digits <= MAX_DIGITS:
        raise UserError(f"config.addition.digits={a.digits}: must be between 1 and "
                        f"{MAX_DIGITS}")
    n = 10 ** (2 * a.digits)
    if not 1 <= a.eval_problems <= n // 2:
        raise UserError(f"config.addition.eval_problems={a.eval_problems}: must be between 1 "
                        f"and half of the {n} problems")
    if config.block_size < seq_len(a.digits) - 1:
        raise UserError(f"block_size={config.block_size} is shorter than a problem: set "
                        f"--config.block_size={seq_len(a.digits) - 1} for {a.digits} digits")
    train, val = problem_ids(a.digits, a.eval_problems, config.seed)
    return Dataset(train=train, val=val, tokenizer=TOKENIZER,
                   draw=functools.partial(draw, n_digits=a.digits, reverse=a.reverse))


class Accuracy:
    """The task's measure at every eval of a run (training.eval_measures): {"accuracy": the
    exact-match accuracy on the held-out problems `val`}."""

    def __init__(self, model, val, addition_config):
        self.model, self.val = model, val
        self.digits, self.reverse = addition_config.digits, addition_config.reverse

    def __call__(self, params) -> dict:
        return {"accuracy": accuracy(self.model, params, self.val, self.digits, self.reverse)}
