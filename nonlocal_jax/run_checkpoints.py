"""Checkpoints of a training run: what a workdir holds, a finite state, a resume that survives damage.

A workdir's ``checkpoints/`` holds orbax checkpoints of the whole train state
(model, optimizer) at integer steps, and ``run_spec.json`` beside them names
the model they fit. Resuming:

* a workdir written for another model is refused before anything is built,
  naming both models (orbax would dump its tree diff otherwise);
* a newest checkpoint that cannot be read (a truncated or missing file after
  a crash mid-copy) is moved to ``damaged_checkpoints/`` and the newest
  readable one is used instead, with a warning naming the skipped step.

Every save is preceded by :func:`nonfinite_arrays`, so a checkpoint never
holds NaN or Inf (parameters, BN statistics, optimizer state).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

RUN_SPEC_FILE = "run_spec.json"
CHECKPOINTS_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"


def run_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What fixes the shapes of a run's state: model preset, its arguments, classes."""
  return {"model": config.model.name, "model_kwargs": config.model.kwargs.to_dict(),
          "num_classes": config.num_classes}


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


def check_run_spec(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir whose checkpoints were written for another model; records ours otherwise."""
  path = os.path.join(workdir, RUN_SPEC_FILE)
  ours = _jsonable(run_spec(config))
  if os.path.exists(path):
    with open(path) as f:
      theirs = json.load(f)
    if theirs != ours:
      changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
      diff = "; ".join(f"{k}: workdir {theirs.get(k)!r}, config {ours.get(k)!r}" for k in changed)
      raise ValueError(
          f"workdir {workdir!r} holds checkpoints of another model ({diff}). Resume it with the "
          "config that wrote it, pass another --workdir for this config, or start from its "
          "weights with --config.init_from=<that workdir> and a new --workdir.")
    return
  has_checkpoints = os.path.isdir(os.path.join(workdir, CHECKPOINTS_DIR)) and any(
      name.isdigit() for name in os.listdir(os.path.join(workdir, CHECKPOINTS_DIR)))
  if has_checkpoints:
    logging.warning("Workdir %s has checkpoints but no %s (written before it existed); resuming "
                    "assumes they fit this config.", workdir, RUN_SPEC_FILE)
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(ours, f, indent=1)


def create_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(workdir, CHECKPOINTS_DIR),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.keep_checkpoints, save_interval_steps=config.checkpoint_every_steps,
          enable_async_checkpointing=True))


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def restore_latest(manager: ocp.CheckpointManager, state: Any, workdir: str) -> tuple[Any, int]:
  """(restored state, step) from the newest readable checkpoint; (state, 0) if there is none.

  Unreadable newer checkpoints are moved to ``<workdir>/damaged_checkpoints``
  (not deleted) with a warning naming each step and its error. If none can
  be read, a RuntimeError lists every step's error and nothing is moved.
  """
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(state))
    except Exception as e:  # orbax / tensorstore raise many kinds for a damaged file
      failures.append((step, e))
      continue
    _set_aside(manager, workdir, failures)
    return restored, step
  if failures:
    listing = "\n  ".join(f"step {s}: {_first_line(e)}" for s, e in failures)
    raise RuntimeError(f"no checkpoint in {manager.directory} could be restored:\n  {listing}\n"
                       "Move the checkpoints directory away to start over.") from failures[0][1]
  return state, 0


def _set_aside(manager: ocp.CheckpointManager, workdir: str,
               failures: list[tuple[int, Exception]]) -> None:
  if not failures:
    return
  damaged = os.path.join(workdir, DAMAGED_DIR)
  for step, error in failures:
    target = os.path.join(damaged, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    logging.warning("Checkpoint step %d in %s cannot be read (%s); resuming from an earlier step. "
                    "It is kept in %s.", step, manager.directory, _first_line(error), target)
    if jax.process_index() == 0:
      os.makedirs(damaged, exist_ok=True)
      shutil.move(os.path.join(str(manager.directory), str(step)), target)
  multihost_utils.sync_global_devices("damaged checkpoints set aside")
  manager.reload()


@jax.jit
def _leaf_is_finite(state: Any) -> Any:
  return jax.tree.map(
      lambda x: jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True),
      state)


def nonfinite_arrays(state: Any) -> list[str]:
  """Paths of the state's arrays holding a NaN or Inf (one reduction per array, on device)."""
  flags = jax.device_get(_leaf_is_finite(state))
  return [jax.tree_util.keystr(path) for path, ok in jax.tree_util.tree_leaves_with_path(flags)
          if not ok]
