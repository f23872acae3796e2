"""HellaSwag, scored as build-nanogpt's hellaswag.py does: which of 4 endings the model finds
most likely after the context.

  python -m jaxgpt.hellaswag (--workdir W | --init_from gpt2) [--data PATH] [--limit N]
      [--batch_size B] [--checkpoint best|latest|STEP]

Each example is rendered as build-nanogpt's `render_example`: 4 rows of context tokens followed
by one ending's tokens (encoded as " " + ending), and a mask over the ending's tokens. The loss
of an ending is the cross-entropy of its tokens given everything before them: `acc` picks the
ending of lowest summed loss, `acc_norm` the lowest mean loss per token (build-nanogpt's figure).

The rows are padded to one length for the whole file (its longest row, at most block_size; a
longer context loses its oldest tokens, the 4 rows the same ones) and the examples go through
one compiled call in batches of fixed size, the last padded, the batch sharded over every
device. The file is the JSONL of rowanz/hellaswag ("ctx", "endings", "label"): --data, else
the validation split downloaded once into ~/.cache/jaxgpt/hellaswag/. In training,
`config.hellaswag_path` scores a file at every eval (`during_training`).
"""

import functools
import json
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from jaxgpt import cli, parallel, pretrained
from jaxgpt import config as config_lib
from jaxgpt import data as data_lib
from jaxgpt.errors import UserError
from jaxgpt.workdir import as_path

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
ENDINGS = 4  # candidate endings per example
PAD_TO = 32  # the row length is rounded up to a multiple of this (at most block_size)


class Example(NamedTuple):
    ctx: str
    endings: list[str]
    label: int
    where: str  # "file:line", for errors


def _parse(line: str, where: str) -> Example:
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(d, dict):
        raise UserError(f"{where}: not a JSON object with \"ctx\", \"endings\" and \"label\"")
    ctx, endings, label = d.get("ctx"), d.get("endings"), d.get("label")
    if not isinstance(ctx, str) or not ctx:
        raise UserError(f"{where}: \"ctx\" must be a non-empty string (got {ctx!r:.40})")
    if not (isinstance(endings, list) and len(endings) == ENDINGS
            and all(isinstance(e, str) for e in endings)):
        raise UserError(f"{where}: \"endings\" must be a list of {ENDINGS} strings "
                        f"(got {endings!r:.60})")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < ENDINGS:
        raise UserError(f"{where}: \"label\" must be 0, 1, 2 or 3 (got {label!r}; the test "
                        "split has no labels: score the validation split)")
    return Example(ctx, endings, label, where)


def read_examples(path, limit: int = 0) -> list[Example]:
    """The examples of a HellaSwag JSONL file (local or gs://), the first `limit` if > 0."""
    file = as_path(path)
    if not file.is_file():
        raise UserError(f"{path}: no such file; pass a HellaSwag JSONL file (hellaswag_val.jsonl "
                        f"of rowanz/hellaswag)")
    examples = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            examples.append(_parse(line, f"{path}:{n}"))
        if limit and len(examples) == limit:
            break
    if not examples:
        raise UserError(f"{path}: no examples in the file")
    return examples


# ---------------------------------------------------------------------------------------------
# Rendering: tokens and masks


def encode(example: Example, tokenizer) -> tuple[list[int], list[list[int]]]:
    """(context ids, the 4 endings' ids), each ending encoded with its leading space."""
    try:
        return (tokenizer.encode(example.ctx),
                [tokenizer.encode(" " + e) for e in example.endings])
    except UserError as e:  # a char-level vocabulary that lacks some of the text's characters
        raise UserError(f"{example.where}: {e}; a character-level model scores HellaSwag only "
                        "if its vocabulary covers the text (train it with "
                        "--config.vocab_path=<the HellaSwag file>)") from None


def row_length(encoded, block_size: int) -> int:
    """One length for every row: the longest context + ending, rounded up, at most block_size."""
    longest = max(len(ctx) + max(map(len, ends)) for ctx, ends in encoded)
    return min(block_size, -(-longest // PAD_TO) * PAD_TO)


def render(ctx: list[int], ends: list[list[int]], T: int):
    """-> tokens (4, T) int32, mask (4, T) bool over each ending's tokens (build-nanogpt's
    render_example, padded to T). Too long: the context keeps its last tokens, the same for the
    4 rows (at least one: the first ending token is predicted from it); an ending longer than
    the rest of the row is cut."""
    keep = max(1, T - max(map(len, ends)))
    ctx = ctx[-keep:]
    tokens = np.zeros((ENDINGS, T), np.int32)  # (4, T)
    mask = np.zeros((ENDINGS, T), bool)  # (4, T)
    for i, end in enumerate(ends):
        row = (ctx + end)[:T]
        tokens[i, :len(row)] = row
        mask[i, len(ctx):len(row)] = True
    return tokens, mask


# ---------------------------------------------------------------------------------------------
# Scoring: one compiled call per batch


def completion_losses(apply_fn, params, tokens, mask):
    """tokens, mask (B, 4, T) -> (summed, mean) loss of each ending's tokens, (B, 4) each."""
    B, E, T = tokens.shape
    rows = tokens.reshape(B * E, T)  # (B*4, T)
    logits = apply_fn({"params": params}, rows)  # (B*4, T, V) float32
    # position t predicts token t+1: the mask moves one to the left (build-nanogpt's shift)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], rows[:, 1:])
    scored = mask.reshape(B * E, T)[:, 1:]  # (B*4, T-1)
    total = jnp.where(scored, losses, 0.0).sum(-1)  # (B*4,)
    mean = total / jnp.maximum(scored.sum(-1), 1)  # padding rows have no tokens
    return total.reshape(B, E), mean.reshape(B, E)


class Scorer:
    """The examples rendered once with the model's tokenizer; `scorer(params)` -> the
    accuracies. One compiled function of one shape serves every batch and every eval."""

    def __init__(self, model, tokenizer, examples: list[Example], batch_size: int, mesh):
        encoded = [encode(ex, tokenizer) for ex in examples]
        T = row_length(encoded, model.config.block_size)
        rendered = [render(ctx, ends, T) for ctx, ends in encoded]
        self.tokens = np.stack([t for t, _ in rendered])  # (N, 4, T)
        self.mask = np.stack([m for _, m in rendered])  # (N, 4, T)
        self.labels = np.array([ex.label for ex in examples])  # (N,)
        n = parallel.data_parallel_size(mesh)
        self.batch_size = -(-batch_size // n) * n  # a multiple of the devices: one row each
        self.sharding = parallel.batch_sharding(mesh)
        self.shape = (self.batch_size, ENDINGS, T)
        self.rows = parallel.local_rows(self.sharding, self.shape, 0)  # this process's part
        score = functools.partial(completion_losses, model.apply)
        self.score = jax.jit(parallel.traced_in(mesh, score),  # the kernels see the mesh
                             out_shardings=parallel.replicated(mesh))

    def _put(self, array, start: int) -> jax.Array:
        batch = np.zeros(self.shape, array.dtype)  # (B, 4, T) the last batch zero-padded
        part = array[start:start + self.batch_size]
        batch[:len(part)] = part
        return parallel.put_process_local(batch[self.rows], self.sharding, self.shape)

    def losses(self, params, progress=None):
        """(summed, mean) loss of every ending, (N, 4) each. `progress(done, total)` after
        each batch is dispatched."""
        N = len(self.labels)
        starts = range(0, N, self.batch_size)
        out = []
        for i, start in enumerate(starts):  # dispatched without waiting: read back at the end
            out.append(self.score(params, self._put(self.tokens, start),
                                  self._put(self.mask, start)))
            if progress:
                progress(i + 1, len(starts))
        total, mean = (np.concatenate([np.asarray(o[k]) for o in out])[:N] for k in (0, 1))
        return total, mean  # (N, 4) each

    def __call__(self, params, progress=None) -> dict:
        total, mean = self.losses(params, progress)
        return {"hellaswag_acc": float(np.mean(total.argmin(-1) == self.labels)),
                "hellaswag_acc_norm": float(np.mean(mean.argmin(-1) == self.labels)),
                "hellaswag_n": len(self.labels)}


def during_training(config, model, tokenizer, mesh):
    """config.hellaswag_path as a measure at every eval of a run (training.eval_measures):
    (params) -> {hellaswag_acc, hellaswag_acc_norm}. The file is read and rendered here, once
    per run; each batch is a quarter of batch_size examples (4 rows each)."""
    examples = read_examples(config.hellaswag_path, config.hellaswag_limit)
    scorer = Scorer(model, tokenizer, examples, max(1, config.batch_size // ENDINGS), mesh)

    def measure(params) -> dict:
        result = scorer(params)
        return {k: result[k] for k in ("hellaswag_acc", "hellaswag_acc_norm")}

    return measure


# ---------------------------------------------------------------------------------------------
# The command line


def data_file(data: str | None):
    """--data, else the validation split in jaxgpt's cache (downloaded the first time)."""
    if data:
        return data
    path = data_lib.cache_dir(config_lib.base_config()) / "hellaswag" / "hellaswag_val.jsonl"
    if not path.is_file():
        print(f"downloading {URL} to {path}", file=sys.stderr, flush=True)
        data_lib.download(URL, path, instead="pass a local copy with --data=PATH")
    return path


def load_model(workdir: str | None, init_from: str | None, which: str):
    if init_from:
        return pretrained.load(init_from)
    return pretrained.load_run(workdir, which)


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A workdir written by train.py.")
    flags.DEFINE_string("init_from", None, "Instead of --workdir: gpt2, gpt2-medium, gpt2-large, "
                        "gpt2-xl (OpenAI's weights), a Hugging Face GPT-2 directory or a workdir.")
    flags.DEFINE_string("data", None, "A HellaSwag JSONL file (default: the validation split, "
                        "downloaded once into ~/.cache/jaxgpt/hellaswag/).")
    flags.DEFINE_integer("limit", 0, "Score only the first N examples (0: all).")
    flags.DEFINE_integer("batch_size", 8, "Examples per compiled call (4 rows each).")
    flags.DEFINE_string("checkpoint", "best", "--workdir's checkpoint: best | latest | a step.")
    flags.mark_flags_as_mutual_exclusive(["workdir", "init_from"], required=True)


def main(argv):
    del argv  # cli.parse_flags rejects extra arguments
    f = flags.FLAGS
    if f.limit < 0 or f.batch_size <= 0:
        raise UserError("--limit must be >= 0 and --batch_size a positive integer")
    path = data_file(f.data)
    examples = read_examples(path, f.limit)  # a bad file fails before the model loads
    run = load_model(f.workdir, f.init_from, f.checkpoint)
    mesh = parallel.make_mesh(config_lib.base_config())  # every device on the batch axis
    params = jax.device_put(run.params, parallel.replicated(mesh))
    scorer = Scorer(run.model, run.tokenizer, examples, f.batch_size, mesh)
    start = time.perf_counter()
    result = scorer(params)
    seconds = time.perf_counter() - start
    # build-nanogpt's figures: "10042 acc: 0.2859 acc_norm: 0.2955"
    print(f"{result['hellaswag_n']} acc: {result['hellaswag_acc']:.4f} "
          f"acc_norm: {result['hellaswag_acc_norm']:.4f}")
    print(f"{path}, checkpoint step {run.step}: {seconds:.1f} s (compilation included)",
          file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
