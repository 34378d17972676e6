"""From head outputs to boxes, with static shapes: RPN proposals and final detections.

* :func:`rpn_proposals`: torchvision ``RegionProposalNetwork.filter_proposals``
  (``models/detection/rpn.py``): per level the top ``pre_nms_top_n``
  anchors by objectness, decoded (box coder weights 1, 1, 1, 1), clipped to the
  image, small boxes and low scores dropped, NMS within each level, the best
  ``post_nms_top_n`` over all levels.
* :func:`detections`: torchvision ``RoIHeads.postprocess_detections``
  (``models/detection/roi_heads.py``): class-specific boxes (weights 10, 10,
  5, 5), softmax scores, background dropped, scores above a threshold, small
  boxes dropped, NMS within each class, the best ``detections_per_image``.

Every output has a fixed number of slots and a validity mask instead of
torchvision's variable-length lists; the valid slots hold torchvision's
results in the same order. One deviation, made for static shapes:
:func:`detections` runs NMS on the ``max_candidates`` highest-scoring
(proposal, class) pairs, where torchvision takes every pair above the score
threshold; the two agree whenever at most ``max_candidates`` pairs pass the
threshold (the default, 4000, is 4 per proposal at 1000 proposals).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nonlocal_jax.detection.boxes import BoxCoder, clip_boxes_to_image, small_boxes_mask
from nonlocal_jax.detection.nms import batched_nms

RPN_BOX_CODER = BoxCoder((1.0, 1.0, 1.0, 1.0))
ROI_BOX_CODER = BoxCoder((10.0, 10.0, 5.0, 5.0))


def _at_least_float32(dtype) -> jnp.dtype:
  """Box arithmetic in float32 for bfloat16 heads, float64 when the model runs in float64."""
  return jnp.promote_types(dtype, jnp.float32)


def _per_level_top_k(logits: jax.Array, level_counts: Sequence[int],
                     top_n: int) -> tuple[jax.Array, np.ndarray]:
  """(N,) objectness -> indices of the top min(top_n, n_l) of every level, and their levels."""
  indices, levels, offset = [], [], 0
  for level, count in enumerate(level_counts):
    k = min(top_n, count)
    _, top = jax.lax.top_k(logits[offset:offset + count], k)
    indices.append(top + offset)
    levels.append(np.full(k, level, np.int32))
    offset += count
  return jnp.concatenate(indices), np.concatenate(levels)


def rpn_proposals(objectness: jax.Array, deltas: jax.Array, anchors: np.ndarray,
                  level_counts: Sequence[int], image_sizes: jax.Array, *, pre_nms_top_n: int,
                  post_nms_top_n: int, nms_threshold: float = 0.7, min_size: float = 1e-3,
                  score_threshold: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Region proposals of a batch.

  Args:
    objectness: (B, N) logits, N anchors in the order of `anchors`.
    deltas: (B, N, 4) box regression.
    anchors: (N, 4) anchors of the padded input (``anchors.anchors_for_levels``).
    level_counts: anchors per FPN level (sums to N).
    image_sizes: (B, 2) (height, width) of each image before padding.
    pre_nms_top_n / post_nms_top_n: torchvision's 2000 / 2000 in training and
      1000 / 1000 in testing.

  Returns:
    boxes (B, P, 4), scores (B, P) (sigmoid of the objectness) and valid
    (B, P) with P = post_nms_top_n; valid slots are in decreasing score order.
  """
  if sum(level_counts) != objectness.shape[1] or anchors.shape[0] != objectness.shape[1]:
    raise ValueError(f"level_counts {tuple(level_counts)} (sum {sum(level_counts)}) and anchors "
                     f"{anchors.shape} must match the {objectness.shape[1]} objectness columns")

  def one_image(logits, image_deltas, size):
    top, levels = _per_level_top_k(logits, level_counts, pre_nms_top_n)
    boxes = RPN_BOX_CODER.decode(image_deltas[top], jnp.asarray(anchors)[top])
    boxes = clip_boxes_to_image(boxes, size[0], size[1])
    scores = jax.nn.sigmoid(logits[top])
    valid = small_boxes_mask(boxes, min_size) & (scores >= score_threshold)
    keep, keep_valid = batched_nms(boxes, scores, jnp.asarray(levels), nms_threshold,
                                   post_nms_top_n, valid)
    return boxes[keep], scores[keep], keep_valid

  dtype = _at_least_float32(objectness.dtype)
  return jax.vmap(one_image)(objectness.astype(dtype), deltas.astype(dtype), image_sizes)


def detections(class_logits: jax.Array, box_deltas: jax.Array, proposals: jax.Array,
               proposal_valid: jax.Array, image_sizes: jax.Array, *,
               score_threshold: float = 0.05, nms_threshold: float = 0.5,
               detections_per_image: int = 100, min_size: float = 1e-2,
               max_candidates: int = 4000) -> dict[str, jax.Array]:
  """Final boxes of a batch from the box head's outputs on its proposals.

  Args:
    class_logits: (B, P, K) logits, class 0 the background.
    box_deltas: (B, P, K, 4) class-specific regression.
    proposals: (B, P, 4) and proposal_valid (B, P).
    image_sizes: (B, 2) (height, width) before padding.

  Returns:
    {'boxes' (B, D, 4), 'scores' (B, D), 'labels' (B, D) in 1..K-1, 'valid'
    (B, D)}, D = detections_per_image, valid slots by decreasing score.
  """
  num_classes = class_logits.shape[-1]

  def one_image(logits, deltas, boxes, valid, size):
    pred = ROI_BOX_CODER.decode(deltas, boxes[:, None])
    pred = clip_boxes_to_image(pred, size[0], size[1])[:, 1:].reshape(-1, 4)
    scores = jax.nn.softmax(logits, axis=-1)[:, 1:].reshape(-1)
    labels = jnp.broadcast_to(jnp.arange(1, num_classes), (logits.shape[0], num_classes - 1))
    ok = (jnp.repeat(valid, num_classes - 1) & (scores > score_threshold)
          & small_boxes_mask(pred, min_size))
    k = min(max_candidates, scores.shape[0])
    _, candidates = jax.lax.top_k(jnp.where(ok, scores, -1.0), k)
    keep, keep_valid = batched_nms(pred[candidates], scores[candidates],
                                   labels.reshape(-1)[candidates], nms_threshold,
                                   detections_per_image, ok[candidates])
    chosen = candidates[keep]
    return {"boxes": pred[chosen], "scores": scores[chosen],
            "labels": labels.reshape(-1)[chosen], "valid": keep_valid}

  dtype = _at_least_float32(class_logits.dtype)
  return jax.vmap(one_image)(class_logits.astype(dtype), box_deltas.astype(dtype),
                             proposals.astype(dtype), proposal_valid, image_sizes)
