"""Box ops, BoxCoder, anchors and Matcher against torchvision's own implementations.

References: torchvision.ops (box_area, box_iou, clip_boxes_to_image,
remove_small_boxes), torchvision.models.detection._utils (BoxCoder, Matcher),
anchor_utils.AnchorGenerator and the feature-map sizes of a real ResNet-FPN
backbone, all fed the same random inputs.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList

from nonlocal_jax.detection.anchors import anchors_for_levels, feature_map_sizes, level_strides
from nonlocal_jax.detection.boxes import (
    BoxCoder, box_area, box_iou, clip_boxes_to_image, small_boxes_mask)
from nonlocal_jax.detection.matcher import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, match

FPN_STRIDES = (4, 8, 16, 32, 64)
FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_RATIOS = ((0.5, 1.0, 2.0),) * 5


def random_boxes(rng: np.random.Generator, shape: tuple[int, ...], extent: float = 200.0,
                 min_side: float = 0.5, max_side: float = 80.0) -> np.ndarray:
  """(*shape, 4) float32 boxes (x1, y1, x2, y2) with sides in [min_side, max_side)."""
  corner = rng.uniform(-0.1 * extent, extent, (*shape, 2))
  sides = rng.uniform(min_side, max_side, (*shape, 2))
  return np.concatenate([corner, corner + sides], axis=-1).astype(np.float32)


def test_area_iou_clip_and_small_boxes_match_torchvision():
  rng = np.random.default_rng(0)
  a, b = random_boxes(rng, (3, 40)), random_boxes(rng, (3, 25))
  np.testing.assert_array_equal(box_area(jnp.asarray(a)),
                                torchvision.ops.box_area(torch.from_numpy(a)).numpy())
  iou = jax.jit(box_iou)(jnp.asarray(a), jnp.asarray(b))
  expected = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  assert iou.shape == (3, 40, 25) and (expected > 0).mean() > 0.05
  np.testing.assert_allclose(iou, expected, rtol=1e-6, atol=1e-7)

  # Per-image sizes as traced arrays, one (height, width) per leading row.
  sizes = [(120, 150), (90, 210), (200, 60)]
  heights = jnp.asarray([[h] for h, _ in sizes], jnp.float32)
  widths = jnp.asarray([[w] for _, w in sizes], jnp.float32)
  clipped = jax.jit(clip_boxes_to_image)(jnp.asarray(a), heights, widths)
  for i, size in enumerate(sizes):
    expected = torchvision.ops.clip_boxes_to_image(torch.from_numpy(a[i]), size).numpy()
    np.testing.assert_array_equal(clipped[i], expected)
  assert not np.array_equal(clipped, a)

  clipped = np.array(clipped)
  for min_size in (1e-3, 10.0, 30.0):
    mask = small_boxes_mask(jnp.asarray(clipped), min_size)
    for i in range(3):
      keep = torchvision.ops.remove_small_boxes(torch.from_numpy(clipped[i]), min_size).numpy()
      np.testing.assert_array_equal(np.flatnonzero(mask[i]), keep)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_matches_torchvision(weights):
  rng = np.random.default_rng(1)
  # Side ratios below 1000 / 16, so that decode inverts encode.
  anchors, targets = random_boxes(rng, (300,), min_side=2), random_boxes(rng, (300,), min_side=2)
  ours, theirs = BoxCoder(weights), det_utils.BoxCoder(weights)
  deltas = jax.jit(ours.encode)(jnp.asarray(targets), jnp.asarray(anchors))
  expected = theirs.encode_single(torch.from_numpy(targets), torch.from_numpy(anchors)).numpy()
  np.testing.assert_allclose(deltas, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours.decode(deltas, jnp.asarray(anchors)), targets, rtol=1e-5,
                             atol=1e-3)

  # Class-specific codes: torchvision's (N, 4 C) is our (N, C, 4) with (N, 1, 4) boxes. Large
  # dw, dh hit the bbox_xform_clip clamp.
  codes = rng.normal(0, 3, (300, 5 * 4)).astype(np.float32)
  codes[:, 2::4] += 30
  assert (codes[:, 2::4] / weights[2] > math.log(1000 / 16)).mean() > 0.5
  decoded = jax.jit(ours.decode)(jnp.asarray(codes.reshape(300, 5, 4)),
                                 jnp.asarray(anchors[:, None]))
  expected = theirs.decode_single(torch.from_numpy(codes), torch.from_numpy(anchors)).numpy()
  assert np.isfinite(decoded).all()
  np.testing.assert_allclose(decoded.reshape(300, 20), expected, rtol=1e-6, atol=1e-4)


def torchvision_anchors(image_size, grids, sizes=FPN_SIZES, ratios=FPN_RATIOS) -> np.ndarray:
  generator = AnchorGenerator(sizes, ratios)
  images = ImageList(torch.zeros(1, 3, *image_size), [tuple(image_size)])
  feature_maps = [torch.zeros(1, 1, *grid) for grid in grids]
  return generator(images, feature_maps)[0].numpy()


@pytest.mark.parametrize("image_size", [(800, 1216), (1344, 800), (224, 224), (97, 130)])
def test_anchors_match_torchvision_anchor_generator(image_size):
  anchors, counts = anchors_for_levels(image_size, FPN_STRIDES, FPN_SIZES, FPN_RATIOS)
  grids = feature_map_sizes(image_size, FPN_STRIDES)
  assert counts == [3 * h * w for h, w in grids] and sum(counts) == len(anchors)
  np.testing.assert_array_equal(anchors, torchvision_anchors(image_size, grids))


def test_anchors_several_sizes_per_level_and_nominal_stride_differs():
  sizes, ratios = ((16, 40), (48, 100, 170)), ((0.25, 1.0, 3.0), (0.7, 1.3))
  anchors, counts = anchors_for_levels((800, 608), (32, 64), sizes, ratios)
  assert level_strides((800, 608), (32, 64)) == [(32, 32), (61, 60)]
  expected = torchvision_anchors((800, 608), feature_map_sizes((800, 608), (32, 64)), sizes,
                                 ratios)
  assert counts == [25 * 19 * 6, 13 * 10 * 6]
  np.testing.assert_array_equal(anchors, expected)


def test_feature_map_sizes_are_those_of_a_resnet_fpn():
  backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
  for image_size in [(97, 130), (160, 96), (75, 75)]:
    with torch.no_grad():
      features = backbone(torch.zeros(1, 3, *image_size))
    assert [tuple(f.shape[-2:]) for f in features.values()] == feature_map_sizes(
        image_size, FPN_STRIDES)


@pytest.mark.parametrize("bad, message", [
    (dict(image_size=(800,)), "image_size"),
    (dict(image_size=(800, 0)), "image_size"),
    (dict(strides=(4, 8.0, 16, 32, 64)), "strides"),
    (dict(sizes=FPN_SIZES[:4]), "one entry per level"),
    (dict(sizes=((32,), (), (128,), (256,), (512,))), r"sizes\[1\]"),
    (dict(aspect_ratios=((0.5, -1.0),) * 5), r"aspect_ratios\[0\]"),
])
def test_anchor_arguments_are_checked(bad, message):
  args = dict(image_size=(800, 800), strides=FPN_STRIDES, sizes=FPN_SIZES,
              aspect_ratios=FPN_RATIOS) | bad
  with pytest.raises(ValueError, match=message):
    anchors_for_levels(**args)


def test_box_arguments_are_checked():
  with pytest.raises(ValueError, match="weights"):
    BoxCoder((1.0, 1.0, 0.0, 1.0))
  with pytest.raises(ValueError, match="weights"):
    BoxCoder((1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match=r"boxes2 must be \(\.\.\., 4\)"):
    box_iou(jnp.zeros((3, 4)), jnp.zeros((3, 5)))


def matcher_quality(rng: np.random.Generator, num_gt: int, num_preds: int) -> np.ndarray:
  """(num_gt, num_preds) IoUs of random boxes, with exact ties in each gt's best quality."""
  gt, preds = random_boxes(rng, (num_gt,)), random_boxes(rng, (num_preds,))
  preds[:num_gt] = gt  # perfect matches
  preds[num_gt:2 * num_gt] = gt  # ... tied
  preds[2 * num_gt] = gt[0] + np.float32(1)  # same size, shifted: IoU well below 1
  quality = torchvision.ops.box_iou(torch.from_numpy(gt), torch.from_numpy(preds)).numpy()
  # A gt whose best quality is low (0.4), tied between predictions 50 and 60 whose other
  # qualities are lower.
  quality[-1] = np.minimum(quality[-1], 0.3)
  quality[:, [50, 60]] = np.minimum(quality[:, [50, 60]], 0.2)
  quality[-1, [50, 60]] = 0.4
  return quality


@pytest.mark.parametrize("allow_low_quality_matches", [False, True])
def test_match_equals_torchvision_matcher_with_padded_gt(allow_low_quality_matches):
  rng = np.random.default_rng(2)
  num_gt, num_pad, num_preds = 6, 3, 400
  quality = matcher_quality(rng, num_gt, num_preds)
  reference = det_utils.Matcher(0.7, 0.3, allow_low_quality_matches)(torch.from_numpy(quality))
  reference = reference.numpy()

  # Padded rows with high quality everywhere, at the front and the back: must be ignored.
  rows = np.concatenate([np.full((1, num_preds), 0.95, np.float32), quality,
                         np.full((num_pad - 1, num_preds), 0.99, np.float32)])
  gt_valid = np.r_[False, np.ones(num_gt, bool), np.zeros(num_pad - 1, bool)]
  matches = jax.jit(match, static_argnums=(2, 3, 4))(
      jnp.asarray(rows), jnp.asarray(gt_valid), 0.7, 0.3, allow_low_quality_matches)
  expected = np.where(reference >= 0, reference + 1, reference)
  np.testing.assert_array_equal(matches, expected)
  assert {BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS} <= set(expected.tolist())
  # The low-quality rule re-matches the two tied predictions of the last gt.
  assert (expected[[50, 60]] == num_gt).all() == allow_low_quality_matches


def test_match_without_valid_gt_and_bad_arguments():
  quality = jnp.full((2, 5), 0.9)
  matches = match(quality, jnp.zeros(2, bool), 0.7, 0.3, True)
  np.testing.assert_array_equal(matches, np.full(5, BELOW_LOW_THRESHOLD))
  with pytest.raises(ValueError, match="low_threshold=0.8"):
    match(quality, jnp.ones(2, bool), 0.7, 0.8, False)
  with pytest.raises(ValueError, match=r"gt_valid must be \(M,\)"):
    match(quality, jnp.ones(3, bool), 0.7, 0.3, False)
  with pytest.raises(ValueError, match="M, N >= 1"):
    match(jnp.zeros((0, 5)), jnp.ones(0, bool), 0.7, 0.3, False)
