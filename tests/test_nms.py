"""nms / batched_nms against torchvision.ops.nms / batched_nms on the valid boxes.

Boxes are drawn in a few dense clusters so that most boxes overlap several
others at IoUs on both sides of the thresholds. Scores are distinct except in
the tie test, where torchvision leaves the order of equal scores unspecified
and only the validity of the kept set as a greedy NMS result is checked.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from nonlocal_jax.detection.boxes import box_iou
from nonlocal_jax.detection.nms import FILL_INDEX, batched_nms, nms

STATIC = ("iou_threshold", "max_output_size", "tile_size")
jit_nms = jax.jit(nms, static_argnames=STATIC)
jit_batched_nms = jax.jit(batched_nms, static_argnames=STATIC)


def clustered_boxes(rng: np.random.Generator, n: int, num_clusters: int = 12,
                    extent: float = 600.0) -> np.ndarray:
  """(n, 4) float32 boxes around num_clusters centres, sides 10-150 px."""
  centres = rng.uniform(0, extent, (num_clusters, 2))
  sizes = rng.uniform(20, 120, (num_clusters, 2))
  cluster = rng.integers(0, num_clusters, n)
  centre = centres[cluster] + rng.normal(0, 0.15, (n, 2)) * sizes[cluster]
  half = sizes[cluster] * np.exp(rng.normal(0, 0.25, (n, 2))) / 2
  return np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)


def distinct_scores(rng: np.random.Generator, n: int) -> np.ndarray:
  return ((rng.permutation(n) + rng.uniform(0.1, 0.9, n)) / n).astype(np.float32)


def torchvision_nms(boxes, scores, valid, iou_threshold, categories=None) -> np.ndarray:
  """Indices into all boxes kept by torchvision on the valid ones."""
  subset = np.flatnonzero(valid)
  args = [torch.from_numpy(boxes[subset]), torch.from_numpy(scores[subset])]
  if categories is None:
    keep = torchvision.ops.nms(*args, iou_threshold)
  else:
    keep = torchvision.ops.batched_nms(*args, torch.from_numpy(categories[subset]), iou_threshold)
  return subset[keep.numpy()]


def assert_first_k(indices, keep_valid, reference: np.ndarray, k: int) -> None:
  indices, keep_valid = np.asarray(indices), np.asarray(keep_valid)
  num = min(k, len(reference))
  assert indices.shape == keep_valid.shape == (k,)
  np.testing.assert_array_equal(keep_valid, np.arange(k) < num)
  np.testing.assert_array_equal(indices[:num], reference[:num])
  assert (indices[num:] == FILL_INDEX).all()


@pytest.mark.parametrize("n, k, iou_threshold, tile_size, valid_fraction", [
    (500, 20, 0.5, 256, 0.8),  # K < kept, tile does not divide N
    (500, 600, 0.7, 64, 0.8),  # K > N
    (777, 300, 0.3, 100, 1.0),
    (40, 50, 0.5, 256, 0.5),  # one tile larger than N
    (3000, 1000, 0.7, 256, 0.9),
    (3000, 300, 0.7, 128, 0.9),  # stops after the tile reaching K
    (80, 12, 0.5, 1, 0.9),  # one box per tile: stops exactly at K
])
def test_nms_equals_torchvision(n, k, iou_threshold, tile_size, valid_fraction):
  rng = np.random.default_rng(n + k)
  boxes, scores = clustered_boxes(rng, n, num_clusters=min(12, n // 10)), distinct_scores(rng, n)
  valid = rng.uniform(size=n) < valid_fraction
  reference = torchvision_nms(boxes, scores, valid, iou_threshold)
  assert 5 < len(reference) < 0.8 * valid.sum()  # plenty suppressed
  indices, keep_valid = jit_nms(jnp.asarray(boxes), jnp.asarray(scores), iou_threshold, k,
                                jnp.asarray(valid), tile_size=tile_size)
  assert_first_k(indices, keep_valid, reference, k)


def test_nms_vmapped_over_images_and_without_valid():
  rng = np.random.default_rng(3)
  boxes = np.stack([clustered_boxes(rng, 300) for _ in range(3)])
  scores = np.stack([distinct_scores(rng, 300) for _ in range(3)])
  indices, keep_valid = jax.jit(jax.vmap(lambda b, s: nms(b, s, 0.6, 80, tile_size=128)))(
      jnp.asarray(boxes), jnp.asarray(scores))
  for i in range(3):
    assert_first_k(indices[i], keep_valid[i],
                   torchvision_nms(boxes[i], scores[i], np.ones(300, bool), 0.6), 80)


def test_nms_with_tied_scores_keeps_a_valid_greedy_set():
  rng = np.random.default_rng(4)
  n, iou_threshold = 600, 0.5
  boxes = clustered_boxes(rng, n)
  scores = rng.integers(0, 6, n).astype(np.float32) / 5
  valid = rng.uniform(size=n) < 0.9
  indices, keep_valid = jit_nms(jnp.asarray(boxes), jnp.asarray(scores), iou_threshold, n,
                                jnp.asarray(valid))
  kept = np.asarray(indices)[np.asarray(keep_valid)]
  iou = np.asarray(box_iou(jnp.asarray(boxes), jnp.asarray(boxes)))
  # Greedy NMS for some order of the tied boxes <=> kept boxes are valid, in non-increasing
  # score order, pairwise IoU <= threshold, and every other valid box overlaps a kept box of
  # at least its score by more than the threshold (put kept boxes first among equal scores).
  assert valid[kept].all() and len(set(kept.tolist())) == len(kept)
  assert (np.diff(scores[kept]) <= 0).all()
  # Documented tie order: equal scores by increasing index.
  assert (np.diff(kept)[np.diff(scores[kept]) == 0] > 0).all()
  assert (iou[np.ix_(kept, kept)][~np.eye(len(kept), dtype=bool)] <= iou_threshold).all()
  for j in np.setdiff1d(np.flatnonzero(valid), kept):
    assert ((iou[kept, j] > iou_threshold) & (scores[kept] >= scores[j])).any(), j
  assert len(kept) < valid.sum() / 2


@pytest.mark.parametrize("k", [15, 800])
def test_batched_nms_equals_torchvision(k):
  rng = np.random.default_rng(k)
  n = 800  # 4 N <= 4000: torchvision's CPU batched_nms takes the coordinate trick
  boxes, scores = clustered_boxes(rng, n), distinct_scores(rng, n)
  categories = rng.integers(0, 5, n)
  valid = rng.uniform(size=n) < 0.85
  # Huge invalid boxes: shifting by their coordinates would ruin the IoUs of the valid ones.
  boxes[~valid] *= 1e4
  reference = torchvision_nms(boxes, scores, valid, 0.5, categories)
  assert len(reference) > len(torchvision_nms(boxes, scores, valid, 0.5)) + 10
  indices, keep_valid = jit_batched_nms(jnp.asarray(boxes), jnp.asarray(scores),
                                        jnp.asarray(categories), 0.5, k, jnp.asarray(valid))
  assert_first_k(indices, keep_valid, reference, k)


def test_nms_of_no_valid_box_and_bad_arguments():
  boxes, scores = jnp.zeros((6, 4)), jnp.zeros(6)
  indices, keep_valid = batched_nms(boxes, scores, jnp.zeros(6, int), 0.5, 4, jnp.zeros(6, bool))
  assert not keep_valid.any() and (indices == FILL_INDEX).all()
  indices, keep_valid = nms(jnp.zeros((0, 4)), jnp.zeros(0), 0.5, 3)
  assert indices.shape == (3,) and not keep_valid.any()
  # numpy inputs under jit; four disjoint boxes of equal score, visited by index
  disjoint = np.array([[2 * i, 0, 2 * i + 1, 1] for i in range(4)], np.float32)
  indices, keep_valid = jax.jit(lambda s: nms(disjoint, s, 0.5, 2,
                                              np.array([True, False, True, True])))(scores[:4])
  np.testing.assert_array_equal(indices, [0, 2])
  assert keep_valid.all()
  for call, message in [
      (lambda: nms(boxes[:, :3], scores, 0.5, 4), r"boxes must be \(N, 4\)"),
      (lambda: nms(boxes, scores[:5], 0.5, 4), r"scores must be \(N,\)"),
      (lambda: nms(boxes, scores, 0.5, 4, jnp.ones(5, bool)), r"valid must be \(N,\)"),
      (lambda: nms(boxes, scores, 1.5, 4), "iou_threshold must be a number in"),
      (lambda: nms(boxes, scores, 0.5, 0), "max_output_size must be a positive int, got 0"),
      (lambda: nms(boxes, scores, 0.5, 4, tile_size=2.0), "tile_size"),
      (lambda: batched_nms(boxes, scores, jnp.zeros(5, int), 0.5, 4), r"categories must be"),
  ]:
    with pytest.raises(ValueError, match=message):
      call()
