"""RoIAlign (He, Gkioxari, Dollar, Girshick, Mask R-CNN, ICCV 2017) and its FPN level assignment.

Numerically the same as torchvision.ops.roi_align (the CPU / CUDA kernels in
torchvision/csrc/ops/*/roi_align_kernel.*, which come from Caffe2 / Detectron)
and torchvision.ops.MultiScaleRoIAlign, in channels-last layout and with
static shapes (fixed sampling_ratio, padded boxes with a validity mask) so
that everything runs under jax.jit.

For a box (x1, y1, x2, y2) in input-image coordinates and a map with
spatial_scale s (1 / stride), output bin (p, q) of an out_h x out_w grid is
the average over a g x g grid (g = sampling_ratio) of bilinear samples at

    y = y1 * s - o + p * bin_h + (i + 0.5) * bin_h / g,   i < g
    x = x1 * s - o + q * bin_w + (j + 0.5) * bin_w / g,   j < g

with bin_h = roi_h / out_h, roi_h = (y2 - y1) * s (clamped to >= 1 when
aligned=False, torchvision's "force malformed ROIs to be 1x1") and o = 0.5
when aligned (Detectron2's half-pixel "ROIAlignV2") else 0. The bilinear
sampler follows the kernel's border rules (pre_calc_for_bilinear_interpolate):
a sample with y < -1 or y > H (x < -1 or x > W) contributes 0; otherwise y is
clamped up to 0 and, once floor(y) >= H - 1, down to H - 1.

Sample positions and bilinear weights are separable in y and x: each output
bin reads 4 g^2 corner pixels (C channels each) from a flat (pixels, C)
table, as 4 g^2 gathers summed with their weights in one XLA fusion, so the
gathered corners are never stored. The gradient w.r.t. the features
scatter-adds the same weights (torchvision's roi_align_backward_kernel) one
corner at a time.

The sample coordinates follow the kernel's float expression, but XLA on CPU
may fuse multiply-adds and round float32 divisions differently (by an ulp),
so float32 outputs agree with torchvision to ~1e-5 of the feature scale
(about torchvision's own float32 error), and a sample exactly on a border
(y = -1 or y = H) may fall on the other side of it; float64 agrees to
rounding.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp


def _output_hw(output_size: int | Sequence[int]) -> tuple[int, int]:
  """torchvision's _pair: an int or an (out_h, out_w) pair of positive ints."""
  size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
  if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                               for s in size):
    raise ValueError(f"output_size must be a positive int or a pair (out_h, out_w) of positive "
                     f"ints, got {output_size!r}")
  return size


def _check_sampling_ratio(sampling_ratio: int) -> None:
  if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool) or sampling_ratio < 1:
    raise ValueError(
        f"sampling_ratio must be a positive int, got {sampling_ratio!r}: torchvision's "
        f"sampling_ratio <= 0 (an adaptive ceil(roi_size / output_size) grid per box) has "
        f"data-dependent shapes and is not supported")


def _axis_samples(start: jax.Array, length: jax.Array, size: jax.Array, bins: int,
                  grid: int) -> tuple[jax.Array, jax.Array]:
  """Bilinear corners of the bins x grid samples along one axis of each box.

  start, length: (R,) RoI start and extent in map pixels; size: () or (R,) map
  extent (H or W). Returns corner indices (R, bins, grid, 2) int32 (low, high)
  and their weights (R, bins, grid, 2), zero for samples outside [-1, size].
  """
  bin_size = length / bins
  bin_index = jnp.arange(bins, dtype=start.dtype)[None, :, None]
  offset = (jnp.arange(grid, dtype=start.dtype) + 0.5)[None, None, :]
  # Same association as the kernel: start + p * bin + (i + 0.5) * bin / g.
  coord = (start[:, None, None] + bin_index * bin_size[:, None, None]
           + offset * bin_size[:, None, None] / grid)
  size = jnp.broadcast_to(size, start.shape)[:, None, None]
  # Written as "inside" so that NaN coordinates fall outside, as in the kernel.
  inside = (coord >= -1) & (coord <= size)
  coord = jnp.where(inside, jnp.maximum(coord, 0), 0)
  low = jnp.floor(coord).astype(jnp.int32)
  # From row H - 1 on, both corners are row H - 1 (whatever the fraction).
  at_edge = low >= size - 1
  low = jnp.where(at_edge, size - 1, low)
  high = jnp.where(at_edge, size - 1, low + 1)
  frac = coord - low
  weight = jnp.stack([1 - frac, frac], axis=-1) * inside[..., None]
  return jnp.stack([low, high], axis=-1), weight


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weighted_gather(table_spec: jax.ShapeDtypeStruct, table: jax.Array, index: jax.Array,
                     weight: jax.Array) -> jax.Array:
  """sum_k weight[..., k] * table[index[..., k]]: (P, C), (..., K) int32, (..., K) -> (..., C).

  table_spec is table's shape and dtype, for the backward pass. The K gathers
  feed one elementwise sum, which XLA fuses without materialising the
  gathered corners. The automatic transpose would build K (..., C) updates
  and K table-sized gradients; the backward pass instead scatter-adds the K
  corners in a loop into one gradient accumulated in weight.dtype. No
  cotangent for index or weight: the boxes get no gradient, as in
  torchvision.
  """
  pooled = 0
  for k in range(index.shape[-1]):
    corner = table.at[index[..., k]].get(mode="clip").astype(weight.dtype)
    pooled = pooled + corner * weight[..., k, None]
  return pooled


def _weighted_gather_fwd(table_spec, table, index, weight):
  return _weighted_gather(table_spec, table, index, weight), (index, weight)


def _weighted_gather_bwd(table_spec, residuals, cotangent):
  index, weight = residuals

  def add_corner(k, grad):
    corner_index = jax.lax.dynamic_index_in_dim(index, k, axis=-1, keepdims=False)
    corner_weight = jax.lax.dynamic_index_in_dim(weight, k, axis=-1, keepdims=False)
    return grad.at[corner_index].add(cotangent * corner_weight[..., None], mode="clip")

  grad = jax.lax.fori_loop(0, index.shape[-1], add_corner,
                           jnp.zeros(table_spec.shape, weight.dtype))
  return grad.astype(table_spec.dtype), None, None


_weighted_gather.defvjp(_weighted_gather_fwd, _weighted_gather_bwd)


def _pool_flat(table: jax.Array, pixel_offset: jax.Array, height: jax.Array, width: jax.Array,
               spatial_scale: float | jax.Array, boxes: jax.Array, output_size: tuple[int, int],
               sampling_ratio: int, aligned: bool) -> jax.Array:
  """RoIAlign of R boxes from maps stored row-major in a flat (P, C) pixel table.

  Box r reads the H x W map that starts at row pixel_offset[r] of the table
  (pixel (y, x) at pixel_offset + y * W + x). pixel_offset (R,) int32; height,
  width, spatial_scale () or (R,); boxes (R, 4) -> (R, out_h, out_w, C).
  """
  out_h, out_w = output_size
  coord_dtype = jnp.promote_types(boxes.dtype, jnp.float32)
  boxes = boxes.astype(coord_dtype)
  shift = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = [boxes[:, k] * jnp.asarray(spatial_scale, coord_dtype) - shift
                    for k in range(4)]
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:
    roi_w, roi_h = jnp.maximum(roi_w, 1), jnp.maximum(roi_h, 1)
  y_index, y_weight = _axis_samples(y1, roi_h, height, out_h, sampling_ratio)
  x_index, x_weight = _axis_samples(x1, roi_w, width, out_w, sampling_ratio)
  width = jnp.broadcast_to(width, pixel_offset.shape)
  row_start = pixel_offset[:, None, None, None] + y_index * width[:, None, None, None]
  acc_dtype = jnp.promote_types(table.dtype, coord_dtype)
  y_weight = y_weight / (sampling_ratio * sampling_ratio)
  index = (row_start[:, :, None, :, :, None, None] + x_index[:, None, :, None, None, :, :])
  weight = (y_weight[:, :, None, :, :, None, None] * x_weight[:, None, :, None, None, :, :])
  r = index.shape[0]
  index = index.reshape(r, out_h, out_w, -1)
  weight = weight.reshape(r, out_h, out_w, -1).astype(acc_dtype)
  pooled = _weighted_gather(jax.ShapeDtypeStruct(table.shape, table.dtype), table, index, weight)
  return pooled.astype(table.dtype)


def roi_align(features: jax.Array, boxes: jax.Array, box_batch_index: jax.Array,
              output_size: int | Sequence[int], spatial_scale: float, sampling_ratio: int,
              aligned: bool = False) -> jax.Array:
  """torchvision.ops.roi_align in channels-last layout, with a fixed sampling grid.

  Args:
    features: (N, H, W, C) maps.
    boxes: (R, 4) boxes (x1, y1, x2, y2) in input-image coordinates.
    box_batch_index: (R,) int, the image of each box, in [0, N) (out-of-range
      indices are clamped).
    output_size: out_h = out_w, or (out_h, out_w).
    spatial_scale: map pixels per input pixel (1 / stride).
    sampling_ratio: g > 0 samples per bin along each axis. torchvision's
      adaptive sampling_ratio <= 0 (a per-box grid) is rejected.
    aligned: the half-pixel shift of Detectron2's ROIAlignV2 (torchvision's
      aligned=True); False, the default as in MultiScaleRoIAlign, is the
      RoIAlign of Mask R-CNN / Detectron.

  Returns:
    (R, out_h, out_w, C) in the dtype of `features`.

  Reverse-mode differentiable w.r.t. `features`; like torchvision, no gradient
  flows to `boxes`. Cost: R * out_h * out_w * (2g)^2 gathered C-vectors; the
  forward pass keeps no gathered corners in memory (only (R, out_h, out_w,
  4g^2) indices and weights), the backward pass one (R, out_h, out_w, C)
  update at a time besides the (N * H * W, C) gradient.
  """
  output_size = _output_hw(output_size)
  _check_sampling_ratio(sampling_ratio)
  if features.ndim != 4:
    raise ValueError(f"features must be (N, H, W, C), got shape {features.shape}")
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"boxes must be (R, 4) as (x1, y1, x2, y2), got shape {boxes.shape}")
  if box_batch_index.shape != boxes.shape[:1]:
    raise ValueError(f"box_batch_index must be (R,) = {boxes.shape[:1]}, got shape "
                     f"{box_batch_index.shape}")
  if not (isinstance(spatial_scale, (int, float)) and math.isfinite(spatial_scale)
          and spatial_scale > 0):
    raise ValueError(f"spatial_scale must be a positive finite number, got {spatial_scale!r}")
  n, h, w, c = features.shape
  pixel_offset = jnp.clip(box_batch_index.astype(jnp.int32), 0, n - 1) * (h * w)
  return _pool_flat(features.reshape(n * h * w, c), pixel_offset, jnp.int32(h), jnp.int32(w),
                    spatial_scale, boxes, output_size, sampling_ratio, aligned)


def level_of_boxes(boxes: jax.Array, canonical_scale: float = 224, canonical_level: int = 4,
                   min_level: int = 2, max_level: int = 5, eps: float = 1e-6) -> jax.Array:
  """FPN level of each box: (..., 4) (x1, y1, x2, y2) -> (...,) int32 in [min_level, max_level].

  floor(canonical_level + log2(sqrt(w * h) / canonical_scale) + eps), clamped
  (FPN paper eq. 1 as in torchvision.ops.poolers.LevelMapper, which returns
  this minus min_level). Empty boxes (log2(0) = -inf) and boxes of negative
  area (NaN) go to min_level.
  """
  if boxes.shape[-1:] != (4,):
    raise ValueError(f"boxes must be (..., 4) as (x1, y1, x2, y2), got shape {boxes.shape}")
  if not (isinstance(min_level, int) and isinstance(max_level, int) and min_level <= max_level):
    raise ValueError(f"min_level and max_level must be ints with min_level <= max_level, got "
                     f"{min_level!r} and {max_level!r}")
  x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
  scale = jnp.sqrt((x2 - x1) * (y2 - y1))
  level = jnp.floor(canonical_level + jnp.log2(scale / canonical_scale) + eps)
  level = jnp.where(level > min_level, level, min_level)  # NaN -> min_level
  return jnp.minimum(level, max_level).astype(jnp.int32)


def _check_pyramid(features_per_level: Sequence[jax.Array], strides: Sequence[int]) -> None:
  """Strides are consecutive powers of two matching the maps' relative sizes (torchvision's
  _infer_scale rounds log2(map size / image size) the same way)."""
  if len(features_per_level) < 1 or len(strides) != len(features_per_level):
    raise ValueError(f"need one stride per feature map, got {len(strides)} strides for "
                     f"{len(features_per_level)} maps")
  if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 and s & (s - 1) == 0
             for s in strides):
    raise ValueError(f"strides must be powers of two, got {tuple(strides)}")
  if any(b != 2 * a for a, b in zip(strides, strides[1:])):
    raise ValueError(f"strides must double from level to level (consecutive FPN levels), got "
                     f"{tuple(strides)}")
  shapes = [f.shape for f in features_per_level]
  if any(len(s) != 4 for s in shapes) or len({(s[0], s[3]) for s in shapes}) != 1:
    raise ValueError(f"features_per_level must be (B, H_l, W_l, C) maps with a common B and C, "
                     f"got shapes {shapes}")
  first = features_per_level[0]
  for level, (feature, stride) in enumerate(zip(features_per_level, strides)):
    ratio = [2 ** round(math.log2(first.shape[k] / feature.shape[k])) for k in (1, 2)]
    if ratio != [stride // strides[0]] * 2:
      raise ValueError(f"map {level} of shape {feature.shape} is {ratio} times smaller than map 0 "
                       f"of shape {first.shape}, but its stride {stride} is "
                       f"{stride // strides[0]} times stride {strides[0]}")


def multiscale_roi_align(features_per_level: Sequence[jax.Array], strides: Sequence[int],
                         boxes: jax.Array, valid: jax.Array, output_size: int | Sequence[int],
                         sampling_ratio: int, canonical_scale: float = 224,
                         canonical_level: int = 4) -> jax.Array:
  """torchvision.ops.MultiScaleRoIAlign on padded boxes: each box pooled from its FPN level.

  Args:
    features_per_level: (B, H_l, W_l, C) maps of consecutive pyramid levels,
      finest first (FPN P2-P5).
    strides: their strides, e.g. (4, 8, 16, 32); level log2(stride) has
      spatial_scale 1 / stride (torchvision infers the same scales from the
      map and image sizes).
    boxes: (B, R, 4) boxes (x1, y1, x2, y2) in input-image coordinates.
    valid: (B, R) bool, False for padding boxes.
    output_size: out_h = out_w, or (out_h, out_w).
    sampling_ratio: g > 0 samples per bin along each axis.
    canonical_scale, canonical_level: of level_of_boxes (FPN eq. 1: 224, 4).

  Returns:
    (B, R, out_h, out_w, C), zeros for invalid boxes. Uses aligned=False, as
    MultiScaleRoIAlign does.

  Cost: the maps are flattened into one (sum_l B * H_l * W_l, C) table (a copy
  of the pyramid, ~4/3 of the finest map) and every box gathers from its own
  level only, so compute and memory are those of one roi_align of B * R
  boxes, as in torchvision's per-level loop (see roi_align for the details).
  """
  output_size = _output_hw(output_size)
  _check_sampling_ratio(sampling_ratio)
  _check_pyramid(features_per_level, strides)
  batch = features_per_level[0].shape[0]
  if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4:
    raise ValueError(f"boxes must be (B, R, 4) with B = {batch}, got shape {boxes.shape}")
  if valid.shape != boxes.shape[:2]:
    raise ValueError(f"valid must be (B, R) = {boxes.shape[:2]}, got shape {valid.shape}")
  num_boxes, channels = boxes.shape[1], features_per_level[0].shape[3]
  min_level, max_level = int(math.log2(strides[0])), int(math.log2(strides[-1]))
  # Padding boxes may hold anything (NaN included): pool a harmless empty box instead.
  boxes = jnp.where(valid[..., None], boxes, 0).reshape(batch * num_boxes, 4)
  level = level_of_boxes(boxes, canonical_scale, canonical_level, min_level, max_level) - min_level
  heights = jnp.array([f.shape[1] for f in features_per_level], jnp.int32)[level]
  widths = jnp.array([f.shape[2] for f in features_per_level], jnp.int32)[level]
  level_start = jnp.array([0] + [f.shape[0] * f.shape[1] * f.shape[2]
                                 for f in features_per_level[:-1]], jnp.int32).cumsum()[level]
  image = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), num_boxes)
  scale = jnp.array([1 / s for s in strides], jnp.promote_types(boxes.dtype, jnp.float32))[level]
  table = jnp.concatenate([f.reshape(-1, channels) for f in features_per_level])
  pooled = _pool_flat(table, level_start + image * heights * widths, heights, widths, scale,
                      boxes, output_size, sampling_ratio, aligned=False)
  pooled = pooled.reshape(batch, num_boxes, *output_size, channels)
  return jnp.where(valid[..., None, None, None], pooled, 0)
