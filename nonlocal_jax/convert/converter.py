"""Published weights -> our models: name mapping, layout changes, checks.

Layouts (spec 5.5): convolutions (O, I, *k) become (*k, I, O); linear and
1x1x1 projections (O, I[, 1, 1, 1]) become (I, O); a 2D kernel loaded into a
3D convolution is inflated (repeated over the T taps of our kernel and divided
by T, as the paper initialises its video models from ImageNet). BN scale,
bias, running mean and running variance keep their values (epsilon 1e-5 on
both sides; the official non-local BN's 1.0000001e-5 differs by 1e-12).

What changes numbers without changing weights is set on the model, per
source, and recorded with the checkpoint (``model.json``):

* ``pyslowfast``: max pool 1 padding (0, 1, 1) (``stem_pool_padding='pyslowfast'``);
* ``caffe2``: padding 0 (the official code); checkpoints holding only
  ``*_bn_s`` / ``*_bn_b`` (frozen-BN "affine" runs, BN folded into scale and
  bias) load into ``norm='affine'`` models whose non-local blocks have no
  BN (``final_norm='none'``) and, in res3, attend within groups of 4 frames
  (``add_nonlocal_group``);
* both: pooling before phi/g and the 1/sqrt(d) scale are our defaults.
  PySlowFast's head returns softmax probabilities in eval mode (averaged over
  positions when fully convolutional); ours returns logits, or with
  ``head_pool_window`` the log of that average: softmax(ours) = theirs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from nonlocal_jax import checkpoints
from nonlocal_jax.convert.names import KEY_FUNCTIONS, Path
from nonlocal_jax.detection.layers import ConvTranspose2d
from nonlocal_jax.models.resnet_layers import FrozenAffine
from nonlocal_jax.models.registry import create_model, get_spec
from nonlocal_jax.models.video_resnet import VideoResNet

SOURCES = tuple(KEY_FUNCTIONS)
# Entries of the files that are not weights: BN batch counters (PyTorch),
# optimizer momenta, iteration and learning rate (Caffe2).
_BOOKKEEPING_SUFFIXES = ("num_batches_tracked", "_momentum")
_BOOKKEEPING_KEYS = ("model_iter", "lr")


@dataclasses.dataclass
class Conversion:
  """The converted weights and how to build the model they fit.

  Attributes:
    weights: {our path: array}, what :func:`checkpoints.save_weights` writes.
    model_name: registry preset.
    model_kwargs: constructor overrides the weights need (pool padding, norm).
    num_classes: classifier outputs of the model.
    fresh: our weights with no counterpart in the source, left at their
      initialisation (new non-local blocks).
    dropped: source keys not converted (the classifier with ``drop_head``).
  """
  weights: dict[Path, np.ndarray]
  model_name: str
  model_kwargs: dict[str, Any]
  num_classes: int
  fresh: list[Path]
  dropped: list[str]


def is_frozen_bn(source: str, weights: Mapping[str, np.ndarray]) -> bool:
  """A Caffe2 checkpoint of a frozen-BN run: BN scales without running statistics."""
  return source == "caffe2" and any(k.endswith("_bn_s") for k in weights) and not any(
      k.endswith("_bn_rm") for k in weights)


def source_model_kwargs(source: str, model_name: str,
                        weights: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The model settings that reproduce `source`'s numerics (see the module docstring)."""
  if get_spec(model_name).constructor is not VideoResNet:
    return {}
  if source == "pyslowfast":
    return {"stem_pool_padding": "pyslowfast"}
  if source != "caffe2":
    return {}
  kwargs: dict[str, Any] = {"stem_pool_padding": "caffe2"}
  if is_frozen_bn(source, weights):
    kwargs.update(norm="affine", nonlocal_options={"final_norm": "none"},
                  nonlocal_stage_options=({}, {"temporal_group_size": 4}, {}, {}))
  return kwargs


def to_our_layout(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
  """`value` in the source layout -> our layout for a weight of `shape`; None if it cannot fit."""
  rank = len(shape)
  if rank >= 3 and value.ndim == 2 and value.shape[1] == int(np.prod(shape[:-1])):
    # A linear layer over a flattened (C, *k) map (torchvision's box head fc6 on
    # (C, 7, 7) RoI features) is a 'valid' convolution with kernel (*k, C, O).
    value = value.reshape(value.shape[0], shape[-2], *shape[:-2])
  if rank == 1:
    out = value
  elif rank == 2:  # linear / 1x1x1 projection: (O, I, 1, ...) -> (I, O)
    if value.ndim < 2 or any(d != 1 for d in value.shape[2:]):
      return None
    out = value.reshape(value.shape[:2]).T
  elif value.ndim == rank:  # convolution (O, I, *k) -> (*k, I, O)
    out = value.transpose(*range(2, rank), 1, 0)
  elif value.ndim == rank - 1 and rank == 5:  # 2D kernel into a 3D convolution: inflate
    taps = shape[0]
    out = np.repeat(value.transpose(2, 3, 1, 0)[None], taps, axis=0) / taps
  else:
    return None
  return out if out.shape == tuple(shape) else None


# Keys of torchvision files written before its modules were renamed -> current keys
# (what FeaturePyramidNetwork, RPNHead and MaskRCNNHeads ``_load_from_state_dict`` do).
_LEGACY_TORCHVISION_KEYS = (
    (re.compile(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(weight|bias)$"),
     r"backbone.fpn.\1_blocks.\2.0.\3"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"),
     lambda m: f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"),
)


def modern_torchvision_keys(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`weights` with keys of older torchvision detection files renamed to the current ones."""
  out = {}
  for key, value in weights.items():
    for pattern, replacement in _LEGACY_TORCHVISION_KEYS:
      key = pattern.sub(replacement, key)
    out[key] = value
  return out


def fold_frozen_batch_norms(weights: Mapping[str, np.ndarray], model: nnx.Module,
                            key_of, epsilon: float) -> dict[str, np.ndarray]:
  """BN weight, bias, running mean and variance -> the scale and bias of our FrozenAffine norms.

  scale = weight / sqrt(var + epsilon), bias = bias - mean * scale, as
  torchvision's ``FrozenBatchNorm2d`` computes them; only for the norms of
  `model` that are :class:`FrozenAffine` and whose source has running statistics.
  """
  out = dict(weights)
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, FrozenAffine):
      continue
    path = tuple(map(str, path))
    scale_key, bias_key = key_of((*path, "scale")), key_of((*path, "bias"))
    if scale_key is None or not scale_key.endswith(".weight"):
      continue
    prefix = scale_key.removesuffix("weight")
    if prefix + "running_mean" not in out:
      continue
    mean, var = out.pop(prefix + "running_mean"), out.pop(prefix + "running_var")
    scale = np.asarray(out[scale_key]) / np.sqrt(np.asarray(var) + epsilon)
    out[bias_key] = np.asarray(out[bias_key]) - np.asarray(mean) * scale
    out[scale_key] = scale
  return out


def _is_bookkeeping(key: str) -> bool:
  return key in _BOOKKEEPING_KEYS or key.endswith(_BOOKKEEPING_SUFFIXES)


def _is_nonlocal(path: Path) -> bool:
  return "nonlocal_blocks" in path or path[0] == "nonlocal_block"


def _source_num_classes(source: str, weights: Mapping[str, np.ndarray]) -> int | None:
  key_of = KEY_FUNCTIONS[source]
  for path in (("head", "projection", "bias"), ("classifier", "conv", "bias"),
               ("box_head", "scores", "bias")):
    key = key_of(path)
    if key in weights:
      return int(np.asarray(weights[key]).shape[0])
  return None


def convert(source: str, weights: Mapping[str, np.ndarray], model_name: str, *,
            model_kwargs: Mapping[str, Any] | None = None, num_classes: int | None = None,
            drop_head: bool = False, fresh_nonlocal: bool = False, seed: int = 0,
            bn_epsilon: float | None = None) -> Conversion:
  """Maps a source state dict / blob dict onto the preset `model_name`.

  Args:
    source: one of :data:`SOURCES`.
    weights: {source key: array}, from :mod:`nonlocal_jax.convert.readers`.
    model_name: registry preset, e.g. ``'i3d_nl5_r50'``.
    model_kwargs: constructor overrides on top of the source's settings
      (:func:`source_model_kwargs`), e.g. non-local placement.
    num_classes: classifier outputs; default: the source classifier's.
    drop_head: leave out the classifier (fine-tuning on other classes; load
      with ``init_head=False``).
    fresh_nonlocal: non-local blocks absent from the source keep their
      initialisation (ImageNet weights into an NL model, as the paper does)
      instead of being an error.
    seed: initialisation of those fresh blocks.
    bn_epsilon: epsilon of BatchNorms folded into ``norm='affine'`` layers
      (torchvision sources). Default: 0 for torchvision detector files (its
      COCO weights are used with ``FrozenBatchNorm2d(eps=0)``, torchvision's
      ``overwrite_eps``), 1e-5 otherwise (ImageNet classifiers).

  Raises:
    ValueError: listing every missing, mis-shaped and unused weight at once.
  """
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
  if source == "torchvision":
    weights = modern_torchvision_keys(weights)
  kwargs = {**source_model_kwargs(source, model_name, weights), **(model_kwargs or {})}
  if num_classes is None:
    num_classes = _source_num_classes(source, weights)
  if num_classes is None:
    if not drop_head:
      raise ValueError(f"the {source} checkpoint has no classifier; pass drop_head=True "
                       "(--drop_head) or num_classes")
    num_classes = 1
  model = create_model(model_name, num_classes=num_classes, rngs=nnx.Rngs(seed), **kwargs)
  key_of = KEY_FUNCTIONS[source]
  if bn_epsilon is None:
    bn_epsilon = 0.0 if any(k.startswith("roi_heads.") for k in weights) else 1e-5
  weights = fold_frozen_batch_norms(weights, model, key_of, bn_epsilon)
  # PyTorch's transposed convolutions store (I, O, k, k): swap to the (O, I, k, k) of a convolution.
  transposed = {(*map(str, path), "kernel") for path, module in nnx.iter_modules(model)
                if isinstance(module, ConvTranspose2d)}

  initial = checkpoints.weights_of(model)
  converted, fresh, used, problems = {}, [], set(), []
  for path, init in initial.items():
    name = "/".join(path)
    if drop_head and path[0] in checkpoints.HEAD_MODULES:
      continue
    key = key_of(path)
    if key is None or key not in weights:
      if fresh_nonlocal and _is_nonlocal(path):
        converted[path] = init
        fresh.append(path)
      else:
        problems.append(f"missing: {name} {init.shape}" + (f" (expected {key!r})" if key else
                                                            f" (no {source} counterpart)"))
      continue
    used.add(key)
    source_value = np.asarray(weights[key])
    if path in transposed:
      source_value = source_value.swapaxes(0, 1)
    value = to_our_layout(source_value, init.shape)
    if value is None:
      problems.append(f"shape mismatch: {name} {init.shape} vs {key!r} "
                      f"{np.asarray(weights[key]).shape}")
    else:
      converted[path] = value
  head_keys = {key_of(p) for p in initial if p[0] in checkpoints.HEAD_MODULES}
  dropped = sorted(k for k in weights if drop_head and k in head_keys)
  unused = sorted(k for k in weights if k not in used and k not in dropped
                  and not _is_bookkeeping(k))
  problems += [f"not in the model: {k!r} {np.asarray(weights[k]).shape}" for k in unused]
  if problems:
    hints = ["check --model and --model_kwargs (placement of the non-local blocks, "
             "arch, depth, clip)"]
    if any(p.startswith("missing") and "nonlocal" in p for p in problems):
      hints.append("--fresh_nonlocal initialises non-local blocks the source does not have")
    if any("head" in p or "classifier" in p or "pred_" in p or "fc." in p for p in problems):
      hints.append("--drop_head leaves out the classifier")
    raise ValueError(f"{len(problems)} weights of the {source} checkpoint do not fit "
                     f"{model_name!r} ({'; '.join(hints)}):\n  " + "\n  ".join(problems))
  return Conversion(converted, model_name, kwargs, num_classes, fresh, dropped)
