"""Mask R-CNN / Keypoint R-CNN layers against torchvision's, through our converter."""

import copy

import jax
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection._utils import overwrite_eps
from torchvision.ops.misc import FrozenBatchNorm2d

import jax.numpy as jnp

from nonlocal_jax import checkpoints
from nonlocal_jax.convert import convert
from nonlocal_jax.detection.layers import ConvTranspose2d, resize_nearest, upsample_bilinear
from nonlocal_jax.models.registry import create_model

torch.manual_seed(0)


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
  """Random weights, biases and BN statistics everywhere (no zero biases hiding a mapping bug)."""
  with torch.no_grad():
    for name, tensor in module.state_dict().items():
      if tensor.dtype.is_floating_point:
        if name.endswith("running_var"):
          tensor.uniform_(0.5, 1.5)
        else:
          tensor.normal_(0, 0.02 if tensor.ndim > 1 else 0.1)
  return module.eval()


def torch_maskrcnn() -> torch.nn.Module:
  """torchvision's maskrcnn_resnet50_fpn as built for its COCO weights (FrozenBatchNorm2d, eps 0)."""
  trunk = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
  model = torchvision.models.detection.MaskRCNN(_resnet_fpn_extractor(trunk, 3), num_classes=91)
  overwrite_eps(model, 0.0)
  return randomize_(model)


def converted(torch_model: torch.nn.Module, name: str, param_dtype=jnp.float32,
              **kwargs) -> nnx.Module:
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  conversion = convert("torchvision", state, name, **kwargs)
  model = create_model(name, num_classes=conversion.num_classes, rngs=nnx.Rngs(1),
                       param_dtype=param_dtype, **conversion.model_kwargs)
  checkpoints.restore_weights(model, conversion.weights)
  return model


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def maskrcnn_pair():
  theirs = torch_maskrcnn()
  return theirs, converted(theirs, "maskrcnn_r50_fpn")


def test_pyramid_and_rpn_head_match_torchvision(maskrcnn_pair):
  theirs, ours = maskrcnn_pair
  images = np.random.default_rng(0).normal(size=(2, 128, 160, 3)).astype(np.float32)
  with torch.no_grad():
    their_levels = list(theirs.backbone(nchw(images)).values())
    their_scores, their_deltas = theirs.rpn.head(their_levels)
  our_levels = ours.pyramid(jnp.asarray(images))
  assert len(our_levels) == 5
  for o, t in zip(our_levels, their_levels):
    np.testing.assert_allclose(o, nhwc(t), rtol=1e-4, atol=1e-4)
  our_scores, our_deltas = ours.rpn(our_levels)
  # torchvision's concat_box_prediction_layers: per level (N, A, H, W) -> (N, H, W, A) flattened.
  scores = torch.cat([s.permute(0, 2, 3, 1).reshape(2, -1) for s in their_scores], dim=1)
  deltas = torch.cat([d.view(2, 3, 4, *d.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(2, -1, 4)
                      for d in their_deltas], dim=1)
  np.testing.assert_allclose(our_scores, scores.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(our_deltas, deltas.numpy(), rtol=1e-4, atol=1e-5)


def test_box_and_mask_heads_match_torchvision(maskrcnn_pair):
  theirs, ours = maskrcnn_pair
  rng = np.random.default_rng(1)
  box_features = rng.normal(size=(5, 7, 7, 256)).astype(np.float32)
  mask_features = rng.normal(size=(5, 14, 14, 256)).astype(np.float32)
  with torch.no_grad():
    their_logits, their_deltas = theirs.roi_heads.box_predictor(
        theirs.roi_heads.box_head(nchw(box_features)))
    their_masks = theirs.roi_heads.mask_predictor(theirs.roi_heads.mask_head(nchw(mask_features)))
  logits, deltas = ours.box_head(jnp.asarray(box_features))
  np.testing.assert_allclose(logits, their_logits.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(deltas.reshape(5, -1), their_deltas.numpy(), rtol=1e-4, atol=1e-5)
  masks = ours.mask_predictor(ours.mask_head(jnp.asarray(mask_features)))
  assert masks.shape == (5, 28, 28, 91)
  np.testing.assert_allclose(masks, nhwc(their_masks), rtol=1e-4, atol=1e-5)


def test_keypoint_head_matches_torchvision():
  theirs = randomize_(torchvision.models.detection.keypointrcnn_resnet50_fpn(
      weights=None, weights_backbone=None))
  ours = converted(theirs, "keypointrcnn_r50_fpn", bn_epsilon=1e-5)  # nn.BatchNorm2d when untrained
  features = np.random.default_rng(2).normal(size=(3, 14, 14, 256)).astype(np.float32)
  with torch.no_grad():
    heatmaps = theirs.roi_heads.keypoint_predictor(theirs.roi_heads.keypoint_head(nchw(features)))
  ours_maps = ours.keypoint_predictor(ours.keypoint_head(jnp.asarray(features)))
  assert ours_maps.shape == (3, 56, 56, 17)
  np.testing.assert_allclose(ours_maps, nhwc(heatmaps), rtol=1e-4, atol=1e-4)
  images = np.random.default_rng(3).normal(size=(1, 64, 96, 3)).astype(np.float32)
  with torch.no_grad():
    their_levels = list(theirs.backbone(nchw(images)).values())
  for o, t in zip(ours.pyramid(jnp.asarray(images)), their_levels):
    np.testing.assert_allclose(o, nhwc(t), rtol=1e-4, atol=1e-4)


def test_nonlocal_variants_start_as_the_baseline(maskrcnn_pair):
  theirs, baseline = maskrcnn_pair
  with_nl = converted(theirs, "maskrcnn_r50_fpn_nl1", fresh_nonlocal=True)
  assert "4" in with_nl.backbone.stages[2].nonlocal_blocks
  images = jnp.asarray(np.random.default_rng(4).normal(size=(1, 64, 64, 3)), jnp.float32)
  for a, b in zip(with_nl.pyramid(images), baseline.pyramid(images)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  head = create_model("keypointrcnn_r50_fpn_nl5", num_classes=2, rngs=nnx.Rngs(0))
  assert sorted(head.keypoint_head.nonlocal_blocks) == ["1", "3", "5", "7"]
  assert "21" not in head.backbone.stages[2].nonlocal_blocks and (
      "4" in head.backbone.stages[2].nonlocal_blocks)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 14, 14, 256)), jnp.float32)
  plain = nnx.clone(head)
  plain.keypoint_head.nonlocal_blocks = nnx.Dict({})
  np.testing.assert_allclose(head.keypoint_head(x), plain.keypoint_head(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel,stride,padding",
                         [(2, 2, 0), (4, 2, 1), (3, 1, 1), (3, 2, 0), (5, 3, 2)])
def test_conv_transpose_matches_torch(kernel, stride, padding):
  theirs = randomize_(torch.nn.ConvTranspose2d(5, 7, kernel, stride=stride, padding=padding))
  ours = ConvTranspose2d(5, 7, kernel, stride=stride, padding=padding, rngs=nnx.Rngs(0))
  ours.kernel[...] = jnp.asarray(theirs.weight.detach().numpy().transpose(2, 3, 0, 1))
  ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())
  x = np.random.default_rng(6).normal(size=(2, 6, 9, 5)).astype(np.float32)
  x_torch = nchw(x).requires_grad_()
  y_torch = theirs(x_torch)
  np.testing.assert_allclose(ours(jnp.asarray(x)), nhwc(y_torch), rtol=1e-5, atol=1e-5)
  # Gradients of a random linear function of the output, for the input, kernel and bias.
  probe = np.random.default_rng(7).normal(size=nhwc(y_torch).shape).astype(np.float32)
  (y_torch * nchw(probe)).sum().backward()
  grads = nnx.grad(lambda m, x: jnp.sum(m(x) * probe), argnums=(0, 1))(ours, jnp.asarray(x))
  np.testing.assert_allclose(grads[1], nhwc(x_torch.grad), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads[0]["kernel"][...],
                             theirs.weight.grad.numpy().transpose(2, 3, 0, 1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads[0]["bias"][...], theirs.bias.grad.numpy(), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="padding=4 must be at most"):
    ConvTranspose2d(5, 7, 3, stride=1, padding=4, rngs=nnx.Rngs(0))


def test_resizes_match_torch_interpolate():
  x = np.random.default_rng(7).normal(size=(2, 5, 7, 3)).astype(np.float32)
  for size in [(10, 14), (9, 13), (5, 7), (3, 4)]:
    theirs = torch.nn.functional.interpolate(nchw(x), size=size, mode="nearest")
    np.testing.assert_allclose(resize_nearest(jnp.asarray(x), size), nhwc(theirs))
  theirs = torch.nn.functional.interpolate(nchw(x), scale_factor=2, mode="bilinear",
                                           align_corners=False)
  np.testing.assert_allclose(upsample_bilinear(jnp.asarray(x), 2), nhwc(theirs), rtol=1e-5,
                             atol=1e-6)


def test_detector_arguments_are_checked():
  with pytest.raises(ValueError, match="one size per FPN level"):
    create_model("maskrcnn_tiny", num_classes=3, rngs=nnx.Rngs(0), anchor_sizes=(32, 64))
  with pytest.raises(ValueError, match="needs a keypoint head"):
    create_model("maskrcnn_tiny", num_classes=3, rngs=nnx.Rngs(0), keypoint_nonlocal_after=(1,))
  with pytest.raises(ValueError, match=r"nonlocal_after \[8\]"):
    create_model("maskrcnn_tiny", num_classes=3, rngs=nnx.Rngs(0), num_keypoints=5,
                 keypoint_nonlocal_after=(8,))


def torch_stages(model: torch.nn.Module, images: np.ndarray, size: tuple[int, int]):
  """torchvision's eval pipeline on (B, H, W, 3) images cropped to `size`, without resizing.

  The transform keeps the pixels (mean 0, std 1, min_size = the short side)
  and pads the batch to multiples of 32, as our input is.
  """
  model.transform.image_mean, model.transform.image_std = [0.0] * 3, [1.0] * 3
  model.transform.min_size, model.transform.max_size = (min(size),), 10 * max(size)
  crops = [torch.from_numpy(np.ascontiguousarray(x[:size[0], :size[1]].transpose(2, 0, 1)))
           for x in images]
  with torch.no_grad():
    image_list, _ = model.transform(crops)
    features = model.backbone(image_list.tensors)
    proposals, _ = model.rpn(image_list, features)
    detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
  return image_list, features, proposals, detections


def assert_same_boxes(ours: np.ndarray, valid: np.ndarray, theirs: torch.Tensor,
                      atol: float) -> np.ndarray:
  """Our valid boxes are theirs up to order; returns, per box of theirs, the index of ours.

  Boxes are paired by position, not by rank (equal scores, e.g. of boxes
  clipped to the same corner, may come in another order), one to one: every
  box of theirs takes a distinct box of ours within `atol`.
  """
  theirs = theirs.numpy()
  candidates = np.flatnonzero(valid)
  assert len(candidates) == len(theirs), (len(candidates), len(theirs))
  distance = np.abs(theirs[:, None] - ours[candidates][None]).max(-1)
  pairs, used = [], np.zeros(len(candidates), bool)
  for row in distance:
    close = np.flatnonzero((row <= atol) & ~used)
    assert len(close), f"no box of ours within {atol} of theirs (nearest {row.min()})"
    pick = close[np.argmin(row[close])]
    used[pick] = True
    pairs.append(pick)
  return candidates[np.array(pairs)]


@pytest.mark.slow
@jax.enable_x64(True)
def test_mask_rcnn_inference_matches_torchvision(maskrcnn_pair):
  theirs, ours = maskrcnn_pair
  # float64 on both sides: random weights give thousands of nearly equal scores, and
  # float32 rounding (XLA vs PyTorch) would swap neighbours at the top-k cuts and in the
  # NMS order, changing which boxes survive (about 2% of the proposals in float32).
  theirs = copy.deepcopy(theirs).double()
  with torch.no_grad():  # confident classes, so that detections pass the 0.05 score threshold
    theirs.roi_heads.box_predictor.cls_score.weight.mul_(40)
  ours = converted(theirs, "maskrcnn_r50_fpn", param_dtype=jnp.float64)
  rng = np.random.default_rng(8)
  images = rng.normal(size=(2, 128, 160, 3))
  size = (120, 150)  # padded to 128 x 160 on both sides
  image_list, _, their_proposals, their_detections = torch_stages(theirs, images, size)
  padded = jnp.asarray(nhwc(image_list.tensors))
  image_sizes = jnp.asarray(image_list.image_sizes, jnp.int32)
  assert padded.shape == (2, 128, 160, 3)

  proposals, valid = nnx.jit(lambda m, x, s: m.propose(m.pyramid(x), x.shape[1:3], s))(
      ours, padded, image_sizes)
  for i in range(2):
    assert_same_boxes(np.asarray(proposals[i]), np.asarray(valid[i]), their_proposals[i], 1e-3)

  out = nnx.jit(lambda m, x, s: m.detect(x, s))(ours, padded, image_sizes)
  for i, theirs_i in enumerate(their_detections):
    keep = np.asarray(out["valid"][i])
    assert 0 < keep.sum() <= 100
    pairs = assert_same_boxes(np.asarray(out["boxes"][i]), keep, theirs_i["boxes"], 1e-3)
    np.testing.assert_allclose(np.asarray(out["scores"][i])[pairs], theirs_i["scores"].numpy(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["labels"][i])[pairs], theirs_i["labels"].numpy())
    np.testing.assert_allclose(np.asarray(out["masks"][i])[pairs],
                               theirs_i["masks"][:, 0].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@jax.enable_x64(True)
def test_keypoint_rcnn_inference_matches_torchvision():
  torch.manual_seed(0)  # weights independent of the tests run before (some random ones find nothing)
  theirs = randomize_(torchvision.models.detection.keypointrcnn_resnet50_fpn(
      weights=None, weights_backbone=None)).double()  # float64: see the Mask R-CNN test
  with torch.no_grad():
    theirs.roi_heads.box_predictor.cls_score.weight.mul_(40)
  ours = converted(theirs, "keypointrcnn_r50_fpn", bn_epsilon=1e-5, param_dtype=jnp.float64)
  images = np.random.default_rng(9).normal(size=(1, 96, 128, 3))
  image_list, features, _, their_detections = torch_stages(theirs, images, (96, 128))
  out = nnx.jit(lambda m, x, s: m.detect(x, s))(
      ours, jnp.asarray(nhwc(image_list.tensors)), jnp.asarray(image_list.image_sizes, jnp.int32))
  keep = np.asarray(out["valid"][0])
  assert keep.sum() > 0
  pairs = assert_same_boxes(np.asarray(out["boxes"][0]), keep, their_detections[0]["boxes"], 1e-3)
  with torch.no_grad():
    rois = [their_detections[0]["boxes"]]
    pooled = theirs.roi_heads.keypoint_roi_pool(features, rois, image_list.image_sizes)
    heatmaps = theirs.roi_heads.keypoint_predictor(theirs.roi_heads.keypoint_head(pooled))
  np.testing.assert_allclose(np.asarray(out["keypoint_heatmaps"][0])[pairs], nhwc(heatmaps),
                             rtol=1e-4, atol=1e-4)


def test_rpn_proposals_match_torchvision(maskrcnn_pair):
  """Per-level top-k, decoding, clipping, NMS and the final cut, on well separated scores."""
  theirs, _ = maskrcnn_pair
  from nonlocal_jax.detection.anchors import anchors_for_levels
  from nonlocal_jax.detection.proposals import rpn_proposals
  anchors, counts = anchors_for_levels((128, 160), (4, 8, 16, 32, 64),
                                       [(s,) for s in (32, 64, 128, 256, 512)], [(0.5, 1, 2)] * 5)
  rng = np.random.default_rng(10)
  n = anchors.shape[0]
  logits = np.stack([rng.permutation(n) for _ in range(2)]).astype(np.float32) / n * 8 - 4
  deltas = rng.normal(0, 0.3, size=(2, n, 4)).astype(np.float32)
  sizes = [(120, 150), (128, 100)]
  theirs.rpn._pre_nms_top_n = dict(training=2000, testing=300)
  theirs.rpn._post_nms_top_n = dict(training=2000, testing=200)
  with torch.no_grad():
    decoded = theirs.rpn.box_coder.decode(torch.from_numpy(deltas.reshape(-1, 4)),
                                          [torch.from_numpy(anchors)] * 2).view(2, -1, 4)
    boxes, scores = theirs.rpn.filter_proposals(decoded, torch.from_numpy(logits), sizes, counts)
  ours, our_scores, valid = rpn_proposals(
      jnp.asarray(logits), jnp.asarray(deltas), anchors, counts, jnp.asarray(sizes),
      pre_nms_top_n=300, post_nms_top_n=200)
  for i in range(2):
    keep = np.asarray(valid[i])
    assert keep.sum() == len(boxes[i]) > 0
    np.testing.assert_allclose(np.asarray(ours[i])[keep], boxes[i].numpy(), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(our_scores[i])[keep], scores[i].numpy(), rtol=1e-6)


def synthetic_targets(rng: np.random.Generator, batch: int, size: int, objects: int,
                      num_classes: int, num_keypoints: int = 0) -> dict:
  """Random boxes (the last object of each image is padding) with box-filling masks."""
  xy = rng.uniform(0, size * 0.6, (batch, objects, 2))
  wh = rng.uniform(size * 0.15, size * 0.4, (batch, objects, 2))
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  masks = np.zeros((batch, objects, size, size), np.uint8)
  for b in range(batch):
    for m in range(objects):
      x1, y1, x2, y2 = boxes[b, m].astype(int)
      masks[b, m, y1:y2, x1:x2] = 1
  keypoints = np.concatenate([xy[:, :, None] + rng.uniform(0, 1, (batch, objects, num_keypoints, 2))
                              * wh[:, :, None], np.full((batch, objects, num_keypoints, 1), 2)],
                             -1).astype(np.float32)
  valid = np.ones((batch, objects), bool)
  valid[:, -1] = False
  return {"image_size": np.full((batch, 2), size, np.int32), "boxes": boxes,
          "labels": rng.integers(1, num_classes, (batch, objects)).astype(np.int32),
          "valid": valid, "is_crowd": np.zeros((batch, objects), bool), "masks": masks,
          "keypoints": keypoints}


@pytest.mark.parametrize("name,heads,kwargs", [
    ("maskrcnn_nl_tiny", {"loss_mask"}, {}),
    ("keypointrcnn_tiny", {"loss_keypoint"}, {}),
    ("maskrcnn_tiny", {"loss_mask"}, dict(box_relation_modules=1, relation_options=dict(
        num_heads=4, key_features=16, geometry_features=16)))])
def test_training_losses_are_finite_and_reach_every_head(name, heads, kwargs):
  model = create_model(name, num_classes=4, rngs=nnx.Rngs(0), rpn_post_nms_top_n_train=100,
                       box_batch_size_per_image=32, **kwargs)
  rng = np.random.default_rng(11)
  images = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32)
  targets = jax.tree.map(jnp.asarray, synthetic_targets(rng, 2, 64, 3, 4, num_keypoints=7))

  def total(model):
    losses = model.losses(images, targets)
    return sum(losses.values()), losses

  (loss, losses), grads = nnx.jit(nnx.value_and_grad(total, has_aux=True))(model)
  assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier",
                         "loss_box_reg"} | heads
  assert all(np.isfinite(float(v)) and float(v) > 0 for v in losses.values()), losses
  for module in ("rpn", "box_head", "fpn", "backbone") + tuple(
      "mask_head" if h == "loss_mask" else "keypoint_head" for h in heads):
    norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(nnx.state(getattr(grads, module))))
    assert norm > 0, module
  if kwargs:  # "2fc + RM": the relation modules train and run at inference too
    for relations in ("fc6_relations", "fc7_relations"):
      norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["box_head"][relations]))
      assert norm > 0, relations
    out = nnx.jit(lambda m: m.detect(images, targets["image_size"]))(model)
    assert out["boxes"].shape == (2, 100, 4) and out["masks"].shape == (2, 100, 28, 28)
  # The sampling stream advances: another call samples other anchors and RoIs.
  again = nnx.jit(lambda m: m.losses(images, targets))(model)
  assert float(sum(again.values())) != float(loss)


@pytest.mark.parametrize("name,expected", [("maskrcnn_r50_fpn", 44_401_393),
                                           ("keypointrcnn_r50_fpn", 59_137_258)])
def test_parameter_counts_match_torchvision(name, expected):
  """torchvision's published counts (its weights' metadata); its frozen BNs are buffers, ours
  are the FrozenAffine scale and bias (2 per channel), counted apart."""
  num_classes = 91 if name.startswith("mask") else 2
  model = nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  total = sum(v.get_value().size for p, v in flat if "norm" not in p)
  assert total == expected


def test_legacy_torchvision_key_names_convert_the_same(maskrcnn_pair):
  """Files written before torchvision renamed its FPN / RPN / mask head modules (the published
  COCO checkpoints) load as the current names do."""
  import re
  theirs, _ = maskrcnn_pair
  state = {k: v.numpy() for k, v in theirs.state_dict().items()}
  legacy = {}
  for key, value in state.items():
    key = re.sub(r"^(backbone\.fpn\.(inner|layer)_blocks\.\d+)\.0\.", r"\1.", key)
    key = re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", key)
    key = re.sub(r"^roi_heads\.mask_head\.(\d+)\.0\.",
                 lambda m: f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.", key)
    legacy[key] = value
  assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn4.bias" in legacy
  modern = convert("torchvision", state, "maskrcnn_r50_fpn").weights
  old = convert("torchvision", legacy, "maskrcnn_r50_fpn").weights
  assert modern.keys() == old.keys()
  for path in modern:
    np.testing.assert_array_equal(modern[path], old[path])


@pytest.mark.parametrize("variant", ["figures", "maskrcnn_r50_nl1", "keypointrcnn_r50_nl5"])
def test_detector_configs_keep_blocks_without_batch_norm(variant):
  """Configs list every NonLocalBlock option; the detector presets' final_norm='none' stays."""
  from configs import coco
  from nonlocal_jax import train
  from nonlocal_jax.nonlocal_block import NonLocalBlock

  config = coco.get_config(variant)
  assert config.model.kwargs.nonlocal_options.final_norm == "none"
  model = nnx.eval_shape(lambda: train.build_model(config, nnx.Rngs(0)))
  blocks = [m for _, m in nnx.iter_graph(model) if isinstance(m, NonLocalBlock)]
  assert blocks and all(b.final_norm == "none" for b in blocks)
  assert not nnx.state(model, nnx.BatchStat)
