"""Model weights on disk: what converters write, what ``config.init_from`` and notebooks load.

A *weights checkpoint* is an orbax checkpoint of a model's parameters and
BatchNorm statistics (``nnx.Param`` and ``nnx.BatchStat``), written by
:func:`save_weights`. :func:`load_weights` also reads a training workdir
(its latest checkpoint's model part), so a run can start from another run.
Converted checkpoints also hold ``model.json`` (preset name, classes and
constructor arguments), so :func:`load_model` rebuilds the model they fit:

    model = load_model('/ckpt/i3d_nl5_r50')                  # one call in a notebook
    model = create_model('i3d_nl5_r50', num_classes=400, rngs=nnx.Rngs(0))
    restore_weights(model, '/ckpt/i3d_nl5_r50')              # or into a model of yours
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from nonlocal_jax.models.registry import create_model

WEIGHTS = (nnx.Param, nnx.BatchStat)
# Top-level modules that form the classifier: left at their fresh init when
# a checkpoint is used for a different task (init_head=False).
HEAD_MODULES = ("head", "classifier", "aux_classifier")

Path = tuple[str, ...]
MODEL_FILE = "model.json"


def _key(path) -> Path:
  return tuple(str(p) for p in path)


def weights_of(model: nnx.Module) -> dict[Path, np.ndarray]:
  """{path: array} of the model's parameters and BN statistics."""
  return {_key(path): np.asarray(v.get_value())
          for path, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


def save_weights(model_or_weights: nnx.Module | dict[Path, np.ndarray], directory: str, *,
                 model_spec: Mapping[str, Any] | None = None) -> None:
  """Writes the weights as an orbax checkpoint (the directory must not exist yet).

  `model_spec` (``name``, ``num_classes``, ``kwargs`` of ``create_model``,
  ``drop_head``) is written beside them as ``model.json`` for :func:`load_model`.
  """
  weights = (weights_of(model_or_weights) if isinstance(model_or_weights, nnx.Module)
             else model_or_weights)
  directory = os.path.abspath(os.path.expanduser(directory))
  if os.path.exists(directory):
    raise FileExistsError(f"{directory!r} exists; refusing to overwrite it")
  tree: dict = {}
  for path, value in weights.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.asarray(value)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, tree)
  checkpointer.wait_until_finished()
  if model_spec is not None:
    with open(os.path.join(directory, MODEL_FILE), "w") as f:
      json.dump(dict(model_spec), f, indent=2)


def _flatten(tree, prefix: Path = ()) -> dict[Path, np.ndarray]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (str(k),)))
    return out
  if isinstance(tree, (list, tuple)):
    return _flatten({str(i): v for i, v in enumerate(tree)}, prefix)
  if jax.dtypes.issubdtype(getattr(tree, "dtype", np.float32), jax.dtypes.prng_key):
    return {}  # random-stream state of a training run, not a weight
  return {prefix: np.asarray(tree)}


def load_weights(path: str) -> dict[Path, np.ndarray]:
  """{path: array} from a weights checkpoint or from a training workdir's latest checkpoint."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"init_from: {path!r} does not exist")
  checkpoints = os.path.join(path, "checkpoints")
  if os.path.isdir(checkpoints):
    manager = ocp.CheckpointManager(checkpoints, item_handlers=ocp.StandardCheckpointHandler())
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"init_from: the workdir {path!r} has no checkpoint yet")
    # The (model, optimizer) state of a run.
    state = _flatten(manager.restore(step, args=ocp.args.StandardRestore(
        _on_this_process(manager.item_metadata(step)))))
    model_part = {k[1:]: v for k, v in state.items() if k[0] == "0"}
    return {k[:-1] if k[-1] == "value" else k: v for k, v in model_part.items()
            if "rngs" not in k}
  checkpointer = ocp.StandardCheckpointer()
  return _flatten(checkpointer.restore(
      path, _on_this_process(checkpointer.metadata(path).item_metadata)))


def _on_this_process(metadata: Any) -> Any:
  """A restore target for a checkpoint's array metadata: every array on this process' first
  device, whatever devices and hosts wrote it (orbax otherwise restores the saved shardings,
  which a multi-host run's checkpoint read in a notebook cannot have)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)


def restore_weights(model: nnx.Module, source: str | dict[Path, np.ndarray], *,
                    init_head: bool = True) -> list[Path]:
  """Loads weights into `model` in place; returns the paths left at their init.

  With ``init_head=False`` the classifier (``head``, ``classifier``,
  ``aux_classifier``) keeps its fresh init: fine-tuning on other classes.
  Every other weight of the model must be in the source with the same shape,
  and every weight of the source must be used (head aside); otherwise one
  ValueError lists all the problems and the model is left unchanged.
  """
  weights = load_weights(source) if isinstance(source, str) else source
  flat = dict(nnx.to_flat_state(nnx.state(model, WEIGHTS)))
  is_head = lambda path: path[0] in HEAD_MODULES
  problems, updates, skipped = [], {}, []
  for path, variable in flat.items():
    key = _key(path)
    if not init_head and is_head(key):
      skipped.append(key)
      continue
    if key not in weights:
      problems.append(f"missing in checkpoint: {'/'.join(key)} {variable.get_value().shape}")
    elif weights[key].shape != variable.get_value().shape:
      problems.append(f"shape mismatch: {'/'.join(key)} model {variable.get_value().shape} vs "
                      f"checkpoint {weights[key].shape}")
    else:
      updates[path] = variable.replace(np.asarray(weights[key], variable.get_value().dtype))
  model_keys = {_key(p) for p in flat}
  problems += [f"not in the model: {'/'.join(k)} {v.shape}" for k, v in weights.items()
               if k not in model_keys and (init_head or not is_head(k))]
  if problems:
    hint = " (set init_head=False to keep a fresh classifier)" if init_head else ""
    raise ValueError(f"{len(problems)} weights do not match{hint}:\n  " + "\n  ".join(problems))
  nnx.update(model, nnx.from_flat_state(updates))
  return skipped


def load_model(directory: str, **overrides: Any) -> nnx.Module:
  """The model a converted checkpoint fits, with its weights loaded.

  Reads ``model.json`` (written by ``python -m nonlocal_jax.convert``);
  `overrides` change constructor arguments that do not touch the weights,
  e.g. ``dtype=jnp.bfloat16`` or ``head_pool_window=(4, 7, 7)``. A
  checkpoint written without its classifier keeps a fresh one.
  """
  directory = os.path.abspath(os.path.expanduser(directory))
  spec_file = os.path.join(directory, MODEL_FILE)
  if not os.path.isfile(spec_file):
    raise FileNotFoundError(f"{spec_file!r} does not exist: load_model needs a checkpoint "
                            "written by nonlocal_jax.convert; otherwise build the model with "
                            "create_model and call restore_weights")
  with open(spec_file) as f:
    spec = json.load(f)
  model = create_model(spec["name"], num_classes=spec["num_classes"], rngs=nnx.Rngs(0),
                       **{**spec.get("kwargs", {}), **overrides})
  restore_weights(model, directory, init_head=not spec.get("drop_head", False))
  return model
