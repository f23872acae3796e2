"""Sample from a trained jaxgpt workdir, or from pretrained weights with no training at all.

  python sample.py --workdir runs/shakespeare [--start TEXT|FILE:path] [--num_samples N]
      [--max_new_tokens N] [--temperature T] [--top_k K] [--top_p P] [--seed S]
      [--slide K] [--checkpoint best|latest] [--quiet]
  python sample.py --init_from gpt2-xl [...]     # or gpt2, gpt2-medium, gpt2-large, a PATH

The workdir's config.json and tokenizer.json say which model and vocabulary; the checkpoint
with the lowest val loss is used unless --checkpoint=latest. --init_from takes OpenAI's GPT-2
by name (Hugging Face cache or download), a Hugging Face GPT-2 directory or a workdir.
"""

import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags, logging

from jaxgpt import cli, pretrained, sampling
from jaxgpt.errors import UserError

flags.DEFINE_string("workdir", None, "A workdir written by train.py.")
flags.DEFINE_string("init_from", None, "Instead of --workdir: gpt2, gpt2-medium, gpt2-large, "
                    "gpt2-xl (OpenAI's weights), or a Hugging Face GPT-2 directory.")
flags.DEFINE_string("start", "\n", "Prompt text, or FILE:path to read it from a file.")
flags.DEFINE_integer("num_samples", 1, "Number of samples, drawn in parallel.")
flags.DEFINE_integer("max_new_tokens", 500, "Tokens to generate per sample.")
flags.DEFINE_float("temperature", 0.8, "1.0 = the model's distribution, < 1 sharper, 0 greedy.")
flags.DEFINE_integer("top_k", None, "Sample only among the k most likely tokens (default: all; "
                     "nanoGPT's 200 is all of a character vocabulary).")
flags.DEFINE_float("top_p", None, "Sample only within the nucleus of probability top_p.")
flags.DEFINE_integer("seed", 1337, "Random seed.")
flags.DEFINE_integer("slide", 1, "Past block_size, drop this many oldest tokens at once: 1 is "
                     "nanoGPT's exact window; larger is faster (fewer recomputations).")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Lowest val loss, or the newest.")
flags.DEFINE_bool("quiet", False, "Do not report token counts and timing on stderr.")
flags.mark_flags_as_mutual_exclusive(["workdir", "init_from"], required=True)
FLAGS = flags.FLAGS


def read_prompt(start: str) -> str:
    """nanoGPT's --start: the text itself, or FILE:path."""
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:"):]).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--start={start}: cannot read {path} ({e})") from None


def run():
    if FLAGS.num_samples <= 0:
        raise UserError(f"--num_samples={FLAGS.num_samples}: must be a positive integer")
    if FLAGS.init_from:
        run = pretrained.load(FLAGS.init_from)
    else:
        run = pretrained.load_run(FLAGS.workdir, FLAGS.checkpoint)
    model, params, tokenizer = run.model, run.params, run.tokenizer
    # every check on the user's input before anything compiles
    sampling.check_settings(model.config.vocab_size, FLAGS.max_new_tokens, FLAGS.temperature,
                            FLAGS.top_k, FLAGS.top_p, FLAGS.slide, model.config.block_size)
    prompt = read_prompt(FLAGS.start)
    if not prompt:
        raise UserError("--start is empty: give at least one character (the default is a newline)")
    ids = tokenizer.encode(prompt)

    compile_s = sampling.warmup(model, params, FLAGS.num_samples)
    idx = np.tile(np.asarray(ids, np.int32)[None], (FLAGS.num_samples, 1))  # (B, T)
    start = time.perf_counter()
    chunks = sampling.generate_chunks(
        model, params, idx, FLAGS.max_new_tokens, rng=jax.random.PRNGKey(FLAGS.seed),
        temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, slide=FLAGS.slide)
    if FLAGS.num_samples == 1:  # stream: print each chunk as it arrives
        sys.stdout.write(prompt)
        for toks in chunks:
            sys.stdout.write(tokenizer.decode(toks[0]))
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        new = np.concatenate(list(chunks), axis=1)  # (B, max_new_tokens)
        for row in new:
            print(prompt + tokenizer.decode(row))
            print("---------------")
    seconds = time.perf_counter() - start
    sys.stdout.flush()
    if not FLAGS.quiet:
        n = FLAGS.num_samples * FLAGS.max_new_tokens
        print(f"checkpoint step {run.step}: {n} tokens in {seconds:.2f} s, {n / seconds:.1f} "
              f"tokens/s (compile {compile_s:.2f} s, not included)", file=sys.stderr)


def main(argv):
    del argv  # cli.parse_flags rejects extra arguments
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # hide orbax's read-only notices
    run()


if __name__ == "__main__":
    cli.run(main)
