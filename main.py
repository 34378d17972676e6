"""Trains and evaluates a non-local network.

    python main.py --config configs/<experiment>.py[:variant] --workdir DIR \
        [--config.some.field=value ...]

With no flags it runs the built-in default (configs/default.py) into
./workdirs/default. All logic lives in nonlocal_jax.train so it can be
imported and tested; this file only parses flags and starts JAX.

Exit codes: 0 done; 1 an error (the message names it); 75 stopped by SIGTERM
after saving a checkpoint (run the same command again to resume; schedulers
can requeue on it).
"""

import os
import sys

# TensorFlow's C++ start-up lines out of the default log. TensorFlow only reads the data
# sets' metadata here (the input pipeline is numpy), so its oneDNN kernels are not needed; the
# notice about them is printed before any log level applies.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import ml_collections
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


def _load_config() -> ml_collections.ConfigDict:
  """The parsed --config, or exit with one message naming the file and the configs that exist.

  config_flags defers a loading error to the first use of the config.
  """
  config = FLAGS.config
  try:
    config.keys()
  except (OSError, ImportError, AttributeError, ValueError) as e:
    configs = sorted(f for f in os.listdir(os.path.join(_HERE, "configs"))
                     if f.endswith(".py") and f not in ("__init__.py", "common.py"))
    sys.exit(f"error: cannot load --config={FLAGS['config'].config_filename}: "
             f"{str(e).strip().splitlines()[-1].strip()}\n"
             f"Configs in {os.path.join(_HERE, 'configs')}: {', '.join(configs)}")
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _load_config()
  import jax  # imported here so --help works without starting a backend

  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif _is_multiprocess():
    jax.distributed.initialize()
  logging.info("JAX process %d / %d, local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())

  from nonlocal_jax import progress, train

  progress.quiet_library_logs()
  try:
    final = train.train_and_evaluate(config, FLAGS.workdir or _default_workdir())
  except train.Preempted as e:
    logging.warning("%s", e)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  if jax.process_index() == 0:
    print(progress.metrics_table(final), flush=True)


if __name__ == "__main__":
  app.run(main)
