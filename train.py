"""Train a jaxgpt model.

  python train.py --config configs/shakespeare.py [--workdir runs/shakespeare] \
      [--config.KEY=VALUE ...]

Several processes (docs/scaling.md): on a multi-host TPU VM slice nothing (the hosts find each
other); SLURM / Open MPI: --distributed; elsewhere --coordinator_address=HOST:PORT
--num_processes=N --process_id=I in each process (or JAX's JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

from absl import flags
from ml_collections import config_flags

from jaxgpt import cli, parallel, training
from jaxgpt import workdir as workdir_lib

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory or cloud URL (gs://bucket/run) for checkpoints, "
                    "metrics.jsonl, TensorBoard events and the run's config; a second run with "
                    "the same workdir resumes. Default: runs/<config file name>.")
flags.DEFINE_string("coordinator_address", "", "Multi-process runs: host:port of process 0 "
                    "(or env JAXGPT_COORDINATOR or JAX_COORDINATOR_ADDRESS); not needed on TPU "
                    "pod slices.")
flags.DEFINE_integer("num_processes", 0, "Multi-process runs: how many processes "
                     "(or env JAXGPT_NUM_PROCESSES or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", -1, "Multi-process runs: this process's id, 0..N-1 "
                     "(or env JAXGPT_PROCESS_ID or JAX_PROCESS_ID).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with no arguments: "
                  "it discovers the processes on SLURM and Open MPI (or env JAXGPT_DISTRIBUTED=1); "
                  "multi-host TPU VM slices do this without the flag.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    # before any other JAX call: every process must join before the devices are listed
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, auto=FLAGS.distributed)
    workdir = FLAGS.workdir
    if not workdir:
        workdir = workdir_lib.default(config_flags.get_config_filename(FLAGS["config"]))
        if parallel.is_main_process():
            print(f"workdir: {workdir} (run the same command again to resume; --workdir to "
                  "choose another)", flush=True)
    training.train(FLAGS.config, workdir)


if __name__ == "__main__":
    cli.run(main)
