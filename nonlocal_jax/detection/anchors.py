"""The anchors of torchvision's AnchorGenerator (models/detection/anchor_utils.py) as constants.

Per level, the cell anchors for sizes s and aspect ratios r (= height / width)
are round([-w, -h, w, h] / 2) with h = s sqrt(r), w = s / sqrt(r), ratio-major
(``generate_anchors``), computed in float32 as torchvision does. They are
shifted by (x, y, x, y) for x = arange(grid_w) * stride_w, y = arange(grid_h) *
stride_h: anchors are centred on multiples of the stride (no half-stride
offset, no Detectron "+1"). Ordering (``grid_anchors``): levels in order, within
a level location-major over (y, x), then the anchors of a location.

Feature-map sizes. torchvision reads each level's grid from the feature map and
sets the stride to image_size // grid. A ResNet-FPN on an H x W input gives
grid ceil(H / s) x ceil(W / s) at nominal stride s (every stride-2 layer maps n
to ceil(n / 2); the FPN top-down path resizes to the lateral sizes; P6 is a
stride-2, kernel-1 max pool of P5), and :func:`feature_map_sizes` uses exactly
that. For a padded batch (GeneralizedRCNNTransform pads H and W to multiples of
32) this is H / s at strides <= 32, but the pool level of an input whose H / 32
is odd has ceil(H / 64) rows and torchvision's stride H // ceil(H / 64) is not
64 (e.g. 800 // 13 = 61): :func:`level_strides` reproduces that.

Everything here depends only on static sizes and returns numpy arrays, usable
as constants under jax.jit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _positive_ints(name: str, values: Sequence[int]) -> None:
  if not values or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                           for v in values):
    raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")


def _check_image_and_strides(image_size: Sequence[int], strides: Sequence[int]) -> None:
  if len(image_size) != 2:
    raise ValueError(f"image_size must be (height, width), got {image_size!r}")
  _positive_ints("image_size", image_size)
  _positive_ints("strides", strides)


def feature_map_sizes(image_size: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
  """(H, W) input and nominal level strides -> per-level (ceil(H / s), ceil(W / s))."""
  _check_image_and_strides(image_size, strides)
  height, width = image_size
  return [(-(-height // s), -(-width // s)) for s in strides]


def level_strides(image_size: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
  """Per-level (stride_h, stride_w) as AnchorGenerator.forward computes them: image_size // grid."""
  height, width = image_size
  return [(height // grid_h, width // grid_w)
          for grid_h, grid_w in feature_map_sizes(image_size, strides)]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
  """Zero-centred anchors of one location: (len(aspect_ratios) * len(sizes), 4) float32.

  AnchorGenerator.generate_anchors: ratio-major, size-minor.
  """
  scales = np.asarray(sizes, np.float32)
  h_ratios = np.sqrt(np.asarray(aspect_ratios, np.float32))
  w_ratios = np.float32(1) / h_ratios
  ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  # np.round rounds half to even, as torch.round.
  return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2))


def anchors_for_levels(
    image_size: Sequence[int],
    strides: Sequence[int],
    sizes: Sequence[Sequence[float]],
    aspect_ratios: Sequence[Sequence[float]],
) -> tuple[np.ndarray, list[int]]:
  """All anchors of an (H, W) input in torchvision's order -> ((A_total, 4) float32, counts).

  Args:
    image_size: (H, W) of the (padded) network input.
    strides: nominal stride of each level, e.g. (4, 8, 16, 32, 64) for
      torchvision's FPN levels "0", "1", "2", "3", "pool".
    sizes: anchor sizes of each level, e.g. ((32,), (64,), (128,), (256,), (512,)).
    aspect_ratios: height / width ratios of each level, e.g. ((0.5, 1.0, 2.0),) * 5.

  Level l holds grid_h grid_w len(sizes[l]) len(aspect_ratios[l]) anchors
  (its entry of the returned per-level counts), the levels concatenated in order.
  """
  _check_image_and_strides(image_size, strides)
  if not len(sizes) == len(aspect_ratios) == len(strides):
    raise ValueError(f"sizes ({len(sizes)} levels), aspect_ratios ({len(aspect_ratios)}) and "
                     f"strides ({len(strides)}) must have one entry per level")
  for level, (level_sizes, level_ratios) in enumerate(zip(sizes, aspect_ratios)):
    if not level_sizes or not all(s > 0 for s in level_sizes):
      raise ValueError(f"sizes[{level}] must be non-empty positive sizes, got {level_sizes!r}")
    if not level_ratios or not all(r > 0 for r in level_ratios):
      raise ValueError(f"aspect_ratios[{level}] must be non-empty positive ratios, got "
                       f"{level_ratios!r}")
  anchors, counts = [], []
  for (grid_h, grid_w), (stride_h, stride_w), level_sizes, level_ratios in zip(
      feature_map_sizes(image_size, strides), level_strides(image_size, strides), sizes,
      aspect_ratios):
    shift_y, shift_x = np.meshgrid(np.arange(grid_h) * stride_h, np.arange(grid_w) * stride_w,
                                   indexing="ij")
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4)
    level = shifts.astype(np.float32) + cell_anchors(level_sizes, level_ratios)[None]
    anchors.append(level.reshape(-1, 4))
    counts.append(anchors[-1].shape[0])
  return np.concatenate(anchors), counts
