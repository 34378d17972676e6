"""Trains and evaluates a non-local network.

    python main.py --config configs/<experiment>.py[:variant] --workdir DIR \
        [--config.some.field=value ...]

With no flags it runs the built-in default (configs/default.py) into
./workdirs/default. All logic lives in nonlocal_jax.train so it can be
imported and tested; this file only parses flags and starts JAX.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"),
    "Experiment config file, optionally with ':variant'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and final_metrics.json "
                    "(default: ./workdirs/<config name>[_<variant>]).")

flags.DEFINE_string("coordinator_address", None, "host:port of process 0, to run several "
                    "processes by hand (clusters such as Cloud TPU pods and Slurm are detected).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process' index (with --coordinator_address).")


def _is_multiprocess() -> bool:
  """True on a Cloud TPU pod slice or in a multi-task Slurm job."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def _default_workdir() -> str:
  config_arg = flags.FLAGS["config"].config_filename
  path, _, variant = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0] + (f"_{variant}" if variant else "")
  return os.path.join("workdirs", name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # imported here so --help works without starting a backend

  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif _is_multiprocess():
    jax.distributed.initialize()
  logging.info("JAX process %d / %d, local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())

  from nonlocal_jax import train

  train.train_and_evaluate(FLAGS.config, FLAGS.workdir or _default_workdir())


if __name__ == "__main__":
  app.run(main)
