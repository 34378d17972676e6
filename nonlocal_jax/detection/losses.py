"""Losses of Mask R-CNN / Keypoint R-CNN and their mask and keypoint targets, with static shapes.

Each equals torchvision's function (``models/detection/rpn.py``
``RegionProposalNetwork.compute_loss``; ``models/detection/roi_heads.py``
``fastrcnn_loss``, ``project_masks_on_boxes``, ``maskrcnn_loss``,
``keypoints_to_heatmap``, ``keypointrcnn_loss``) on the same sampled
elements, up to float32 summation order; :func:`mask_targets_from_patches`
is project_masks_on_boxes from masks kept only on their boxes at P x P
(exact for masks constant on the patch cells, approximate otherwise).
Channels-last layout: mask logits (S, 28, 28, K), heatmap logits (S, 56, 56, K).

Batches: the losses take any leading dimensions (e.g. B images) and reduce
over all of them at once, as torchvision concatenates the images of a batch
before averaging; sampled / valid masks replace torchvision's index lists.
The target functions work on one image; batch them with ``jax.vmap``.

Empty batches. Where nothing is sampled (no sampled anchor, no valid RoI),
torchvision's means are 0 / 0 = NaN; here the loss is 0. Without positive
RoIs or visible keypoints both give 0, as torchvision returns
``logits.sum() * 0`` there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nonlocal_jax.detection.proposals import RPN_BOX_CODER

# torchvision's smooth-L1 beta of both box losses (Detectron's RPN value; its box head uses 1).
SMOOTH_L1_BETA = 1 / 9


def _smooth_l1(diff: jax.Array, beta: float = SMOOTH_L1_BETA) -> jax.Array:
  """F.smooth_l1_loss elementwise: 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta."""
  size = jnp.abs(diff)
  return jnp.where(size < beta, 0.5 * size * size / beta, size - 0.5 * beta)


def _bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """F.binary_cross_entropy_with_logits elementwise: (1 - y) x - log sigmoid(x)."""
  return (1 - targets) * logits - jax.nn.log_sigmoid(logits)


def _mean_over(values: jax.Array, mask: jax.Array, count: jax.Array) -> jax.Array:
  """sum(values where mask) / count, 0 when count is 0."""
  return jnp.sum(jnp.where(mask, values, 0)) / jnp.maximum(count, 1)


def _check_shape(name: str, value: jax.Array, shape: tuple[int, ...]) -> None:
  if value.shape != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {value.shape}")


def rpn_loss(objectness: jax.Array, deltas: jax.Array, matched_boxes: jax.Array,
             anchors: jax.Array, positive: jax.Array,
             negative: jax.Array) -> tuple[jax.Array, jax.Array]:
  """RegionProposalNetwork.compute_loss on sampled anchors.

  Args:
    objectness: (..., A) logits.
    deltas: (..., A, 4) predicted box regression.
    matched_boxes: (..., A, 4) from :func:`targets.rpn_targets` (read at
      positives only).
    anchors: (A, 4) or (..., A, 4).
    positive, negative: (..., A) bool, the anchors sampled by
      :func:`targets.sample_balanced` (torchvision's labels there are 1 and
      0, so they are the objectness targets).

  Returns:
    (objectness_loss, box_loss): binary cross-entropy averaged over all
    sampled anchors of the batch, and smooth-L1 (beta 1/9) of the positives'
    deltas against BoxCoder((1, 1, 1, 1)) targets, summed and divided by the
    number of sampled anchors.
  """
  leading = objectness.shape
  _check_shape("deltas", deltas, (*leading, 4))
  _check_shape("matched_boxes", matched_boxes, (*leading, 4))
  _check_shape("positive", positive, leading)
  _check_shape("negative", negative, leading)
  if anchors.shape[-2:] != (leading[-1], 4):
    raise ValueError(f"anchors must be ({leading[-1]}, 4) or (..., {leading[-1]}, 4), got shape "
                     f"{anchors.shape}")
  positive, negative = positive.astype(bool), negative.astype(bool)
  sampled = positive | negative
  count = jnp.sum(sampled)
  objectness_loss = _mean_over(
      _bce_with_logits(objectness.astype(jnp.float32), positive.astype(jnp.float32)), sampled,
      count)
  anchors = jnp.broadcast_to(anchors.astype(jnp.float32), matched_boxes.shape)
  # Non-positive anchors encode against themselves: finite targets, finite gradients.
  reference = jnp.where(positive[..., None], matched_boxes.astype(jnp.float32), anchors)
  targets = RPN_BOX_CODER.encode(reference, anchors)
  box_loss = _mean_over(_smooth_l1(deltas.astype(jnp.float32) - targets), positive[..., None],
                        count)
  return objectness_loss, box_loss


def fastrcnn_loss(class_logits: jax.Array, box_regression: jax.Array, labels: jax.Array,
                  regression_targets: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """torchvision's fastrcnn_loss on sampled RoIs.

  Args:
    class_logits: (..., S, K) logits, class 0 the background.
    box_regression: (..., S, K, 4) class-specific deltas.
    labels: (..., S) int in [0, K) (:func:`targets.roi_targets` 'labels').
    regression_targets: (..., S, 4) (read at positives only).
    valid: (..., S) bool, the sampled RoIs.

  Returns:
    (classification_loss, box_loss): softmax cross-entropy averaged over the
    valid RoIs, and smooth-L1 (beta 1/9) of the deltas of each positive RoI's
    own class, summed and divided by the number of valid RoIs.
  """
  leading = labels.shape
  num_classes = class_logits.shape[-1]
  _check_shape("class_logits", class_logits, (*leading, num_classes))
  _check_shape("box_regression", box_regression, (*leading, num_classes, 4))
  _check_shape("regression_targets", regression_targets, (*leading, 4))
  _check_shape("valid", valid, leading)
  valid = valid.astype(bool)
  labels = labels.astype(jnp.int32)
  count = jnp.sum(valid)
  log_probs = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
  cross_entropy = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  classification_loss = _mean_over(cross_entropy, valid, count)
  class_deltas = jnp.take_along_axis(box_regression.astype(jnp.float32),
                                     labels[..., None, None], axis=-2)[..., 0, :]
  positive = valid & (labels > 0)
  box_loss = _mean_over(
      _smooth_l1(class_deltas - regression_targets.astype(jnp.float32)), positive[..., None],
      count)
  return classification_loss, box_loss


def _adaptive_axis_weights(start: jax.Array, end: jax.Array, size: int, bins: int) -> jax.Array:
  """One axis of torchvision's roi_align with sampling_ratio <= 0 and aligned=False, as a matrix.

  A box side [start, end] (in pixels, spatial_scale 1) of length
  max(end - start, 1) is cut into `bins` bins of length b; bin p averages g =
  ceil(b) bilinear samples at start + p b + (i + 0.5) b / g, i < g (the
  kernel's "adaptive" grid, roi_align_kernel.cpp). Returns W (bins, size)
  with W[p, r] the total weight of pixel r in bin p divided by g, so that a
  bin of the 2-D output is (W_y M W_x^T)[p, q]: the kernel's weights are
  products of per-axis weights, its border rules are per axis (a sample
  beyond [-1, size] weighs 0, below 0 it is clamped to 0, from size - 1 on
  both corners are row size - 1).

  g is data dependent, but the samples are b / g > 1/2 apart when g >= 2, so
  at most 4 of a bin lie within one pixel of row r: each (p, r) evaluates 6
  consecutive candidates i around the nearest sample (all of 0..5 when g <= 6).
  """
  length = jnp.maximum(end - start, 1)  # "Force malformed ROIs to be 1x1"
  bin_size = length / bins
  grid = jnp.ceil(length / bins)
  bin_start = start + jnp.arange(bins, dtype=start.dtype)[:, None, None] * bin_size
  row = jnp.arange(size, dtype=start.dtype)[None, :, None]
  nearest = jnp.floor((row - bin_start) * grid / bin_size - 0.5)
  first = jnp.clip(nearest - 2, 0, jnp.maximum(grid - 6, 0))
  sample = first + jnp.arange(6, dtype=start.dtype)  # (bins, size, 6)
  # The kernel's association: start + p * bin + (i + 0.5) * bin / g.
  coord = bin_start + (sample + 0.5) * bin_size / grid
  inside = (coord >= -1) & (coord <= size) & (sample < grid)
  coord = jnp.maximum(coord, 0)
  low = jnp.floor(coord)
  at_edge = low >= size - 1
  low = jnp.where(at_edge, size - 1, low)
  high = jnp.where(at_edge, size - 1, low + 1)
  frac = jnp.where(at_edge, 0, coord - low)
  weight = (jnp.where(low == row, 1 - frac, 0) + jnp.where(high == row, frac, 0)) * inside
  return jnp.sum(weight, axis=-1) / grid


def mask_targets(gt_masks: jax.Array, matched_gt: jax.Array, rois: jax.Array,
                 size: int = 28) -> jax.Array:
  """torchvision's project_masks_on_boxes for one image: (S, size, size) targets.

  ``roi_align(gt_masks[:, None].float(), [matched_gt, rois], (size, size),
  1.0)``: RoIAlign (aligned=False) of each RoI's matched full-image mask
  with torchvision's default sampling_ratio=-1, i.e. the adaptive
  ceil(roi_side / size) samples per bin and axis (up to ~48 for an 800 x
  1333 image), reproduced exactly (up to float32 summation order) via
  :func:`_adaptive_axis_weights`: target = W_y (S, size, H) . mask (H, W) .
  W_x^T. Cost ~2 size H W multiply-adds per RoI; the RoIs are processed one
  at a time (``lax.map``), so no (S, H, W) stack of masks is built.

  Args:
    gt_masks: (M, H, W) uint8 / bool / float masks of the padded ground truth.
    matched_gt: (S,) int indices into gt_masks (:func:`targets.roi_targets`
      'matched_gt').
    rois: (S, 4) boxes (x1, y1, x2, y2) in image pixels.
    size: output side (torchvision: the mask logits' side, 28).

  Computed in the dtype of `rois` promoted to at least float32 (torchvision
  casts the masks to the RoIs' dtype).
  """
  if gt_masks.ndim != 3:
    raise ValueError(f"gt_masks must be (M, H, W), got shape {gt_masks.shape}")
  if rois.ndim != 2 or rois.shape[1] != 4:
    raise ValueError(f"rois must be (S, 4) boxes (x1, y1, x2, y2), got shape {rois.shape}")
  _check_shape("matched_gt", matched_gt, rois.shape[:1])
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    raise ValueError(f"size must be a positive int, got {size!r}")
  height, width = gt_masks.shape[1:]
  rois = rois.astype(jnp.promote_types(rois.dtype, jnp.float32))

  def one_roi(args):
    roi, gt_index = args
    mask = gt_masks[gt_index].astype(rois.dtype)
    rows = _adaptive_axis_weights(roi[1], roi[3], height, size)
    cols = _adaptive_axis_weights(roi[0], roi[2], width, size)
    highest = jax.lax.Precision.HIGHEST
    return jnp.dot(jnp.dot(rows, mask, precision=highest), cols.T, precision=highest)

  return jax.lax.map(one_roi, (rois, matched_gt.astype(jnp.int32)))


def _window_mass_from(first: jax.Array, step: jax.Array, count: jax.Array,
                      edge: jax.Array) -> jax.Array:
  """sum_i |[x_i, x_i + 1) n [edge, inf)| over x_i = first + i step, i < count, in closed form.

  Samples at x_i >= edge count 1, those in (edge - 1, edge) count x_i + 1 - edge
  (consecutive i: an arithmetic series), the rest 0. `count` may be data
  dependent: no array has a samples axis. Broadcasts its arguments.
  """
  full_from = jnp.clip(jnp.ceil((edge - first) / step), 0, count)
  part_from = jnp.clip(jnp.floor((edge - 1 - first) / step) + 1, 0, full_from)
  parts = full_from - part_from
  return (count - full_from + parts * (first + 1 - edge)
          + step * parts * (part_from + full_from - 1) / 2)


def _patch_axis_weights(start: jax.Array, end: jax.Array, box_start: jax.Array,
                        box_end: jax.Array, cells: int, bins: int) -> jax.Array:
  """One axis of RoIAlign (aligned=False, adaptive grid) of a mask known on a box's cells.

  The RoI side [start, end] is cut into `bins` bins with g = ceil(b) samples
  each, at the kernel's start + p b + (i + 0.5) b / g (as
  :func:`_adaptive_axis_weights`). A bilinear sample at x with pixel r at
  coordinate r (aligned=False) is the mean of the pixels' indicator over the
  unit window [x, x + 1) of the image plane (pixel r covers [r, r + 1)), as
  the tent weights 1 - |x - r| are the overlaps of [x, x + 1) with [r, r + 1).
  With the mask constant on each of the `cells` equal cells of the box side
  [box_start, box_end) (the area-averaged patch) and 0 outside, the sample
  weighs cell k by its overlap with the window. Returns W (bins, cells),
  W[p, k] = the mean over bin p's samples of those overlaps, so that a bin
  of the 2-D target is (W_y patch W_x^T)[p, q].
  """
  length = jnp.maximum(end - start, 1)  # "Force malformed ROIs to be 1x1"
  bin_size = length / bins
  grid = jnp.ceil(bin_size)
  step = bin_size / grid
  first = start + jnp.arange(bins, dtype=start.dtype) * bin_size + 0.5 * step
  box_end = jnp.maximum(box_end, box_start)  # an inverted box is empty, as its mask
  fractions = jnp.arange(cells + 1, dtype=start.dtype) / cells
  edges = box_start + (box_end - box_start) * fractions
  mass = _window_mass_from(first[:, None], step, grid, edges[None, :])  # (bins, cells + 1)
  return (mass[:, :-1] - mass[:, 1:]) / grid


def mask_targets_from_patches(patches: jax.Array, gt_boxes: jax.Array, matched_gt: jax.Array,
                              rois: jax.Array, size: int = 28) -> jax.Array:
  """:func:`mask_targets` for one image from box-relative mask patches: (S, size, size).

  The patches (the detection modality's 'mask_patches', ``mask_patch_size``
  > 0) hold each object's mask area-averaged over a P x P grid of equal cells
  covering exactly its box: the fraction of each cell the mask covers. Read
  as a mask constant on each cell and 0 outside the box, this gives
  torchvision's project_masks_on_boxes (RoIAlign, aligned=False, the adaptive
  ceil(roi_side / size) samples per bin and axis) in closed form: an
  aligned=False bilinear sample at (x, y) is the mean of the mask over the
  unit square [x, x + 1) x [y, y + 1), which :func:`_patch_axis_weights`
  integrates over the cells, summed over all of a bin's samples at once, so
  the sampling is torchvision's exactly whatever the RoI size. target =
  W_y (S, size, P) . patch (P, P) . W_x^T.

  The result equals :func:`mask_targets` of the full masks (up to float32
  rounding) when each object's mask is constant on its patch's cells (e.g. a
  mask filling its integer box) and has no pixel outside its box; otherwise
  the difference is the patch's resolution: each cell's pixels are smeared to
  their mean, ~box side / P pixels, and resized pixels straddling a
  non-integer box edge count only inside the box (on generated shapes of 5
  to 700 pixels at P = 56: mean |difference| 0.002 to 0.01, IoU of the
  0.5-thresholded targets 0.98 to 0.998; tests/test_detection_losses.py).
  Not reproduced: roi_align's image-border rules (a sample within one
  pixel of the padded image's far edge reads the last row whole), which
  matter only for objects touching that edge when the image fills the
  padding; RoIs are expected inside the image (rpn_proposals clips them,
  ground-truth boxes are clamped). Cost ~S size P (P + size) multiply-adds, no
  (S, H, W) arrays.

  Args:
    patches: (M, P, P) float masks of the padded ground truth on their boxes' cells.
    gt_boxes: (M, 4) the boxes (x1, y1, x2, y2) the patches cover, image pixels.
    matched_gt: (S,) int indices into patches (:func:`targets.roi_targets` 'matched_gt').
    rois: (S, 4) boxes (x1, y1, x2, y2) in image pixels.
    size: output side (torchvision: the mask logits' side, 28).

  Computed in the dtype of `rois` promoted to at least float32.
  """
  if patches.ndim != 3 or patches.shape[1] != patches.shape[2]:
    raise ValueError(f"patches must be (M, P, P), got shape {patches.shape}")
  _check_shape("gt_boxes", gt_boxes, (patches.shape[0], 4))
  if rois.ndim != 2 or rois.shape[1] != 4:
    raise ValueError(f"rois must be (S, 4) boxes (x1, y1, x2, y2), got shape {rois.shape}")
  _check_shape("matched_gt", matched_gt, rois.shape[:1])
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    raise ValueError(f"size must be a positive int, got {size!r}")
  cells = patches.shape[1]
  dtype = jnp.promote_types(rois.dtype, jnp.float32)
  rois = rois.astype(dtype)
  matched_gt = matched_gt.astype(jnp.int32)
  boxes = gt_boxes.astype(dtype)[matched_gt]
  axis_weights = jax.vmap(_patch_axis_weights, in_axes=(0, 0, 0, 0, None, None))
  rows = axis_weights(rois[:, 1], rois[:, 3], boxes[:, 1], boxes[:, 3], cells, size)
  cols = axis_weights(rois[:, 0], rois[:, 2], boxes[:, 0], boxes[:, 2], cells, size)
  highest = jax.lax.Precision.HIGHEST
  return jnp.einsum("spk,skl,sql->spq", rows, patches.astype(dtype)[matched_gt], cols,
                    precision=highest)


def maskrcnn_loss(mask_logits: jax.Array, labels: jax.Array, targets: jax.Array,
                  positive: jax.Array) -> jax.Array:
  """torchvision's maskrcnn_loss: per-pixel BCE on each positive RoI's own class channel.

  Args:
    mask_logits: (..., S, H, W, K) logits.
    labels: (..., S) int in [0, K), the RoIs' classes.
    targets: (..., S, H, W) from :func:`mask_targets`.
    positive: (..., S) bool, the RoIs that count.

  Returns:
    The mean over all H W pixels of all positive RoIs; 0 without positives.
  """
  leading = labels.shape
  _check_shape("mask_logits", mask_logits, (*leading, *mask_logits.shape[-3:]))
  _check_shape("targets", targets, (*leading, *mask_logits.shape[-3:-1]))
  _check_shape("positive", positive, leading)
  positive = positive.astype(bool)
  logits = jnp.take_along_axis(mask_logits.astype(jnp.float32),
                               labels.astype(jnp.int32)[..., None, None, None], axis=-1)[..., 0]
  pixels = targets.shape[-1] * targets.shape[-2]
  return _mean_over(_bce_with_logits(logits, targets.astype(jnp.float32)),
                    positive[..., None, None], jnp.sum(positive) * pixels)


def keypoint_targets(gt_keypoints: jax.Array, matched_gt: jax.Array, rois: jax.Array,
                     heatmap_size: int = 56) -> tuple[jax.Array, jax.Array]:
  """torchvision's keypoints_to_heatmap for one image.

  A keypoint (x, y) of the RoI's matched ground truth goes to heatmap cell
  (floor((x - x1) size / (x2 - x1)), floor((y - y1) size / (y2 - y1))),
  with x == x2 (y == y2) put in the last column (row); it is valid when
  inside the heatmap and labelled (visibility > 0).

  Args:
    gt_keypoints: (M, K, 3) (x, y, visibility) of the padded ground truth.
    matched_gt: (S,) int indices into gt_keypoints.
    rois: (S, 4) boxes (x1, y1, x2, y2).
    heatmap_size: the heatmaps' side (56).

  Returns:
    targets (S, K) int32, the cell y * size + x (0 where invalid), and
    valid (S, K) bool.
  """
  if gt_keypoints.ndim != 3 or gt_keypoints.shape[2] != 3:
    raise ValueError(f"gt_keypoints must be (M, K, 3) as (x, y, visibility), got shape "
                     f"{gt_keypoints.shape}")
  if rois.ndim != 2 or rois.shape[1] != 4:
    raise ValueError(f"rois must be (S, 4) boxes (x1, y1, x2, y2), got shape {rois.shape}")
  _check_shape("matched_gt", matched_gt, rois.shape[:1])
  if not isinstance(heatmap_size, int) or isinstance(heatmap_size, bool) or heatmap_size < 1:
    raise ValueError(f"heatmap_size must be a positive int, got {heatmap_size!r}")
  rois = rois.astype(jnp.float32)
  keypoints = gt_keypoints.astype(jnp.float32)[matched_gt.astype(jnp.int32)]

  def cell(coord, low, high):
    # NaN / inf (empty RoIs) fail the range test below, as torchvision's long() of them does.
    index = jnp.floor((coord - low[:, None]) * (heatmap_size / (high - low))[:, None])
    return jnp.where(coord == high[:, None], heatmap_size - 1, index)

  x = cell(keypoints[..., 0], rois[:, 0], rois[:, 2])
  y = cell(keypoints[..., 1], rois[:, 1], rois[:, 3])
  valid = ((x >= 0) & (y >= 0) & (x < heatmap_size) & (y < heatmap_size)
           & (keypoints[..., 2] > 0))
  targets = jnp.where(valid, y * heatmap_size + x, 0).astype(jnp.int32)
  return targets, valid


def keypoint_loss(heatmap_logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
  """torchvision's keypointrcnn_loss: softmax cross-entropy over the heatmap cells.

  Args:
    heatmap_logits: (..., S, H, W, K) logits, H = W.
    targets: (..., S, K) int cells y * W + x (:func:`keypoint_targets`).
    valid: (..., S, K) bool: visible keypoints of positive RoIs.

  Returns:
    The mean over valid keypoints of the whole batch; 0 without any (as
    torchvision's ``keypoint_logits.sum() * 0``).
  """
  *leading, height, width, num_keypoints = heatmap_logits.shape
  if height != width:
    raise ValueError(f"heatmap_logits must be square (..., S, H, W, K) with H = W, got shape "
                     f"{heatmap_logits.shape}")
  _check_shape("targets", targets, (*leading, num_keypoints))
  _check_shape("valid", valid, (*leading, num_keypoints))
  logits = heatmap_logits.astype(jnp.float32).reshape(*leading, height * width, num_keypoints)
  log_probs = jax.nn.log_softmax(logits, axis=-2)
  cross_entropy = -jnp.take_along_axis(log_probs, targets.astype(jnp.int32)[..., None, :],
                                       axis=-2)[..., 0, :]
  valid = valid.astype(bool)
  return _mean_over(cross_entropy, valid, jnp.sum(valid))
