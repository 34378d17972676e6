"""torchvision.models.detection._utils.Matcher with padded ground truth.

Each prediction n (anchor / proposal) takes the ground truth m of highest
quality (IoU) q[m, n], the first such m on ties. If that quality is below
``low_threshold`` it becomes BELOW_LOW_THRESHOLD, if in [low_threshold,
high_threshold) BETWEEN_THRESHOLDS. With ``allow_low_quality_matches``
(Faster R-CNN's RPN rule, Ren et al. 2015 sec. 3.1.2), every prediction that
attains some ground truth's highest quality, ties included, gets its best
ground truth back even when below the thresholds (``set_low_quality_matches_``).

Invalid (padded) ground-truth rows are ignored. With no valid ground truth
every prediction is BELOW_LOW_THRESHOLD (torchvision raises instead).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def match(quality: jax.Array, gt_valid: jax.Array, high_threshold: float, low_threshold: float,
          allow_low_quality_matches: bool) -> jax.Array:
  """(M, N) quality (IoU of gt m and prediction n), (M,) gt_valid -> (N,) int32 matches.

  Entries are a valid gt index in [0, M), BELOW_LOW_THRESHOLD or BETWEEN_THRESHOLDS.
  """
  if quality.ndim != 2 or 0 in quality.shape:
    raise ValueError(f"quality must be (M gt, N predictions) with M, N >= 1 (pad the ground "
                     f"truth and mark it in gt_valid), got shape {quality.shape}")
  if gt_valid.shape != quality.shape[:1]:
    raise ValueError(f"gt_valid must be (M,) = {quality.shape[:1]}, got shape {gt_valid.shape}")
  if not low_threshold <= high_threshold:
    raise ValueError(f"low_threshold={low_threshold!r} must be <= high_threshold="
                     f"{high_threshold!r}")
  quality = jnp.where(gt_valid[:, None], quality, -jnp.inf)
  matched_vals = jnp.max(quality, axis=0)
  all_matches = jnp.argmax(quality, axis=0).astype(jnp.int32)
  matches = jnp.where(matched_vals < low_threshold, BELOW_LOW_THRESHOLD,
                      jnp.where(matched_vals < high_threshold, BETWEEN_THRESHOLDS, all_matches))
  if allow_low_quality_matches:
    highest_quality_foreach_gt = jnp.max(quality, axis=1, keepdims=True)
    attains_highest = (quality == highest_quality_foreach_gt) & gt_valid[:, None]
    matches = jnp.where(jnp.any(attains_highest, axis=0), all_matches, matches)
  return matches.astype(jnp.int32)
