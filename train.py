"""Train a jaxgpt model.

  python train.py --config configs/shakespeare.py --workdir runs/shakespeare \
      [--config.KEY=VALUE ...]
"""

from absl import flags
from ml_collections import config_flags

from jaxgpt import cli, training

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and the run's "
                    "config; a second run with the same workdir resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    training.train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
