"""Reading checkpoint files of other frameworks without executing arbitrary code.

* Caffe2 model-zoo ``.pkl`` files (Python-2 pickles of ``{'blobs': {name:
  ndarray}}``) go through an unpickler that admits only numpy arrays, numpy
  scalars, dtypes and plain containers: a pickle naming any other class or
  function is refused before anything of it runs.
* PyTorch files (PySlowFast ``.pyth``, torchvision ``.pth``, mmsegmentation
  ``.pth``) go through ``torch.load(weights_only=True)``, with the same numpy
  types admitted (mmengine stores numpy scalars in its metadata). torch is
  imported only here and only when such a file is read.

Both return ``{source key: numpy array}``.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Mapping

import numpy as np

# (module, name) a Caffe2 pickle may reference: array reconstruction and dtypes.
# Python-2 era files name numpy.core; numpy 2 moved it to numpy._core.
_NUMPY_GLOBALS = (
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
)
# Protocol-2 pickles written by Python 3 encode bytes as _codecs.encode(str, 'latin1').
_PICKLE_GLOBALS = _NUMPY_GLOBALS + (("_codecs", "encode"),)
# Where trainers nest the state dict inside a checkpoint.
_TORCH_CONTAINERS = ("model_state", "state_dict", "model")


def _resolve(module: str, name: str):
  try:
    return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
  except ModuleNotFoundError:  # numpy 1.x
    return getattr(importlib.import_module(module), name)


class _ArraysOnlyUnpickler(pickle.Unpickler):
  """An unpickler that builds numpy arrays and containers and nothing else."""

  def __init__(self, file, path: str):
    super().__init__(file, encoding="latin1")
    self._path = path

  def find_class(self, module: str, name: str):
    if (module, name) not in _PICKLE_GLOBALS:
      allowed = ", ".join(f"{m}.{n}" for m, n in _PICKLE_GLOBALS)
      raise pickle.UnpicklingError(
          f"{self._path}: refusing to load {module}.{name}; a Caffe2 checkpoint holds only "
          f"numpy arrays and plain containers (admitted: {allowed})")
    return _resolve(module, name)


def _check_exists(path: str) -> str:
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
  return path


def read_caffe2_blobs(path: str) -> dict[str, np.ndarray]:
  """The arrays of a Caffe2 ``.pkl`` checkpoint (``{'blobs': {...}}`` or a flat dict)."""
  path = _check_exists(path)
  with open(path, "rb") as f:
    content = _ArraysOnlyUnpickler(f, path).load()
  blobs = content.get("blobs", content) if isinstance(content, Mapping) else None
  if not isinstance(blobs, Mapping):
    raise ValueError(f"{path}: expected a pickled dict with a 'blobs' dict of arrays, got "
                     f"{type(content).__name__}")
  return {str(k): v for k, v in blobs.items() if isinstance(v, np.ndarray)}


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch checkpoint, as numpy arrays.

  Accepts a bare state dict or one nested under ``model_state``
  (PySlowFast), ``state_dict`` (mmengine / mmsegmentation) or ``model``; a
  ``module.`` prefix (DataParallel) is removed.
  """
  path = _check_exists(path)
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading the PyTorch checkpoint {path!r} needs torch "
                      "(pip install torch); the rest of nonlocal_jax does not") from e
  try:
    with torch.serialization.safe_globals([_resolve(m, n) for m, n in _NUMPY_GLOBALS]):
      content = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise pickle.UnpicklingError(
        f"{path}: torch.load(weights_only=True) refused the file, which holds objects other "
        f"than tensors, numpy arrays and plain containers; we do not run arbitrary pickles. "
        f"Re-save just the state dict (torch.save(model.state_dict(), ...)). Details: {e}") from e
  for key in _TORCH_CONTAINERS:
    if isinstance(content, Mapping) and isinstance(content.get(key), Mapping):
      content = content[key]
      break
  if not isinstance(content, Mapping) or not any(
      isinstance(v, torch.Tensor) for v in content.values()):
    raise ValueError(f"{path}: no state dict found; expected tensors at the top level or under "
                     f"one of {_TORCH_CONTAINERS}")
  state = {str(k): v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
           for k, v in content.items() if isinstance(v, torch.Tensor)}
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state
