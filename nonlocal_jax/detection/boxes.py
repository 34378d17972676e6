"""Box utilities of torchvision's detection models, for (x1, y1, x2, y2) boxes.

* :func:`box_area`, :func:`box_iou`: ``torchvision.ops.box_area`` / ``box_iou``.
* :func:`clip_boxes_to_image`: ``torchvision.ops.clip_boxes_to_image``, with a
  per-image height and width that may be traced arrays (padded batches).
* :func:`small_boxes_mask`: ``torchvision.ops.remove_small_boxes`` as a keep
  mask instead of an index list, so shapes stay static.
* :class:`BoxCoder`: ``torchvision.models.detection._utils.BoxCoder``
  (``encode_single`` / ``decode_single``): Faster R-CNN's (dx, dy, dw, dh)
  parametrisation (Girshick, Fast R-CNN, eqs. 6-9) with per-coordinate weights
  and widths x2 - x1 (no Detectron "+1").

Every function takes any leading batch dimensions and follows torchvision's
order of floating-point operations. Results equal torchvision's up to float32
rounding: under jit XLA may fuse a product and a sum into one FMA (IoUs then
differ by about an ulp), and its exp differs from PyTorch's in the last bits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# torchvision's BoxCoder default (Detectron's BBOX_XFORM_CLIP): exp(dw) is at most 1000 / 16.
DEFAULT_BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _check_boxes(name: str, boxes: jax.Array) -> None:
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f"{name} must be (..., 4) boxes (x1, y1, x2, y2), got shape {boxes.shape}")


def box_area(boxes: jax.Array) -> jax.Array:
  """(..., 4) boxes -> (...,) areas (x2 - x1) (y2 - y1)."""
  _check_boxes("boxes", boxes)
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """(..., N, 4), (..., M, 4) -> (..., N, M) intersection over union (torchvision.ops.box_iou).

  The union is area1 + area2 - intersection in that order, as torchvision's
  ``_box_inter_union`` and its NMS kernel compute it. Pairs of empty boxes
  (zero union) give NaN, as in torchvision.
  """
  _check_boxes("boxes1", boxes1)
  _check_boxes("boxes2", boxes2)
  area1, area2 = box_area(boxes1), box_area(boxes2)
  top_left = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  bottom_right = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.maximum(bottom_right - top_left, 0)
  inter = wh[..., 0] * wh[..., 1]
  return inter / (area1[..., :, None] + area2[..., None, :] - inter)


def clip_boxes_to_image(boxes: jax.Array, height, width) -> jax.Array:
  """(..., 4) boxes -> (..., 4) with x in [0, width] and y in [0, height].

  ``height`` and ``width`` are Python numbers or arrays broadcasting against
  ``boxes.shape[:-1]`` (e.g. (B, 1) per-image sizes for (B, N, 4) boxes), so
  they may be traced.
  """
  _check_boxes("boxes", boxes)
  height = jnp.asarray(height, boxes.dtype)[..., None]
  width = jnp.asarray(width, boxes.dtype)[..., None]
  x = jnp.minimum(jnp.maximum(boxes[..., 0::2], 0), width)
  y = jnp.minimum(jnp.maximum(boxes[..., 1::2], 0), height)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def small_boxes_mask(boxes: jax.Array, min_size: float) -> jax.Array:
  """(..., 4) boxes -> (...,) bool, True where both sides are >= min_size.

  torchvision.ops.remove_small_boxes returns ``where(mask)``.
  """
  _check_boxes("boxes", boxes)
  return (boxes[..., 2] - boxes[..., 0] >= min_size) & (boxes[..., 3] - boxes[..., 1] >= min_size)


class BoxCoder:
  """torchvision's BoxCoder: boxes <-> weighted (dx, dy, dw, dh) regression targets.

  For a reference box (anchor / proposal) with centre (x_a, y_a) and size
  (w_a, h_a) and a target box (x, y, w, h):

      dx = w_x (x - x_a) / w_a      dy = w_y (y - y_a) / h_a
      dw = w_w log(w / w_a)         dh = w_h log(h / h_a)

  Decoding inverts this after clamping dw / w_w and dh / h_h at
  ``bbox_xform_clip`` from above.

  Args:
    weights: (w_x, w_y, w_w, w_h), positive; torchvision's RPN uses
      (1, 1, 1, 1), its box head (10, 10, 5, 5).
    bbox_xform_clip: upper bound of the unweighted dw, dh in ``decode``.
  """

  def __init__(self, weights: tuple[float, float, float, float],
               bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP):
    if len(weights) != 4 or not all(w > 0 for w in weights):
      raise ValueError(f"weights must be 4 positive numbers (w_x, w_y, w_w, w_h), got {weights!r}")
    self.weights = tuple(float(w) for w in weights)
    self.bbox_xform_clip = float(bbox_xform_clip)

  def encode(self, reference_boxes: jax.Array, proposals: jax.Array) -> jax.Array:
    """Targets of ``reference_boxes`` (the ground truth) relative to ``proposals`` (the anchors).

    (..., 4), (..., 4) broadcasting -> (..., 4) deltas; torchvision's
    ``encode_single`` (argument order as there).
    """
    _check_boxes("reference_boxes", reference_boxes)
    _check_boxes("proposals", proposals)
    wx, wy, ww, wh = self.weights
    ex_widths = proposals[..., 2] - proposals[..., 0]
    ex_heights = proposals[..., 3] - proposals[..., 1]
    ex_ctr_x = proposals[..., 0] + 0.5 * ex_widths
    ex_ctr_y = proposals[..., 1] + 0.5 * ex_heights
    gt_widths = reference_boxes[..., 2] - reference_boxes[..., 0]
    gt_heights = reference_boxes[..., 3] - reference_boxes[..., 1]
    gt_ctr_x = reference_boxes[..., 0] + 0.5 * gt_widths
    gt_ctr_y = reference_boxes[..., 1] + 0.5 * gt_heights
    return jnp.stack([
        wx * (gt_ctr_x - ex_ctr_x) / ex_widths,
        wy * (gt_ctr_y - ex_ctr_y) / ex_heights,
        ww * jnp.log(gt_widths / ex_widths),
        wh * jnp.log(gt_heights / ex_heights),
    ], axis=-1)

  def decode(self, deltas: jax.Array, boxes: jax.Array) -> jax.Array:
    """Apply (..., 4) ``deltas`` to (..., 4) reference ``boxes`` (broadcasting) -> (..., 4) boxes.

    torchvision's ``decode_single``. Its class-specific (N, 4 C) codes are
    (N, C, 4) deltas here with (N, 1, 4) boxes.
    """
    _check_boxes("deltas", deltas)
    _check_boxes("boxes", boxes)
    boxes = boxes.astype(deltas.dtype)
    wx, wy, ww, wh = self.weights
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    # Keep exp() finite for wild predictions (torchvision / Detectron BBOX_XFORM_CLIP).
    dw = jnp.minimum(deltas[..., 2] / ww, self.bbox_xform_clip)
    dh = jnp.minimum(deltas[..., 3] / wh, self.bbox_xform_clip)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (jnp.exp(dw) * widths)
    half_h = 0.5 * (jnp.exp(dh) * heights)
    return jnp.stack([pred_ctr_x - half_w, pred_ctr_y - half_h,
                      pred_ctr_x + half_w, pred_ctr_y + half_h], axis=-1)
