"""Train a jaxgpt model.

  python train.py --config configs/shakespeare.py --workdir runs/shakespeare \
      [--config.KEY=VALUE ...]
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxgpt import training
from jaxgpt.errors import UserError

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and the run's "
                    "config; a second run with the same workdir resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # hide JAX's backend-probing INFO lines
    try:
        training.train(flags.FLAGS.config, flags.FLAGS.workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
