"""The lecture's exercise 2: a GPT that adds. Problems `a+b=c` of `digits`-digit numbers.

Every problem is one fixed-length sequence: a and b zero-padded to `digits` digits, c to
`digits + 1` (its carry), optionally written least significant digit first (`reverse`: the
order in which a carry is computed). "03+45=048" (or "03+45=840" reversed): the model reads
x = seq[:-1] and learns y = seq[1:], with the targets over `a+b=` set to -1, which the loss
ignores: only c is predicted (the problem itself is random, nothing to learn).

The problems are split once (from the run's seed): `eval_problems` of them are held out, never
trained on. `AdditionBatches` draws problems on the device like data.DeviceBatches draws text
windows, so the same compiled train step serves both; `accuracy` decodes c greedily with
jaxgpt.sampling for every held-out problem, reported at each eval.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import parallel, sampling
from jaxgpt.errors import UserError
from jaxgpt.tokenizer import CharTokenizer

CHARS = "0123456789+="  # token id of digit d is d
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


class AdditionBatches:
    """The batch source of the addition task (data.batches uses it): (A, B, L-1) problems per
    step drawn uniformly from the training problems on the device; eval batches from the
    held-out ones."""

    def __init__(self, dataset, config, mesh):
        self.splits = {"train": parallel.put_replicated(dataset.train, mesh),
                       "val": parallel.put_replicated(dataset.val, mesh)}
        self.accum, self.batch_size = config.gradient_accumulation_steps, config.batch_size
        self.digits, self.reverse = config.addition.digits, config.addition.reverse
        self.mesh, self.eval_iters = mesh, config.eval_iters

    def train_data(self, step: int, n: int):
        return self.splits["train"]

    def eval_data(self, split: str, key):
        return self.splits[split]

    def _draw(self, ids, key, shape):
        pick = jax.random.randint(key, shape, 0, ids.shape[0])  # (*shape,)
        x, y = inputs_targets(encode(ids[pick], self.digits, self.reverse), self.digits)
        sharding = parallel.batch_sharding(self.mesh, leading=len(shape) - 1)
        return tuple(jax.lax.with_sharding_constraint(t, sharding) for t in (x, y))

    def train_batch(self, data, i, key):
        return self._draw(data, key, (self.accum, self.batch_size))  # (A, B, L-1) each

    def eval_batch(self, data, i, key):
        return self._draw(data, key, (self.batch_size,))  # (B, L-1) each

    def close(self):
        pass


def accuracy(model, params, ids, n_digits: int, reverse: bool) -> float:
    """Exact-match accuracy: the fraction of problems `ids` whose c, decoded greedily after
    the prompt `a+b=`, is right in every digit."""
    seq = np.asarray(encode(jnp.asarray(ids), n_digits, reverse))  # (N, L)
    prompt, want = seq[:, :2 * n_digits + 2], seq[:, 2 * n_digits + 2:]  # `a+b=`, c
    got = np.concatenate(list(sampling.generate_chunks(
        model, params, prompt, n_digits + 1, rng=jax.random.PRNGKey(0), temperature=0.0,
        chunk=n_digits + 1)), axis=1)  # (N, digits+1)
    return float(np.mean(np.all(got == want, axis=1)))


def load(config):
    """The task as a data.Dataset: problem ids per split, the 12-character tokenizer, the batch
    source and the accuracy evaluation."""
    from jaxgpt.data import Dataset  # data.py dispatches here

    a = config.addition
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

    def evaluate(model, params):
        return {"accuracy": accuracy(model, params, val, a.digits, a.reverse)}

    return Dataset(train=train, val=val, tokenizer=CharTokenizer(CHARS),
                   batch_source=AdditionBatches, evaluate=evaluate)
