"""Training targets and losses against torchvision's own functions on the same inputs.

References: torchvision.models.detection._utils.BalancedPositiveNegativeSampler,
rpn.RegionProposalNetwork (assign_targets_to_anchors, compute_loss),
roi_heads.RoIHeads.select_training_samples and roi_heads' fastrcnn_loss,
project_masks_on_boxes, maskrcnn_loss, keypoints_to_heatmap and
keypointrcnn_loss. torchvision samples with its own random stream, so where it
samples its sampler is replaced by one returning the elements ours chose (after
checking that they were eligible under torchvision's labels); our sampler is
checked on its own by counts and frequencies. Ground truth is padded (invalid
rows hold garbage), and batches include images without objects; everything
runs under jax.jit. The mask targets from box-relative patches are compared
with the exact ones (project_masks_on_boxes of the full masks).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image, ImageDraw
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from nonlocal_jax.detection.anchors import anchors_for_levels
from nonlocal_jax.detection.losses import (
    fastrcnn_loss, keypoint_loss, keypoint_targets, mask_targets, mask_targets_from_patches,
    maskrcnn_loss, rpn_loss)
from nonlocal_jax.detection.targets import rpn_targets, roi_targets, sample_balanced
from nonlocal_jax.models.registry import create_model
from nonlocal_jax.preprocessing import detection

IMAGE = (96, 128)  # (H, W)
STRIDES = (4, 8, 16, 32, 64)
SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = ((0.5, 1.0, 2.0),) * 5
F32 = {"rtol": 2e-6, "atol": 1e-6}


def random_boxes(rng: np.random.Generator, num: int, min_side: float = 6.0,
                 max_side: float = 70.0) -> np.ndarray:
  """(num, 4) float32 boxes inside IMAGE."""
  height, width = IMAGE
  side = rng.uniform(min_side, max_side, (num, 2))
  corner = rng.uniform(0, 1, (num, 2)) * (np.array([width, height]) - side)
  return np.concatenate([corner, corner + side], axis=1).astype(np.float32)


def jitter(rng: np.random.Generator, boxes: np.ndarray, scale: float) -> np.ndarray:
  """Boxes near `boxes` (proposals that overlap the ground truth)."""
  side = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
  return (boxes + rng.normal(0, scale, boxes.shape) * side).astype(np.float32)


def padded_ground_truth(rng: np.random.Generator, num_valid: int, num_crowd: int,
                        pad: int) -> dict[str, np.ndarray]:
  """Usable boxes, then crowd boxes, then padding rows of NaN / garbage, all shuffled."""
  total = num_valid + num_crowd + pad
  boxes = random_boxes(rng, total)
  boxes[num_valid + num_crowd:] = rng.choice([np.nan, -5.0, 1e4], (pad, 4))
  order = rng.permutation(total)
  valid = (np.arange(total) < num_valid + num_crowd)[order]
  crowd = ((np.arange(total) >= num_valid) & (np.arange(total) < num_valid + num_crowd))[order]
  return {"boxes": boxes[order], "valid": valid, "crowd": crowd,
          "labels": rng.integers(1, 6, total).astype(np.int32)}


class FixedSampler:
  """Stands in for torchvision's BalancedPositiveNegativeSampler: returns given masks after
  checking them against the labels torchvision computed."""

  def __init__(self, positive: list[np.ndarray], negative: list[np.ndarray]):
    self.positive, self.negative = positive, negative
    self.labels = None

  def __call__(self, labels):
    self.labels = [t.numpy() for t in labels]
    for lab, pos, neg in zip(self.labels, self.positive, self.negative):
      assert lab.shape == pos.shape and np.all(lab[pos] >= 1) and np.all(lab[neg] == 0)
    return ([torch.from_numpy(p.astype(np.uint8)) for p in self.positive],
            [torch.from_numpy(n.astype(np.uint8)) for n in self.negative])


def torch_rpn() -> RegionProposalNetwork:
  return RegionProposalNetwork(AnchorGenerator(SIZES, RATIOS), RPNHead(8, 3), 0.7, 0.3, 256, 0.5,
                               {"training": 2000, "testing": 1000},
                               {"training": 2000, "testing": 1000}, 0.7)


def expected_counts(labels: np.ndarray, batch: int, fraction: float) -> tuple[int, int]:
  """torchvision's sampled positive and negative counts."""
  num_pos = min(int(np.sum(labels >= 1)), int(batch * fraction))
  return num_pos, min(int(np.sum(labels == 0)), batch - num_pos)


# ---------------------------------------------------------------------------------------------
# Sampler


@pytest.mark.parametrize("num_pos,num_neg,num_ignored,batch,fraction", [
    (300, 3000, 500, 256, 0.5),  # both capped
    (20, 3000, 500, 256, 0.5),  # few positives: more negatives
    (300, 40, 10, 256, 0.5),  # few negatives
    (3, 4, 5, 16, 0.25),  # fewer elements than the batch
    (10, 30, 0, 16, 0.0),  # no positives allowed
    (10, 30, 0, 7, 1.0),  # only positives
])
def test_sampler_counts_and_eligibility(num_pos, num_neg, num_ignored, batch, fraction):
  rng = np.random.default_rng(num_pos + num_neg)
  labels = rng.permutation(np.repeat([1.0, 0.0, -1.0], [num_pos, num_neg, num_ignored]))
  keys = jax.random.split(jax.random.key(0), 5)
  sample = jax.jit(jax.vmap(sample_balanced, in_axes=(None, 0, None, None)), static_argnums=(2, 3))
  positive, negative = map(np.asarray, sample(jnp.asarray(labels), keys, batch, fraction))
  torch_pos, torch_neg = det_utils.BalancedPositiveNegativeSampler(batch, fraction)(
      [torch.from_numpy(labels)])
  expected = (int(torch_pos[0].sum()), int(torch_neg[0].sum()))
  assert expected == expected_counts(labels, batch, fraction)
  for pos, neg in zip(positive, negative):
    assert (pos.sum(), neg.sum()) == expected
    assert np.all(labels[pos] == 1) and np.all(labels[neg] == 0)
  # Different keys, different samples (when there is a choice).
  if num_pos > int(batch * fraction) > 0:
    assert len({p.tobytes() for p in positive}) > 1


def test_sampler_is_uniform():
  # 10 positives (2 drawn) and 15 negatives (6 drawn): element frequencies 0.2 and 0.4, and
  # each of the 45 positive pairs drawn with probability 1 / 45.
  labels = jnp.asarray([1] * 10 + [0] * 15 + [-1] * 5, jnp.int32)
  draws = 9000
  keys = jax.random.split(jax.random.key(1), draws)
  positive, negative = map(np.asarray, jax.jit(jax.vmap(
      lambda k: sample_balanced(labels, k, 8, 0.25)))(keys))
  freq = np.concatenate([positive[:, :10].mean(0), negative[:, 10:25].mean(0)])
  expected = np.array([0.2] * 10 + [0.4] * 15)
  sigma = np.sqrt(expected * (1 - expected) / draws)
  assert np.all(np.abs(freq - expected) < 5 * sigma)
  assert not positive[:, 25:].any() and not negative[:, 25:].any()
  pairs = np.unique([tuple(np.flatnonzero(p)) for p in positive], axis=0, return_counts=True)[1]
  assert len(pairs) == 45
  chi2 = np.sum((pairs - draws / 45) ** 2 / (draws / 45))
  assert chi2 < 44 + 6 * math.sqrt(2 * 44)  # mean 44, sd sqrt(88)


def test_sampler_rejects_bad_arguments():
  labels = jnp.zeros(5)
  with pytest.raises(ValueError, match="batch_size_per_image must be a positive int"):
    sample_balanced(labels, jax.random.key(0), 0, 0.5)
  with pytest.raises(ValueError, match=r"positive_fraction must be a number in \[0, 1\]"):
    sample_balanced(labels, jax.random.key(0), 8, 1.5)
  with pytest.raises(ValueError, match=r"labels must be \(N,\)"):
    sample_balanced(jnp.zeros((2, 3)), jax.random.key(0), 8, 0.5)


# ---------------------------------------------------------------------------------------------
# RPN


def rpn_batch(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
  """Three images: objects with crowd and padding, no objects at all, only crowd."""
  return [padded_ground_truth(rng, 5, 1, 2), padded_ground_truth(rng, 0, 0, 8),
          padded_ground_truth(rng, 0, 2, 6)]


def usable(gt: dict[str, np.ndarray]) -> np.ndarray:
  return gt["valid"] & ~gt["crowd"]


def test_rpn_targets_match_assign_targets_to_anchors():
  rng = np.random.default_rng(2)
  anchors, _ = anchors_for_levels(IMAGE, STRIDES, SIZES, RATIOS)
  gts = rpn_batch(rng)
  # One more image whose ground truth duplicates an anchor (IoU 1) and has low-IoU boxes.
  extra = padded_ground_truth(rng, 3, 0, 5)
  extra["boxes"][np.flatnonzero(extra["valid"])[0]] = anchors[777]
  gts.append(extra)
  stack = {k: jnp.asarray(np.stack([g[k] for g in gts])) for k in gts[0]}
  labels, matched = jax.jit(jax.vmap(rpn_targets, in_axes=(None, 0, 0, 0)))(
      jnp.asarray(anchors), stack["boxes"], stack["valid"], stack["crowd"])
  labels, matched = np.asarray(labels), np.asarray(matched)

  rpn = torch_rpn()
  anchor_list = [torch.from_numpy(anchors)] * len(gts)
  targets = [{"boxes": torch.from_numpy(g["boxes"][usable(g)])} for g in gts]
  torch_labels, torch_matched = rpn.assign_targets_to_anchors(anchor_list, targets)
  for i, (tl, tm) in enumerate(zip(torch_labels, torch_matched)):
    np.testing.assert_array_equal(labels[i], tl.numpy(), err_msg=f"image {i}")
    pos = labels[i] == 1
    np.testing.assert_array_equal(matched[i][pos], tm.numpy()[pos])
    assert not matched[i][~pos].any()
  assert (labels[0] == 1).sum() >= 5 and (labels[0] == -1).any()
  assert np.all(labels[1:3] == 0)  # no usable ground truth: all background
  assert labels[3][777] == 1


def test_crowd_boxes_are_left_out_of_matching():
  rng = np.random.default_rng(3)
  anchors, _ = anchors_for_levels(IMAGE, STRIDES, SIZES, RATIOS)
  gt = padded_ground_truth(rng, 3, 2, 1)
  with_flag = rpn_targets(jnp.asarray(anchors), jnp.asarray(gt["boxes"]),
                          jnp.asarray(gt["valid"]), jnp.asarray(gt["crowd"]))
  dropped = rpn_targets(jnp.asarray(anchors), jnp.asarray(gt["boxes"]), jnp.asarray(usable(gt)))
  kept = rpn_targets(jnp.asarray(anchors), jnp.asarray(gt["boxes"]), jnp.asarray(gt["valid"]))
  for a, b in zip(with_flag, dropped):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(with_flag[0], kept[0])


def test_rpn_loss_matches_compute_loss_and_its_gradients():
  rng = np.random.default_rng(4)
  anchors, _ = anchors_for_levels(IMAGE, STRIDES, SIZES, RATIOS)
  gts = rpn_batch(rng)
  stack = {k: jnp.asarray(np.stack([g[k] for g in gts])) for k in gts[0]}
  num_images, num_anchors = len(gts), anchors.shape[0]
  labels, matched = jax.vmap(rpn_targets, in_axes=(None, 0, 0, 0))(
      jnp.asarray(anchors), stack["boxes"], stack["valid"], stack["crowd"])
  keys = jax.random.split(jax.random.key(5), num_images)
  positive, negative = jax.vmap(sample_balanced, in_axes=(0, 0, None, None))(labels, keys, 256,
                                                                              0.5)
  objectness = rng.normal(0, 2, (num_images, num_anchors)).astype(np.float32)
  deltas = rng.normal(0, 0.3, (num_images, num_anchors, 4)).astype(np.float32)

  loss_fn = jax.jit(lambda o, d: rpn_loss(o, d, matched, jnp.asarray(anchors), positive, negative))
  ours = loss_fn(jnp.asarray(objectness), jnp.asarray(deltas))
  grads = jax.grad(lambda o, d: sum(loss_fn(o, d)), argnums=(0, 1))(jnp.asarray(objectness),
                                                                   jnp.asarray(deltas))

  rpn = torch_rpn()
  targets = [{"boxes": torch.from_numpy(g["boxes"][usable(g)])} for g in gts]
  anchor_list = [torch.from_numpy(anchors)] * num_images
  torch_labels, torch_matched = rpn.assign_targets_to_anchors(anchor_list, targets)
  regression_targets = rpn.box_coder.encode(torch_matched, anchor_list)
  rpn.fg_bg_sampler = FixedSampler(list(np.asarray(positive)), list(np.asarray(negative)))
  torch_objectness = torch.from_numpy(objectness).reshape(-1, 1).requires_grad_()
  torch_deltas = torch.from_numpy(deltas).reshape(-1, 4).requires_grad_()
  expected = rpn.compute_loss(torch_objectness, torch_deltas, torch_labels,
                              list(regression_targets))
  sum(expected).backward()
  assert all(np.isfinite(float(v)) and float(v) > 0 for v in ours)
  np.testing.assert_allclose(ours, [v.item() for v in expected], rtol=1e-5)
  # Gradients ~1 / #sampled ~1e-3: compare to 1e-6 of that.
  np.testing.assert_allclose(grads[0].reshape(-1), torch_objectness.grad[:, 0].numpy(),
                             rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(grads[1].reshape(-1, 4), torch_deltas.grad.numpy(), rtol=1e-5,
                             atol=1e-9)
  assert np.count_nonzero(grads[1]) > 0


# ---------------------------------------------------------------------------------------------
# RoI sampling


def roi_batch(rng: np.random.Generator) -> tuple[list[dict[str, np.ndarray]], np.ndarray,
                                                 np.ndarray]:
  """Three images (objects, no objects, few proposals) with 60 padded proposals each."""
  gts = [padded_ground_truth(rng, 5, 1, 2), padded_ground_truth(rng, 0, 0, 8),
         padded_ground_truth(rng, 2, 0, 6)]
  proposals, proposal_valid = [], []
  for i, gt in enumerate(gts):
    near = jitter(rng, np.repeat(gt["boxes"][usable(gt)], 6, axis=0), 0.15)
    boxes = np.concatenate([near, random_boxes(rng, 60 - len(near))])
    valid = rng.random(60) < (0.8 if i < 2 else 0.1)
    boxes[~valid] = rng.choice([np.nan, 0.0], (int((~valid).sum()), 4))
    proposals.append(boxes)
    proposal_valid.append(valid)
  return gts, np.stack(proposals), np.stack(proposal_valid)


@pytest.mark.parametrize("batch,fraction", [(16, 0.25), (512, 0.25)])
def test_roi_targets_match_select_training_samples(batch, fraction):
  rng = np.random.default_rng(6)
  gts, proposals, proposal_valid = roi_batch(rng)
  stack = {k: jnp.asarray(np.stack([g[k] for g in gts])) for k in gts[0]}
  keys = jax.random.split(jax.random.key(7), len(gts))
  fn = jax.jit(jax.vmap(lambda p, pv, b, l, v, c, k: roi_targets(
      p, pv, b, l, v, k, batch, fraction, gt_is_crowd=c)))
  ours = {k: np.asarray(v) for k, v in fn(jnp.asarray(proposals), jnp.asarray(proposal_valid),
                                          stack["boxes"], stack["labels"], stack["valid"],
                                          stack["crowd"], keys).items()}
  assert ours["boxes"].shape == (len(gts), batch, 4)

  # torchvision's candidates: the valid proposals, then the usable ground truth.
  torch_proposals = [torch.from_numpy(p[v]) for p, v in zip(proposals, proposal_valid)]
  targets = [{"boxes": torch.from_numpy(g["boxes"][usable(g)]),
              "labels": torch.from_numpy(g["labels"][usable(g)].astype(np.int64))} for g in gts]
  candidates = [np.concatenate([p[v], g["boxes"][usable(g)]])
                for p, v, g in zip(proposals, proposal_valid, gts)]
  positive_masks, negative_masks, slot_of = [], [], []
  for i, cand in enumerate(candidates):
    valid = ours["valid"][i]
    # Each sampled box is exactly one candidate.
    hits = np.all(ours["boxes"][i][valid][:, None] == cand[None], axis=-1)
    assert np.all(hits.sum(1) == 1)
    index = hits.argmax(1)
    pos, neg = np.zeros(len(cand), bool), np.zeros(len(cand), bool)
    pos[index[ours["positive"][i][valid]]] = True
    neg[index[~ours["positive"][i][valid]]] = True
    positive_masks.append(pos)
    negative_masks.append(neg)
    slot_of.append(np.flatnonzero(valid)[np.argsort(index)])  # torchvision's order
    # Positives first, at most int(S * fraction) of them, then negatives.
    num_pos = ours["positive"][i].sum()
    assert ours["positive"][i][:num_pos].all() and not ours["positive"][i][num_pos:].any()
    assert num_pos <= int(batch * fraction) and ours["valid"][i][:valid.sum()].all()

  heads = RoIHeads(None, None, None, 0.5, 0.5, batch, fraction, None, 0.05, 0.5, 100)
  heads.fg_bg_sampler = FixedSampler(positive_masks, negative_masks)
  torch_boxes, torch_matched, torch_labels, torch_regression = heads.select_training_samples(
      torch_proposals, targets)
  for i, gt in enumerate(gts):
    assert (positive_masks[i].sum(), negative_masks[i].sum()) == expected_counts(
        heads.fg_bg_sampler.labels[i], batch, fraction)
    slots = slot_of[i]
    np.testing.assert_array_equal(ours["boxes"][i][slots], torch_boxes[i].numpy())
    np.testing.assert_array_equal(ours["labels"][i][slots], torch_labels[i].numpy())
    pos = ours["positive"][i][slots]
    assert np.array_equal(pos, torch_labels[i].numpy() > 0)
    # Indices into the padded ground truth -> torchvision's into the usable rows.
    compact = np.cumsum(usable(gt)) - 1
    np.testing.assert_array_equal(compact[ours["matched_gt"][i][slots][pos]],
                                  torch_matched[i].numpy()[pos])
    np.testing.assert_allclose(ours["regression_targets"][i][slots][pos],
                               torch_regression[i].numpy()[pos], rtol=1e-5, atol=1e-5)
    assert not ours["matched_gt"][i][~ours["positive"][i]].any()
    assert not ours["regression_targets"][i][~ours["positive"][i]].any()
    assert not ours["boxes"][i][~ours["valid"][i]].any()
  num_pos = ours["positive"].sum(1)
  assert num_pos[0] > 0 and num_pos[1] == 0 and num_pos[2] > 0
  assert ours["valid"][2].sum() < batch  # fewer candidates than slots
  if batch == 16:
    assert num_pos[0] == 4 and ours["valid"][0].all()


def test_targets_reject_bad_arguments():
  boxes = jnp.zeros((3, 4))
  with pytest.raises(ValueError, match=r"gt_boxes must be \(N, 4\) boxes"):
    rpn_targets(boxes, jnp.zeros((0, 4)), jnp.zeros((0,), bool))
  with pytest.raises(ValueError, match=r"gt_valid must be \(3,\)"):
    rpn_targets(boxes, boxes, jnp.zeros((2,), bool))
  with pytest.raises(ValueError, match=r"gt_is_crowd must be \(3,\)"):
    roi_targets(boxes, jnp.ones(3, bool), boxes, jnp.ones(3, jnp.int32), jnp.ones(3, bool),
                jax.random.key(0), gt_is_crowd=jnp.zeros(4, bool))
  with pytest.raises(ValueError, match="positive_fraction must be a number"):
    roi_targets(boxes, jnp.ones(3, bool), boxes, jnp.ones(3, jnp.int32), jnp.ones(3, bool),
                jax.random.key(0), 16, -0.1)


# ---------------------------------------------------------------------------------------------
# Box head


def test_fastrcnn_loss_matches_torchvision_and_its_gradients():
  rng = np.random.default_rng(8)
  num_images, slots, classes = 3, 24, 6
  logits = rng.normal(0, 2, (num_images, slots, classes)).astype(np.float32)
  regression = rng.normal(0, 0.5, (num_images, slots, classes, 4)).astype(np.float32)
  labels = np.where(rng.random((num_images, slots)) < 0.4,
                    rng.integers(1, classes, (num_images, slots)), 0).astype(np.int32)
  targets = rng.normal(0, 0.5, (num_images, slots, 4)).astype(np.float32)
  valid = rng.random((num_images, slots)) < 0.8
  valid[1, 5:] = False
  loss_fn = jax.jit(lambda c, b: fastrcnn_loss(c, b, labels, targets, valid))
  ours = loss_fn(jnp.asarray(logits), jnp.asarray(regression))
  grads = jax.grad(lambda c, b: sum(loss_fn(c, b)), argnums=(0, 1))(jnp.asarray(logits),
                                                                   jnp.asarray(regression))

  torch_logits = torch.from_numpy(logits[valid]).requires_grad_()
  torch_regression = torch.from_numpy(regression[valid].reshape(-1, classes * 4)).requires_grad_()
  expected = tv_roi_heads.fastrcnn_loss(
      torch_logits, torch_regression,
      [torch.from_numpy(labels[i][valid[i]].astype(np.int64)) for i in range(num_images)],
      [torch.from_numpy(targets[i][valid[i]]) for i in range(num_images)])
  sum(expected).backward()
  np.testing.assert_allclose(ours, [v.item() for v in expected], **F32)
  assert float(ours[1]) > 0
  np.testing.assert_allclose(np.asarray(grads[0])[valid], torch_logits.grad.numpy(), **F32)
  np.testing.assert_allclose(np.asarray(grads[1])[valid].reshape(-1, classes * 4),
                             torch_regression.grad.numpy(), **F32)
  assert not np.asarray(grads[0])[~valid].any() and not np.asarray(grads[1])[~valid].any()
  # Nothing sampled: 0 (torchvision: NaN).
  zero = fastrcnn_loss(logits, regression, labels, targets, np.zeros_like(valid))
  assert [float(v) for v in zero] == [0.0, 0.0]
  with pytest.raises(ValueError, match=r"box_regression must have shape \(3, 24, 6, 4\)"):
    fastrcnn_loss(logits, regression[..., :2], labels, targets, valid)


# ---------------------------------------------------------------------------------------------
# Mask head


def random_masks(rng: np.random.Generator, num: int, height: int, width: int) -> np.ndarray:
  """(num, H, W) uint8 masks: noise (every bilinear weight matters) plus a solid blob."""
  masks = (rng.random((num, height, width)) < 0.3).astype(np.uint8)
  for m in masks:
    y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
    m[y:y + height // 2, x:x + width // 3] = 1
  return masks


def mask_rois(rng: np.random.Generator, num: int, height: int, width: int,
              dtype=np.float32) -> np.ndarray:
  """(num, 4) RoIs from sub-pixel to larger than the image (adaptive grids 1 to ~20), straddling
  it, and the special cases: empty, inverted, the image, beyond its border."""
  start = rng.uniform(-0.2, 1.0, (num, 2)) * [width, height]
  side = np.exp(rng.uniform(np.log(0.3), np.log(2.0 * max(height, width)), (num, 2)))
  rois = np.concatenate([start, start + side], axis=1)
  rois[:5] = [[5, 7, 5, 7], [30, 20, 10, 4], [0, 0, width, height], [-1, -1, width + 1, height + 1],
              [-0.5, 3.25, 1.75, height + 0.5]]
  return rois.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_mask_targets_match_project_masks_on_boxes(dtype):
  rng = np.random.default_rng(9)
  height, width, num = 150, 130, 80
  masks = random_masks(rng, 4, height, width)
  rois = mask_rois(rng, num, height, width, dtype)
  matched = rng.integers(0, 4, num)
  expected = tv_roi_heads.project_masks_on_boxes(torch.from_numpy(masks), torch.from_numpy(rois),
                                                 torch.from_numpy(matched), 28).numpy()
  with jax.enable_x64(dtype == np.float64):
    ours = jax.jit(mask_targets)(jnp.asarray(masks), jnp.asarray(matched), jnp.asarray(rois))
    assert ours.dtype == dtype
  grids = np.ceil(np.maximum(rois[:, 2:] - rois[:, :2], 1) / 28)
  assert grids.max() > 6 and (grids == 1).any()  # the windowed and the all-candidates paths
  # float64: the same samples and weights; float32: XLA rounds some sample coordinates 1 ulp
  # differently (~1e-5 at 150 px on binary-noise masks).
  tol = {"rtol": 0, "atol": 1e-12} if dtype == np.float64 else {"rtol": 0, "atol": 5e-5}
  np.testing.assert_allclose(ours, expected, **tol)
  assert 0.05 < expected.mean() < 0.95


def test_maskrcnn_loss_matches_torchvision():
  rng = np.random.default_rng(10)
  num_images, slots, classes, height, width = 2, 12, 5, 64, 80
  masks = np.stack([random_masks(rng, 3, height, width) for _ in range(num_images)])
  gt_labels = rng.integers(1, classes, (num_images, 3)).astype(np.int32)
  rois = np.stack([mask_rois(rng, slots, height, width) for _ in range(num_images)])
  matched = rng.integers(0, 3, (num_images, slots)).astype(np.int32)
  positive = rng.random((num_images, slots)) < 0.6
  labels = np.take_along_axis(gt_labels, matched, axis=1)
  logits = rng.normal(0, 2, (num_images, slots, 28, 28, classes)).astype(np.float32)

  @jax.jit
  def loss(logits, positive):
    targets = jax.vmap(mask_targets)(masks, matched, rois)
    return maskrcnn_loss(logits, labels, targets, positive)

  expected = tv_roi_heads.maskrcnn_loss(
      torch.from_numpy(logits[positive].transpose(0, 3, 1, 2)),
      [torch.from_numpy(rois[i][positive[i]]) for i in range(num_images)],
      [torch.from_numpy(m) for m in masks],
      [torch.from_numpy(g.astype(np.int64)) for g in gt_labels],
      [torch.from_numpy(matched[i][positive[i]].astype(np.int64)) for i in range(num_images)])
  np.testing.assert_allclose(loss(logits, positive), float(expected), rtol=1e-5)
  # No positive RoI: torchvision returns mask_logits.sum() * 0.
  assert float(loss(logits, np.zeros_like(positive))) == 0.0


# ---------------------------------------------------------------------------------------------
# Mask targets from box-relative patches


def shape_masks(rng: np.random.Generator, num: int, height: int, width: int, min_side: float,
                max_side: float) -> np.ndarray:
  """(num, H, W) uint8 objects drawn by PIL: ellipses, triangles and 5- to 8-gons (star-shaped,
  often concave) in boxes of random sides in [min_side, max_side] at random places."""
  masks = np.zeros((num, height, width), np.uint8)
  for i, mask in enumerate(masks):
    canvas = Image.new("L", (width, height))
    draw = ImageDraw.Draw(canvas)
    w, h = rng.uniform(min_side, max_side, 2)
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    if i % 3 == 0:
      draw.ellipse([x, y, x + w, y + h], fill=1)
    else:
      corners = 3 if i % 3 == 1 else int(rng.integers(5, 9))
      angle = np.sort(rng.uniform(0, 2 * np.pi, corners))
      radius = rng.uniform(0.4, 1.0, corners)
      draw.polygon(list(zip(x + w / 2 * (1 + radius * np.cos(angle)),
                            y + h / 2 * (1 + radius * np.sin(angle)))), fill=1)
    mask[:] = np.asarray(canvas)
  return masks


def tight_boxes(masks: np.ndarray) -> np.ndarray:
  """(N, 4) float32 (x1, y1, x2, y2): the masks' extents, pixel (r, c) covering [c, c + 1) x
  [r, r + 1)."""
  boxes = []
  for mask in masks:
    rows, cols = np.nonzero(mask)
    boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
  return np.float32(boxes)


def thresholded_iou(a: np.ndarray, b: np.ndarray) -> float:
  a, b = np.asarray(a) >= 0.5, np.asarray(b) >= 0.5
  return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_patch_targets_of_box_filling_masks_are_exact(dtype):
  """A mask filling its integer box is constant on any cells of it: the patch targets must be
  project_masks_on_boxes exactly (torchvision's adaptive sampling, all RoI sizes and the
  malformed ones), whatever P, for objects away from the image border."""
  rng = np.random.default_rng(20)
  height, width, num = 150, 130, 80
  corner = rng.integers(2, [width - 40, height - 40], (6, 2))
  side = rng.integers(1, 38, (6, 2))
  boxes = np.concatenate([corner, corner + side], axis=1).astype(np.float32)
  boxes[4] = [3, 2, 4, 3]  # one pixel
  boxes[5] = 0  # a padded slot: empty box, empty mask
  masks = np.zeros((6, height, width), np.uint8)
  for mask, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
    mask[y1:y2, x1:x2] = 1
  rois = mask_rois(rng, num, height, width, dtype)
  matched = rng.integers(0, 6, num)
  rois[5:10] = boxes[matched[5:10]]  # exactly the boxes
  with jax.enable_x64(dtype == np.float64):
    exact = np.asarray(jax.jit(mask_targets)(jnp.asarray(masks), jnp.asarray(matched),
                                             jnp.asarray(rois)))
    for patch_size in (1, 7, 28, 56):
      patches = detection.mask_patches(masks, boxes, (height, width), patch_size)
      np.testing.assert_array_equal(patches[:5], 1)
      assert not patches[5].any()
      ours = jax.jit(mask_targets_from_patches)(jnp.asarray(patches), jnp.asarray(boxes),
                                                jnp.asarray(matched), jnp.asarray(rois))
      assert ours.dtype == dtype and ours.shape == (num, 28, 28)
      # float64: rounding of the closed-form sums; float32: XLA's float32 sample coordinates
      # (as test_mask_targets_match_project_masks_on_boxes).
      tol = {"rtol": 0, "atol": 1e-12} if dtype == np.float64 else {"rtol": 0, "atol": 5e-5}
      np.testing.assert_allclose(ours, exact, **tol)
  grids = np.ceil(np.maximum(rois[:, 2:] - rois[:, :2], 1) / 28)
  assert grids.max() > 6 and (grids == 1).any()
  assert 0.02 < exact.mean() < 0.5 and (exact == 1).any() and (exact == 0).any()


def jittered_rois(rng: np.random.Generator, boxes: np.ndarray, matched: np.ndarray,
                  size: tuple[int, int]) -> np.ndarray:
  """Positive-like RoIs around their boxes: jittered, and grown (reaching outside the object's
  box on every side), clipped to the image as rpn_proposals clips proposals."""
  near = jitter(rng, boxes[matched], 0.12)
  grown = boxes[matched] + rng.uniform(0.1, 0.4, (len(matched), 4)) * np.concatenate(
      [boxes[matched, :2] - boxes[matched, 2:], boxes[matched, 2:] - boxes[matched, :2]], axis=1)
  rois = np.where((np.arange(len(matched)) % 3 == 0)[:, None], grown, near)
  return np.clip(rois, 0, [size[1], size[0]] * 2).astype(np.float32)


# Measured on these cases (P = 28 / 56): mean |difference| 0.0065 / 0.0019 and IoU 0.993 / 0.998
# at scale 1; 0.012 / 0.0059 and 0.982 / 0.990 nearest-upsampled by 1.6 (pixels then straddle
# the scaled boxes' edges and some lie outside the box, which the patches cannot hold). Half a
# pixel off in the box-to-cell mapping, or the edge cells reaching 1 pixel past the box, fails
# every case.
PATCH_BOUNDS = {28: (0.015, 0.975), 56: (0.008, 0.985)}


@pytest.mark.parametrize("patch_size", [28, 56])
@pytest.mark.parametrize("scale", [1.0, 1.6])
def test_patch_targets_approximate_project_masks_on_boxes(patch_size, scale):
  """Shapes of 5 to 60 stored pixels, resized as the detection modality does (boxes scaled by
  float32 ratios, masks by torch's nearest rule), against the exact targets of the resized
  masks: mean absolute difference and IoU of the 0.5-thresholded targets within bounds."""
  rng = np.random.default_rng(21)
  stored, num, per_object = (120, 150), 24, 8
  masks = shape_masks(rng, num, *stored, 5, 60)
  size = detection.resized_size(*stored, round(stored[0] * scale), 1333)
  ratio = np.float32(size[0]) / np.float32(stored[0]), np.float32(size[1]) / np.float32(stored[1])
  boxes = (tight_boxes(masks) * np.float32([ratio[1], ratio[0]] * 2)).astype(np.float32)
  matched = np.repeat(np.arange(num), per_object)
  rois = jittered_rois(rng, boxes, matched, size)
  exact = np.asarray(jax.jit(mask_targets)(jnp.asarray(detection.resize_nearest(masks, size)),
                                           jnp.asarray(matched), jnp.asarray(rois)))
  patches = detection.mask_patches(masks, boxes, size, patch_size)
  ours = np.asarray(jax.jit(mask_targets_from_patches)(
      jnp.asarray(patches), jnp.asarray(boxes), jnp.asarray(matched), jnp.asarray(rois)))
  outside = ((rois[:, :2] < boxes[matched, :2]) | (rois[:, 2:] > boxes[matched, 2:])).all(1)
  assert outside.mean() > 0.3  # RoIs reaching past their object's box along both axes
  assert 0.2 < exact.mean() < 0.6 and ours.min() >= 0 and ours.max() <= 1 + 1e-6
  mean_error, iou_bound = PATCH_BOUNDS[patch_size]
  assert np.abs(ours - exact).mean() < mean_error
  assert thresholded_iou(ours, exact) > iou_bound


# ---------------------------------------------------------------------------------------------
# Keypoint head


def keypoint_case(rng: np.random.Generator, slots: int, num_keypoints: int = 17):
  """RoIs near 3 ground-truth people and their matched keypoints: inside, outside, on the far
  edges x == x2 / y == y2, on the near edges, unlabelled (v = 0) and labelled-invisible (v = 1)."""
  people = random_boxes(rng, 3, 20.0, 70.0)
  side = people[:, None, 2:] - people[:, None, :2]
  gt = np.zeros((3, num_keypoints, 3), np.float32)
  gt[..., :2] = people[:, None, :2] + rng.uniform(-0.1, 1.1, (3, num_keypoints, 2)) * side
  gt[..., 2] = rng.choice([0, 1, 2], (3, num_keypoints), p=[0.2, 0.2, 0.6])
  matched = rng.integers(0, 3, slots).astype(np.int32)
  rois = jitter(rng, people[matched], 0.1)
  rois[0] = [10, 10, 10, 30]  # empty width: only x == x2 == x1 is inside
  gt[matched[0], 16] = [10, 20, 2]
  # Keypoints exactly on RoI edges: far (x2, y2) and near (x1, y1).
  for s in range(1, 6):
    gt[matched[s], s, 0] = rois[s, 2]
    gt[matched[s], s + 5, 1] = rois[s, 3]
    gt[matched[s], s + 10, :2] = rois[s, :2]
  return gt, matched, rois


def test_keypoint_targets_match_keypoints_to_heatmap():
  rng = np.random.default_rng(11)
  gt, matched, rois = keypoint_case(rng, 40)
  targets, valid = jax.jit(keypoint_targets)(jnp.asarray(gt), jnp.asarray(matched),
                                             jnp.asarray(rois))
  heatmaps, torch_valid = tv_roi_heads.keypoints_to_heatmap(
      torch.from_numpy(gt[matched]), torch.from_numpy(rois), 56)
  np.testing.assert_array_equal(valid, torch_valid.numpy().astype(bool))
  np.testing.assert_array_equal(targets, heatmaps.numpy())
  assert 0.2 < np.mean(valid) < 0.9
  assert valid[0, 16] and targets[0, 16] == 28 * 56 + 55  # (20 - 10) * 56 / 20 = 28
  # The far-edge keypoints landed in the last row / column.
  assert np.any(np.asarray(targets)[1:6][np.asarray(valid)[1:6]] % 56 == 55)
  with pytest.raises(ValueError, match="heatmap_size must be a positive int"):
    keypoint_targets(gt, matched, rois, 0)


def test_keypoint_loss_matches_keypointrcnn_loss():
  rng = np.random.default_rng(12)
  num_images, slots, num_keypoints = 2, 10, 17
  cases = [keypoint_case(rng, slots, num_keypoints) for _ in range(num_images)]
  gt, matched, rois = (np.stack(parts) for parts in zip(*cases))
  positive = rng.random((num_images, slots)) < 0.7
  logits = rng.normal(0, 2, (num_images, slots, 56, 56, num_keypoints)).astype(np.float32)

  @jax.jit
  def loss(logits, positive):
    targets, valid = jax.vmap(keypoint_targets)(gt, matched, rois)
    return keypoint_loss(logits, targets, valid & positive[..., None])

  expected = tv_roi_heads.keypointrcnn_loss(
      torch.from_numpy(np.ascontiguousarray(logits[positive].transpose(0, 3, 1, 2))),
      [torch.from_numpy(rois[i][positive[i]]) for i in range(num_images)],
      [torch.from_numpy(g) for g in gt],
      [torch.from_numpy(matched[i][positive[i]].astype(np.int64)) for i in range(num_images)])
  np.testing.assert_allclose(loss(logits, positive), float(expected), rtol=1e-5)
  assert float(expected) > 1
  # No positive RoI: torchvision returns keypoint_logits.sum() * 0.
  assert float(loss(logits, np.zeros_like(positive))) == 0.0
  with pytest.raises(ValueError, match="heatmap_logits must be square"):
    keypoint_loss(logits[..., :50, :], np.zeros((2, 10, 17), np.int32), np.ones((2, 10, 17), bool))


# ---------------------------------------------------------------------------------------------
# Everything together


def test_training_targets_and_losses_compose_under_jit():
  """rpn_targets -> sample_balanced -> rpn_loss and roi_targets -> the head losses in one jit,
  with finite gradients through padding, an image without objects and crowd boxes."""
  rng = np.random.default_rng(13)
  anchors, _ = anchors_for_levels(IMAGE, STRIDES, SIZES, RATIOS)
  gts, proposals, proposal_valid = roi_batch(rng)
  stack = {k: jnp.asarray(np.stack([g[k] for g in gts])) for k in gts[0]}
  num_images, classes, slots = len(gts), 6, 32
  masks = jnp.asarray(np.stack([random_masks(rng, 8, *IMAGE) for _ in gts]))

  def losses(objectness, deltas, class_logits, box_regression, mask_logits, key):
    rpn_key, roi_key = jax.random.split(key)
    labels, matched = jax.vmap(rpn_targets, in_axes=(None, 0, 0, 0))(
        anchors, stack["boxes"], stack["valid"], stack["crowd"])
    pos, neg = jax.vmap(sample_balanced, in_axes=(0, 0, None, None))(
        labels, jax.random.split(rpn_key, num_images), 64, 0.5)
    rois = jax.vmap(lambda p, pv, b, l, v, c, k: roi_targets(p, pv, b, l, v, k, slots, 0.25,
                                                             gt_is_crowd=c))(
        proposals, proposal_valid, stack["boxes"], stack["labels"], stack["valid"],
        stack["crowd"], jax.random.split(roi_key, num_images))
    heads = slots // 4  # the positives' slots
    targets = jax.vmap(mask_targets)(masks, rois["matched_gt"][:, :heads],
                                     rois["boxes"][:, :heads])
    return (*rpn_loss(objectness, deltas, matched, anchors, pos, neg),
            *fastrcnn_loss(class_logits, box_regression, rois["labels"],
                           rois["regression_targets"], rois["valid"]),
            maskrcnn_loss(mask_logits, rois["labels"][:, :heads], targets,
                          rois["positive"][:, :heads]))

  args = (rng.normal(size=(num_images, anchors.shape[0])),
          rng.normal(size=(num_images, anchors.shape[0], 4)),
          rng.normal(size=(num_images, slots, classes)),
          rng.normal(size=(num_images, slots, classes, 4)),
          rng.normal(size=(num_images, slots // 4, 28, 28, classes)))
  args = [jnp.asarray(a, jnp.float32) for a in args]
  values = jax.jit(losses)(*args, jax.random.key(14))
  assert all(np.isfinite(float(v)) and float(v) > 0 for v in values)
  grads = jax.jit(jax.grad(lambda *a: sum(losses(*a, jax.random.key(14))),
                           argnums=tuple(range(5))))(*args)
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads)


@pytest.mark.slow
def test_mask_rcnn_losses_with_patch_targets_jit_and_match_full_masks():
  """MaskRCNN.losses on the same batch and sampling stream with 'masks' and with
  'mask_patches' instead: the same box / RPN losses, and loss_mask close."""
  rng = np.random.default_rng(22)
  batch, side, objects, patch_size = 2, 64, 4, 28
  masks = np.stack([shape_masks(rng, objects, side, side, 10, 40) for _ in range(batch)])
  boxes = np.stack([tight_boxes(m) for m in masks])
  boxes[:, -1] = 0  # a padded slot
  masks[:, -1] = 0
  common = {"image_size": np.full((batch, 2), side, np.int32), "boxes": boxes,
            "labels": rng.integers(1, 4, (batch, objects)).astype(np.int32),
            "valid": np.tile(np.arange(objects) < objects - 1, (batch, 1)),
            "is_crowd": np.zeros((batch, objects), bool)}
  full = {**common, "masks": masks}
  patched = {**common, "mask_patches": np.stack([
      detection.mask_patches(m, b, (side, side), patch_size) for m, b in zip(masks, boxes)])}
  images = jnp.asarray(rng.normal(size=(batch, side, side, 3)), jnp.float32)
  model = create_model("maskrcnn_tiny", num_classes=4, rngs=nnx.Rngs(0),
                       rpn_post_nms_top_n_train=100, box_batch_size_per_image=32)
  # Logits ~3 instead of ~0, where the loss would be log 2 whatever the targets: now it is
  # ~3 (1 - mean target) + 0.05, and mean target errors show.
  model.mask_predictor.logits.bias[...] = 3.0
  losses = nnx.jit(lambda m, t: m.losses(images, t))
  with_masks = losses(nnx.clone(model), jax.tree.map(jnp.asarray, full))
  with_patches = losses(nnx.clone(model), jax.tree.map(jnp.asarray, patched))
  assert set(with_patches) == set(with_masks)
  for name in with_masks:
    if name != "loss_mask":  # the same sampled anchors and RoIs
      np.testing.assert_array_equal(with_patches[name], with_masks[name], err_msg=name)
  loss_mask = float(with_patches["loss_mask"])
  assert np.isfinite(loss_mask) and loss_mask > 0
  # Measured: 1.5e-4 relative (2.1067 and 2.1070).
  np.testing.assert_allclose(loss_mask, float(with_masks["loss_mask"]), rtol=2e-3)
