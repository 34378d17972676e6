"""Training targets of the RPN and the RoI heads, with static shapes.

* :func:`sample_balanced`: torchvision's ``BalancedPositiveNegativeSampler``
  (``models/detection/_utils.py``): at most ``int(batch_size_per_image *
  positive_fraction)`` positives drawn uniformly at random, then negatives up
  to ``batch_size_per_image`` in all.
* :func:`rpn_targets`: ``RegionProposalNetwork.assign_targets_to_anchors``
  (``models/detection/rpn.py``): anchors matched to the ground truth by IoU
  with ``Matcher(0.7, 0.3, allow_low_quality_matches=True)`` (Ren et al.,
  Faster R-CNN, sec. 3.1.2).
* :func:`roi_targets`: ``RoIHeads.select_training_samples``
  (``models/detection/roi_heads.py``): ground-truth boxes appended to the
  proposals, ``Matcher(0.5, 0.5)``, ``batch_size_per_image`` RoIs sampled with
  ``positive_fraction`` positives, box targets encoded with weights (10, 10,
  5, 5).

Ground truth is padded to a fixed M with a validity mask (the matcher needs
M >= 1: pad images without objects with one invalid row); per-image functions
batch with ``jax.vmap``. torchvision's variable-length index lists become
fixed-size masks or slots.

Sampling. torchvision takes ``randperm(n)[:k]`` of the eligible elements;
here every element draws a random 31-bit priority and ``lax.top_k`` of the
eligible priorities gives the same distribution (a uniformly random k-subset;
equal priorities, about N^2 / 2^32 pairs among N elements, go to the lower
index). Random streams differ from torchvision's, so the tests compare the
deterministic parts exactly and the sampler by its counts and frequencies.

Crowd regions. torchvision's reference training drops ``iscrowd`` annotations
before they reach the model (``references/detection/coco_utils.py``,
``ConvertCocoPolysToMask``); Detectron instead makes anchors overlapping a
crowd region neither positive nor negative. The optional ``gt_is_crowd``
follows torchvision: crowd boxes take no part in matching (as if absent),
and :func:`roi_targets` does not append them as proposals.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from nonlocal_jax.detection.boxes import box_iou
from nonlocal_jax.detection.matcher import BELOW_LOW_THRESHOLD, match
from nonlocal_jax.detection.proposals import ROI_BOX_CODER


def _check_sampler_args(batch_size_per_image: int, positive_fraction: float) -> None:
  if (not isinstance(batch_size_per_image, int) or isinstance(batch_size_per_image, bool)
      or batch_size_per_image < 1):
    raise ValueError(f"batch_size_per_image must be a positive int, got {batch_size_per_image!r}")
  if (not isinstance(positive_fraction, numbers.Real) or isinstance(positive_fraction, bool)
      or not 0 <= positive_fraction <= 1):
    raise ValueError(f"positive_fraction must be a number in [0, 1], got {positive_fraction!r}")


def _check_vector(name: str, value: jax.Array, length: int) -> None:
  if value.shape != (length,):
    raise ValueError(f"{name} must be ({length},), got shape {value.shape}")


def _check_boxes(name: str, boxes: jax.Array) -> None:
  if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] < 1:
    raise ValueError(f"{name} must be (N, 4) boxes (x1, y1, x2, y2) with N >= 1 (pad with "
                     f"invalid rows), got shape {boxes.shape}")


def _top_eligible(eligible: jax.Array, priority: jax.Array,
                  k: int) -> tuple[jax.Array, jax.Array]:
  """The (at most) k eligible elements of highest priority.

  (N,) bool, (N,) non-negative int32 -> indices (k,) int32 in decreasing
  priority and (k,) bool, False for slots beyond the eligible count.
  """
  values, index = jax.lax.top_k(jnp.where(eligible, priority, -1), min(k, priority.shape[0]))
  pad = k - index.shape[0]
  return (jnp.pad(index.astype(jnp.int32), (0, pad)),
          jnp.pad(values >= 0, (0, pad), constant_values=False))


def _sample_slots(labels: jax.Array, key: jax.Array, batch_size_per_image: int,
                  positive_fraction: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """BalancedPositiveNegativeSampler as S = batch_size_per_image slots of indices.

  labels (N,): >= 1 positive, 0 negative, anything else ignored. Returns
  index (S,) int32 into labels, valid (S,) and positive (S,) bool: the sampled
  positives fill slots [0, n_pos), n_pos <= int(S * positive_fraction), the
  sampled negatives the next min(#negatives, S - n_pos) slots, the rest are
  invalid (index 0). Each group is in random order.
  """
  slots = batch_size_per_image
  num_pos_max = int(slots * positive_fraction)  # torchvision truncates the same way
  priority = (jax.random.bits(key, labels.shape, jnp.uint32) >> 1).astype(jnp.int32)
  # At least one positive column, so that the gather below has something to read.
  pos_index, pos_ok = _top_eligible(labels >= 1, priority, max(num_pos_max, 1))
  pos_ok = pos_ok & (jnp.arange(pos_ok.shape[0]) < num_pos_max)
  neg_index, neg_ok = _top_eligible(labels == 0, priority, slots)
  num_pos = jnp.sum(pos_ok)
  slot = jnp.arange(slots)
  is_pos = slot < num_pos
  neg_slot = jnp.maximum(slot - num_pos, 0)
  index = jnp.where(is_pos, pos_index[jnp.minimum(slot, pos_index.shape[0] - 1)],
                    neg_index[neg_slot])
  valid = is_pos | neg_ok[neg_slot]
  return jnp.where(valid, index, 0), valid, is_pos


def sample_balanced(labels: jax.Array, key: jax.Array, batch_size_per_image: int,
                    positive_fraction: float) -> tuple[jax.Array, jax.Array]:
  """torchvision's BalancedPositiveNegativeSampler for one image.

  Args:
    labels: (N,) with 1 (or any value >= 1) positive, 0 negative, -1
      ignored.
    key: a ``jax.random`` key.
    batch_size_per_image: elements to sample (RPN: 256, RoI heads: 512).
    positive_fraction: at most ``int(batch_size_per_image * positive_fraction)``
      positives (RPN: 0.5, RoI heads: 0.25); negatives fill the rest.

  Returns:
    (positive (N,) bool, negative (N,) bool): the sampled elements, each a
    uniformly random subset of its kind of size min(#positives,
    int(batch_size_per_image * positive_fraction)) and min(#negatives,
    batch_size_per_image - that).
  """
  _check_sampler_args(batch_size_per_image, positive_fraction)
  if labels.ndim != 1 or labels.shape[0] < 1:
    raise ValueError(f"labels must be (N,) with N >= 1, got shape {labels.shape}")
  index, valid, positive = _sample_slots(labels, key, batch_size_per_image, positive_fraction)
  n = labels.shape[0]
  empty = jnp.zeros((n,), bool)
  # Unsampled slots scatter out of range and are dropped.
  return (empty.at[jnp.where(positive, index, n)].set(True, mode="drop"),
          empty.at[jnp.where(valid & ~positive, index, n)].set(True, mode="drop"))


def _usable_gt(gt_valid: jax.Array, gt_is_crowd: jax.Array | None) -> jax.Array:
  gt_valid = gt_valid.astype(bool)
  return gt_valid if gt_is_crowd is None else gt_valid & ~gt_is_crowd.astype(bool)


def rpn_targets(anchors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array,
                gt_is_crowd: jax.Array | None = None, *, fg_iou: float = 0.7,
                bg_iou: float = 0.3) -> tuple[jax.Array, jax.Array]:
  """RegionProposalNetwork.assign_targets_to_anchors for one image.

  Args:
    anchors: (A, 4) anchors (``anchors.anchors_for_levels``).
    gt_boxes: (M, 4) padded ground-truth boxes, M >= 1.
    gt_valid: (M,) bool, False for padding rows.
    gt_is_crowd: optional (M,) bool; crowd boxes are left out of matching
      (see the module docstring).
    fg_iou, bg_iou: the Matcher's thresholds (torchvision's RPN: 0.7, 0.3);
      low-quality matches are allowed, as there.

  Returns:
    labels (A,) float32: 1 matched (IoU >= fg_iou or the best anchor of some
    ground truth), 0 background (IoU < bg_iou; every anchor of an image
    without usable ground truth, as torchvision), -1 ignored (in between).
    matched_boxes (A, 4): the matched ground-truth box of each positive
    anchor, 0 elsewhere (torchvision holds ground truth 0 there, or zeros
    without ground truth; the loss reads positives only).
  """
  _check_boxes("anchors", anchors)
  _check_boxes("gt_boxes", gt_boxes)
  num_gt = gt_boxes.shape[0]
  _check_vector("gt_valid", gt_valid, num_gt)
  if gt_is_crowd is not None:
    _check_vector("gt_is_crowd", gt_is_crowd, num_gt)
  matches = match(box_iou(gt_boxes, anchors), _usable_gt(gt_valid, gt_is_crowd), fg_iou, bg_iou,
                  allow_low_quality_matches=True)
  positive = matches >= 0
  labels = jnp.where(positive, 1.0, jnp.where(matches == BELOW_LOW_THRESHOLD, 0.0, -1.0))
  matched_boxes = jnp.where(positive[:, None], gt_boxes[jnp.maximum(matches, 0)], 0)
  return labels.astype(jnp.float32), matched_boxes.astype(jnp.float32)


def roi_targets(proposals: jax.Array, proposal_valid: jax.Array, gt_boxes: jax.Array,
                gt_labels: jax.Array, gt_valid: jax.Array, key: jax.Array,
                batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                fg_iou: float = 0.5, bg_iou: float = 0.5, *,
                gt_is_crowd: jax.Array | None = None) -> dict[str, jax.Array]:
  """RoIHeads.select_training_samples for one image: S = batch_size_per_image sampled RoIs.

  The candidates are the P proposals followed by the M ground-truth boxes
  (``add_gt_proposals``), the invalid ones of either never sampled. Each is
  matched with ``Matcher(fg_iou, bg_iou, allow_low_quality_matches=False)``:
  IoU >= fg_iou takes its ground truth's label, IoU < bg_iou is background
  (0), in between ignored; then :func:`sample_balanced`'s rule picks the RoIs.

  Args:
    proposals: (P, 4) proposals (``proposals.rpn_proposals``), P >= 1.
    proposal_valid: (P,) bool.
    gt_boxes: (M, 4) padded ground-truth boxes, M >= 1.
    gt_labels: (M,) int classes in 1..K-1 (0 is the background).
    gt_valid: (M,) bool, False for padding rows.
    key: a ``jax.random`` key.
    batch_size_per_image, positive_fraction: torchvision's 512, 0.25.
    fg_iou, bg_iou: torchvision's 0.5, 0.5.
    gt_is_crowd: optional (M,) bool; crowd boxes are neither matched nor
      appended (see the module docstring).

  Returns:
    A dict of S-slot arrays. The positives fill slots [0, n_pos) with n_pos <=
    int(S * positive_fraction) (so the first int(S * positive_fraction) slots
    hold every positive, for the mask and keypoint heads), the negatives
    follow, then invalid slots; each group in random order (torchvision orders
    the sampled RoIs by candidate index):

    * 'boxes' (S, 4): the sampled RoIs, 0 in invalid slots.
    * 'valid' (S,) bool: sampled slots.
    * 'positive' (S,) bool: sampled positives.
    * 'labels' (S,) int32: the matched class of positives, 0 elsewhere.
    * 'regression_targets' (S, 4): BoxCoder((10, 10, 5, 5)) encoding of the
      matched ground truth of positives, 0 elsewhere (torchvision also
      encodes ground truth 0 for negatives, -inf without ground truth; the
      loss reads positives only).
    * 'matched_gt' (S,) int32: index into the padded ground truth of
      positives, 0 elsewhere (torchvision's clamped ``matched_idxs``).
  """
  _check_sampler_args(batch_size_per_image, positive_fraction)
  _check_boxes("proposals", proposals)
  _check_boxes("gt_boxes", gt_boxes)
  _check_vector("proposal_valid", proposal_valid, proposals.shape[0])
  num_gt = gt_boxes.shape[0]
  for name, value in (("gt_labels", gt_labels), ("gt_valid", gt_valid),
                      ("gt_is_crowd", gt_is_crowd)):
    if value is not None:
      _check_vector(name, value, num_gt)
  gt_ok = _usable_gt(gt_valid, gt_is_crowd)
  gt_boxes = gt_boxes.astype(proposals.dtype)
  candidates = jnp.concatenate([proposals, gt_boxes])
  candidate_valid = jnp.concatenate([proposal_valid.astype(bool), gt_ok])
  matches = match(box_iou(gt_boxes, candidates), gt_ok, fg_iou, bg_iou,
                  allow_low_quality_matches=False)
  gt_index = jnp.maximum(matches, 0)
  labels = jnp.where(matches >= 0, gt_labels.astype(jnp.int32)[gt_index],
                     jnp.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
  labels = jnp.where(candidate_valid, labels, -1)
  index, valid, positive = _sample_slots(labels, key, batch_size_per_image, positive_fraction)
  boxes = jnp.where(valid[:, None], candidates[index], 0)
  matched_gt = jnp.where(positive, gt_index[index], 0)
  # Encode positives only; elsewhere a unit box against itself, so no 0 / 0.
  unit = jnp.asarray([0, 0, 1, 1], boxes.dtype)
  reference = jnp.where(positive[:, None], boxes, unit)
  matched = jnp.where(positive[:, None], gt_boxes[matched_gt], unit)
  regression_targets = jnp.where(positive[:, None], ROI_BOX_CODER.encode(matched, reference), 0)
  return {
      "boxes": boxes,
      "valid": valid,
      "positive": positive,
      "labels": jnp.where(positive, labels[index], 0),
      "regression_targets": regression_targets,
      "matched_gt": matched_gt,
  }
