"""Greedy non-maximum suppression with static shapes: torchvision.ops.nms / batched_nms.

Greedy NMS visits boxes in decreasing score order and keeps a box unless a
box kept before it overlaps it with IoU > iou_threshold. With the boxes sorted,
box j is kept iff

    keep[j] = valid[j] and not any_{i < j} (keep[i] and iou[i, j] > threshold),

a triangular system solved here tile by tile (as TensorFlow's
``non_max_suppression_padded``): for a tile of T consecutive boxes, first drop
those suppressed by boxes kept in earlier tiles (one (N, T) IoU block and a
reduction), then solve the T x T system inside the tile by fixed-point
iteration keep <- candidates & ~any(keep & over). Its solution is unique and
box t of the tile is final after t iterations, so the iteration stops after at
most T (in practice a few) steps. The loop over tiles stops once
``max_output_size`` boxes are kept. Memory is O(N T), work O(N^2).

IoUs use the expression of torchvision's NMS kernel, inter / (area_i + area_j
- inter), so decisions equal torchvision's except for an IoU within float32
rounding (about an ulp, see boxes.py) of the threshold. A NaN IoU (two empty
boxes) suppresses nothing, as there.

Ties: boxes with equal scores are visited in increasing index order (a stable
sort). torchvision's ``nms`` documents the order of equal scores as
unspecified (CPU and CUDA kernels may differ), so with ties only the
validity of the kept set is comparable.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax import lax

from nonlocal_jax.detection.boxes import box_iou

# Index written to the padded output slots: in range, so gathers with it stay valid.
FILL_INDEX = 0


def _check_args(boxes: jax.Array, scores: jax.Array, valid: jax.Array | None,
                iou_threshold: float, max_output_size: int, tile_size: int) -> None:
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"boxes must be (N, 4) (x1, y1, x2, y2), got shape {boxes.shape}")
  if scores.shape != boxes.shape[:1]:
    raise ValueError(f"scores must be (N,) = {boxes.shape[:1]}, got shape {scores.shape}")
  if valid is not None and valid.shape != boxes.shape[:1]:
    raise ValueError(f"valid must be (N,) = {boxes.shape[:1]}, got shape {valid.shape}")
  if (not isinstance(iou_threshold, numbers.Real) or isinstance(iou_threshold, bool)
      or not 0 <= iou_threshold <= 1):
    raise ValueError(f"iou_threshold must be a number in [0, 1], got {iou_threshold!r}")
  for name, value in (("max_output_size", max_output_size), ("tile_size", tile_size)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")


def _suppress_sorted(boxes: jax.Array, valid: jax.Array, iou_threshold: float,
                     max_output_size: int, tile_size: int) -> jax.Array:
  """Greedy NMS of (N, 4) boxes already in visiting order -> (N,) keep mask.

  Entries after the tile in which ``max_output_size`` boxes are reached stay False.
  """
  n = boxes.shape[0]
  tile = min(tile_size, n)
  num_tiles = -(-n // tile)
  pad = num_tiles * tile - n
  boxes = jnp.pad(boxes, ((0, pad), (0, 0)))
  valid = jnp.pad(valid, (0, pad))
  # Strictly earlier box of the same tile: i < j.
  earlier = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]

  def resolve_tile(state):
    t, keep = state
    start = t * tile
    tile_boxes = lax.dynamic_slice_in_dim(boxes, start, tile)
    over = box_iou(boxes, tile_boxes) > iou_threshold  # (N_padded, T)
    # keep is still False from this tile on, so this only sees earlier tiles.
    candidates = lax.dynamic_slice_in_dim(valid, start, tile) & ~jnp.any(
        over & keep[:, None], axis=0)
    over_within = lax.dynamic_slice_in_dim(over, start, tile) & earlier

    def step(tile_keep):
      return candidates & ~jnp.any(over_within & tile_keep[:, None], axis=0)

    def changed(pair):
      previous, current = pair
      return jnp.any(previous != current)

    _, tile_keep = lax.while_loop(changed, lambda pair: (pair[1], step(pair[1])),
                                  (candidates, step(candidates)))
    return t + 1, lax.dynamic_update_slice_in_dim(keep, tile_keep, start, 0)

  def more_to_do(state):
    t, keep = state
    return (t < num_tiles) & (jnp.sum(keep) < max_output_size)

  _, keep = lax.while_loop(more_to_do, resolve_tile, (0, jnp.zeros(n + pad, bool)))
  return keep[:n]


def nms(boxes: jax.Array, scores: jax.Array, iou_threshold: float, max_output_size: int,
        valid: jax.Array | None = None, *, tile_size: int = 256) -> tuple[jax.Array, jax.Array]:
  """torchvision.ops.nms on the valid boxes, its first ``max_output_size`` results.

  Args:
    boxes: (N, 4) as (x1, y1, x2, y2).
    scores: (N,).
    iou_threshold: in [0, 1]; a box is suppressed by a kept box with IoU
      strictly greater.
    max_output_size: K, the static number of output slots.
    valid: optional (N,) bool; False boxes neither survive nor suppress.
    tile_size: boxes resolved per step of the tiled loop (any positive int;
      only speed depends on it).

  Returns:
    indices (K,) int32 into ``boxes`` of the kept boxes in decreasing score
    order, then FILL_INDEX; keep_valid (K,) bool, True on the kept slots.
    Batch with jax.vmap.
  """
  _check_args(boxes, scores, valid, iou_threshold, max_output_size, tile_size)
  n = boxes.shape[0]
  boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
  valid = jnp.ones(n, bool) if valid is None else jnp.asarray(valid)
  if n == 0:
    return jnp.full(max_output_size, FILL_INDEX, jnp.int32), jnp.zeros(max_output_size, bool)
  # Visiting order: valid boxes first, by decreasing score, ties by index (stable).
  *_, order = lax.sort((~valid, -scores, jnp.arange(n, dtype=jnp.int32)), num_keys=3)
  keep = _suppress_sorted(boxes[order], valid[order], iou_threshold, max_output_size, tile_size)
  (positions,) = jnp.nonzero(keep, size=max_output_size, fill_value=0)
  keep_valid = jnp.arange(max_output_size) < jnp.sum(keep)
  return jnp.where(keep_valid, order[positions], FILL_INDEX), keep_valid


def batched_nms(boxes: jax.Array, scores: jax.Array, categories: jax.Array,
                iou_threshold: float, max_output_size: int, valid: jax.Array | None = None, *,
                tile_size: int = 256) -> tuple[jax.Array, jax.Array]:
  """torchvision.ops.batched_nms: NMS within each category, one ranking over all.

  Uses torchvision's coordinate trick (``_batched_nms_coordinate_trick``):
  boxes are shifted by category * (max coordinate + 1), the maximum over the
  valid boxes, so boxes of different categories never overlap, and the shifted
  boxes go through :func:`nms`. (torchvision's CPU path switches to a loop over
  categories above 1000 boxes; it keeps the same set up to the rounding of the
  shifted coordinates.)

  Args:
    categories: (N,) integer category of each box; other arguments and the
      results as in :func:`nms`.
  """
  _check_args(boxes, scores, valid, iou_threshold, max_output_size, tile_size)
  if categories.shape != boxes.shape[:1]:
    raise ValueError(f"categories must be (N,) = {boxes.shape[:1]}, got shape {categories.shape}")
  boxes = jnp.asarray(boxes)
  valid = jnp.ones(boxes.shape[0], bool) if valid is None else jnp.asarray(valid)
  max_coordinate = jnp.max(boxes, where=valid[:, None], initial=-jnp.inf)
  # No valid box: any finite shift will do, nothing is kept.
  max_coordinate = jnp.where(jnp.isfinite(max_coordinate), max_coordinate, 0).astype(boxes.dtype)
  offsets = categories.astype(boxes.dtype) * (max_coordinate + 1)
  return nms(boxes + offsets[:, None], scores, iou_threshold, max_output_size, valid,
             tile_size=tile_size)
