"""Mask R-CNN and Keypoint R-CNN on ResNet-FPN, with non-local blocks (Wang et al., section 6).

The layers of torchvision's ``maskrcnn_resnet50_fpn`` and
``keypointrcnn_resnet50_fpn`` (converted weights load one to one, see
:mod:`nonlocal_jax.convert`): a ResNet trunk (torchvision layout: stride on
the 3x3 convolution) with frozen BatchNorm (``norm='affine'``, Detectron's
AffineChannel, torchvision's FrozenBatchNorm2d), an FPN (P2-P6, 256
channels), an RPN head shared over levels (3 anchors per location), and the
RoI heads: box (two 1024-d fully connected layers), mask (four 3x3
convolutions, 2x upsampling, 28x28 per-class logits) and keypoint (eight 3x3
convolutions, 56x56 heatmaps).

Non-local blocks: ``nonlocal_blocks`` places them in the trunk as in the
classifiers (the paper's detector: one right before the last block of res4,
``((), (), (4,), ())`` for R50); ``keypoint_nonlocal_after`` in the keypoint
head (the paper: 4 blocks, one after every 2 of its 8 convolutions,
``(1, 3, 5, 7)``). They default to ``final_norm='none'`` (W_z initialised to
zero, no BN: the block starts as the identity, and nothing is left to batch
statistics in a frozen-BN detector; the paper does not say what it used).

Input (B, H, W, 3) channels-last images, H and W multiples of 32 (padded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nonlocal_jax.detection.anchors import anchors_for_levels
from nonlocal_jax.detection.fpn import FeaturePyramid
from nonlocal_jax.detection import losses as detection_losses
from nonlocal_jax.detection.heads import (BoxHead, ConvStackHead, KeypointPredictor, MaskPredictor,
                                          RPNHead)
from nonlocal_jax.detection.proposals import detections, rpn_proposals
from nonlocal_jax.detection.roi_align import multiscale_roi_align
from nonlocal_jax.detection.targets import roi_targets, rpn_targets, sample_balanced
from nonlocal_jax.models.image_resnet import ImageResNet
from nonlocal_jax.models.resnet_layers import Norm

# torchvision's defaults (models/detection/faster_rcnn.py _default_anchorgen):
# one size per FPN level P2..P6, three aspect ratios.
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
FPN_STRIDES = (4, 8, 16, 32, 64)
ROI_STRIDES = FPN_STRIDES[:4]  # RoIs are pooled from P2-P5 (torchvision featmap_names '0'-'3')
SAMPLING_RATIO = 2  # RoIAlign samples per bin side (torchvision MultiScaleRoIAlign, Detectron)
DETECTOR_NONLOCAL_OPTIONS = {"final_norm": "none"}


class MaskRCNN(nnx.Module):
  """Mask R-CNN (``num_keypoints=0``) or Keypoint R-CNN (``masks=False, num_keypoints=17``).

  Args:
    num_classes: box classes including background (torchvision's COCO: 91,
      Detectron's: 81; keypoints: 2).
    depth / stage_depths / width / norm: the ResNet trunk (see ImageResNet).
    nonlocal_blocks: per res2..res5, 0-based indices of the trunk blocks
      followed by a non-local block.
    nonlocal_options: keyword arguments of every NonLocalBlock (trunk and head),
      on top of :data:`DETECTOR_NONLOCAL_OPTIONS`.
    fpn_features: FPN channels (256).
    box_features / mask_features / keypoint_features: widths of the box head's
      fully connected layers (1024), the mask head (256) and the keypoint head
      (512); smaller in the tiny presets.
    anchor_sizes / aspect_ratios: anchors per FPN level P2..P6.
    masks: build the mask head.
    num_keypoints: build the keypoint head with this many heatmaps (0: none).
    keypoint_nonlocal_after: indices of the keypoint head's convolutions
      followed by a non-local block.
    rpn_pre_nms_top_n_train / rpn_post_nms_top_n_train / rpn_batch_size_per_image /
    rpn_positive_fraction / box_batch_size_per_image / box_positive_fraction:
      training settings, torchvision's names and defaults (its RPN keeps 2000
      proposals per image in training; Detectron 2000 per batch).
    rpn_pre_nms_top_n_test / rpn_post_nms_top_n_test / rpn_nms_thresh /
    box_score_thresh / box_nms_thresh / box_detections_per_img: inference
      settings, torchvision's names and defaults.
    box_candidates: (proposal, class) pairs entering the final NMS (static
      shapes; see :mod:`nonlocal_jax.detection.proposals`).
    box_relation_modules: object relation modules after each of the box
      head's fully connected layers (Hu et al., CVPR 2018: "2fc + RM", 1;
      0: none, torchvision's head). See :class:`BoxHead`.
    relation_options: keyword arguments of those RelationModules.
  """

  def __init__(
      self,
      *,
      num_classes: int,
      depth: int = 50,
      stage_depths: Sequence[int] | None = None,
      nonlocal_blocks: Sequence[Sequence[int]] = ((), (), (), ()),
      nonlocal_options: Mapping[str, Any] | None = None,
      width: int = 64,
      norm: Norm = "affine",
      fpn_features: int = 256,
      box_features: int = 1024,
      mask_features: int = 256,
      keypoint_features: int = 512,
      anchor_sizes: Sequence[int] = ANCHOR_SIZES,
      aspect_ratios: Sequence[float] = ASPECT_RATIOS,
      masks: bool = True,
      num_keypoints: int = 0,
      keypoint_nonlocal_after: Sequence[int] = (),
      rpn_pre_nms_top_n_train: int = 2000,
      rpn_post_nms_top_n_train: int = 2000,
      rpn_batch_size_per_image: int = 256,
      rpn_positive_fraction: float = 0.5,
      box_batch_size_per_image: int = 512,
      box_positive_fraction: float = 0.25,
      rpn_pre_nms_top_n_test: int = 1000,
      rpn_post_nms_top_n_test: int = 1000,
      rpn_nms_thresh: float = 0.7,
      box_score_thresh: float = 0.05,
      box_nms_thresh: float = 0.5,
      box_detections_per_img: int = 100,
      box_candidates: int = 4000,
      box_relation_modules: int = 0,
      relation_options: Mapping[str, Any] | None = None,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if len(anchor_sizes) != len(FPN_STRIDES):
      raise ValueError(f"anchor_sizes needs one size per FPN level P2..P6 ({len(FPN_STRIDES)}), "
                       f"got {tuple(anchor_sizes)}")
    if keypoint_nonlocal_after and not num_keypoints:
      raise ValueError("keypoint_nonlocal_after needs a keypoint head: set num_keypoints")
    options = {**DETECTOR_NONLOCAL_OPTIONS, **dict(nonlocal_options or {})}
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.anchor_sizes, self.aspect_ratios = tuple(anchor_sizes), tuple(aspect_ratios)
    self.rpn_test = dict(pre_nms_top_n=rpn_pre_nms_top_n_test,
                         post_nms_top_n=rpn_post_nms_top_n_test, nms_threshold=rpn_nms_thresh)
    self.rpn_train = dict(pre_nms_top_n=rpn_pre_nms_top_n_train,
                          post_nms_top_n=rpn_post_nms_top_n_train, nms_threshold=rpn_nms_thresh)
    self.rpn_sampling = (rpn_batch_size_per_image, rpn_positive_fraction)
    self.box_sampling = dict(batch_size_per_image=box_batch_size_per_image,
                             positive_fraction=box_positive_fraction)
    # Random sampling of anchors and RoIs in training (a stream saved with the model state).
    self.rngs = nnx.Rngs(sampling=rngs.params())
    self.box_test = dict(score_threshold=box_score_thresh, nms_threshold=box_nms_thresh,
                         detections_per_image=box_detections_per_img,
                         max_candidates=box_candidates)
    self.backbone = ImageResNet(num_classes=0, depth=depth, stage_depths=stage_depths,
                                nonlocal_blocks=nonlocal_blocks, nonlocal_options=options,
                                width=width, norm=norm, zero_init_residual=False, **common)
    self.fpn = FeaturePyramid([4 * width * 2**s for s in range(4)], fpn_features, **common)
    self.rpn = RPNHead(fpn_features, len(aspect_ratios), **common)
    self.box_head = BoxHead(fpn_features, num_classes, representation=box_features,
                            relation_modules=box_relation_modules,
                            relation_options=relation_options, **common)
    self.mask_head = ConvStackHead(fpn_features, mask_features, 4, **common) if masks else None
    self.mask_predictor = MaskPredictor(mask_features, mask_features, num_classes,
                                        **common) if masks else None
    self.keypoint_head = ConvStackHead(
        fpn_features, keypoint_features, 8, nonlocal_after=keypoint_nonlocal_after,
        nonlocal_options=options, **common) if num_keypoints else None
    self.keypoint_predictor = KeypointPredictor(keypoint_features, num_keypoints,
                                                **common) if num_keypoints else None

  def pyramid(self, images: jax.Array) -> list[jax.Array]:
    """(B, H, W, 3) -> FPN levels P2..P6, (B, H / s, W / s, fpn_features) for s in FPN_STRIDES."""
    return self.fpn(self.backbone.stage_outputs(images))

  def anchors(self, input_size: tuple[int, int]):
    """Anchors of a padded (H, W) input in the RPN's order and their count per level."""
    return anchors_for_levels(input_size, FPN_STRIDES, [(s,) for s in self.anchor_sizes],
                              [self.aspect_ratios] * len(FPN_STRIDES))

  def pool(self, levels: Sequence[jax.Array], boxes: jax.Array, valid: jax.Array,
           size: int) -> jax.Array:
    """(B, R, 4) boxes -> (B * R, size, size, C) RoIAlign features from their FPN levels."""
    pooled = multiscale_roi_align(levels[:len(ROI_STRIDES)], ROI_STRIDES, boxes, valid, size,
                                  SAMPLING_RATIO)
    return pooled.reshape(-1, *pooled.shape[2:])

  def propose(self, levels: Sequence[jax.Array], input_size: tuple[int, int],
              image_sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FPN levels -> test-time proposals (B, P, 4) and their validity (B, P)."""
    objectness, deltas = self.rpn(levels)
    anchors, counts = self.anchors(input_size)
    proposals, _, valid = rpn_proposals(objectness, deltas, anchors, counts, image_sizes,
                                        **self.rpn_test)
    return proposals, valid

  def detect(self, images: jax.Array, image_sizes: jax.Array) -> dict[str, jax.Array]:
    """Inference, as torchvision's model in eval mode up to (not including) the pasting.

    Args:
      images: (B, H, W, 3) normalised images, zero-padded to H, W multiples of 32.
      image_sizes: (B, 2) int (height, width) of each image before padding.

    Returns:
      {'boxes' (B, D, 4) in input pixels, 'scores' (B, D), 'labels' (B, D),
      'valid' (B, D)}, D = box_detections_per_img, plus 'masks' (B, D, 28, 28)
      probabilities of the predicted class (mask head) and 'keypoint_heatmaps'
      (B, D, 56, 56, K) logits (keypoint head), for the host to paste / decode
      (:mod:`nonlocal_jax.detection.postprocess`).
    """
    levels = self.pyramid(images)
    proposals, proposal_valid = self.propose(levels, images.shape[1:3], image_sizes)
    b, p = proposals.shape[:2]
    logits, box_deltas = self.box_head(self.pool(levels, proposals, proposal_valid, 7),
                                       proposals, proposal_valid)
    out = detections(logits.reshape(b, p, -1), box_deltas.reshape(b, p, -1, 4), proposals,
                     proposal_valid, image_sizes, **self.box_test)
    d = out["boxes"].shape[1]
    if self.mask_head is not None:
      mask_logits = self.mask_predictor(self.mask_head(self.pool(levels, out["boxes"],
                                                                 out["valid"], 14)))
      picked = jnp.take_along_axis(mask_logits, out["labels"].reshape(-1, 1, 1, 1), axis=-1)
      out["masks"] = jax.nn.sigmoid(picked.astype(out["scores"].dtype)).reshape(
          b, d, *picked.shape[1:3])
    if self.keypoint_head is not None:
      heatmaps = self.keypoint_predictor(self.keypoint_head(self.pool(levels, out["boxes"],
                                                                      out["valid"], 14)))
      out["keypoint_heatmaps"] = heatmaps.astype(out["scores"].dtype).reshape(
          b, d, *heatmaps.shape[1:])
    return out

  def losses(self, images: jax.Array, targets: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Training forward: torchvision's loss dict (its model in train mode), as scalars.

    Args:
      images: (B, H, W, 3) normalised, zero-padded images.
      targets: {'image_size' (B, 2) int (height, width) before padding,
        'boxes' (B, M, 4), 'labels' (B, M) int in 1..K-1, 'valid' (B, M),
        'is_crowd' (B, M), and 'masks' (B, M, H, W) or 'mask_patches'
        (B, M, P, P) (masks on their boxes, used when present) for the mask
        head, 'keypoints' (B, M, K, 3) for the keypoint head} (the detection
        modality's targets, :mod:`nonlocal_jax.preprocessing.detection`).

    Returns:
      {'loss_objectness', 'loss_rpn_box_reg', 'loss_classifier',
      'loss_box_reg'} plus 'loss_mask' / 'loss_keypoint' with those heads.
    """
    b = images.shape[0]
    crowd, gt_boxes, gt_valid = targets["is_crowd"], targets["boxes"], targets["valid"]
    rpn_key, roi_key = jax.random.split(self.rngs.sampling())
    levels = self.pyramid(images)
    objectness, deltas = self.rpn(levels)
    anchors, counts = self.anchors(images.shape[1:3])
    anchor_boxes = jnp.asarray(anchors)
    anchor_labels, matched = jax.vmap(rpn_targets, in_axes=(None, 0, 0, 0))(
        anchor_boxes, gt_boxes, gt_valid, crowd)
    positive, negative = jax.vmap(sample_balanced, in_axes=(0, 0, None, None))(
        anchor_labels, jax.random.split(rpn_key, b), *self.rpn_sampling)
    loss_objectness, loss_rpn_box = detection_losses.rpn_loss(
        objectness.astype(jnp.float32), deltas.astype(jnp.float32), matched, anchor_boxes,
        positive, negative)
    # Proposals are not differentiated through (torchvision detaches them).
    proposals, _, proposal_valid = rpn_proposals(
        jax.lax.stop_gradient(objectness), jax.lax.stop_gradient(deltas), anchors, counts,
        targets["image_size"], **self.rpn_train)
    rois = jax.vmap(lambda p, v, g, l, gv, c, k: roi_targets(
        p, v, g, l, gv, k, gt_is_crowd=c, **self.box_sampling))(
            proposals, proposal_valid, gt_boxes, targets["labels"], gt_valid, crowd,
            jax.random.split(roi_key, b))
    s = rois["boxes"].shape[1]
    logits, box_deltas = self.box_head(self.pool(levels, rois["boxes"], rois["valid"], 7),
                                       rois["boxes"], rois["valid"])
    loss_classifier, loss_box = detection_losses.fastrcnn_loss(
        logits.reshape(b, s, -1), box_deltas.reshape(b, s, -1, 4), rois["labels"],
        rois["regression_targets"], rois["valid"])
    out = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box,
           "loss_classifier": loss_classifier, "loss_box_reg": loss_box}
    # The mask and keypoint heads see the positive RoIs, which fill the first slots.
    first = int(s * self.box_sampling["positive_fraction"])
    positive_rois = {k: v[:, :first] for k, v in rois.items()}
    if self.mask_head is not None:
      mask_logits = self.mask_predictor(self.mask_head(self.pool(
          levels, positive_rois["boxes"], positive_rois["positive"], 14)))
      if "mask_patches" in targets:
        mask_targets = jax.vmap(detection_losses.mask_targets_from_patches)(
            targets["mask_patches"], gt_boxes, positive_rois["matched_gt"],
            positive_rois["boxes"])
      else:
        mask_targets = jax.vmap(detection_losses.mask_targets)(
            targets["masks"], positive_rois["matched_gt"], positive_rois["boxes"])
      out["loss_mask"] = detection_losses.maskrcnn_loss(
          mask_logits.reshape(b, first, *mask_logits.shape[1:]), positive_rois["labels"],
          mask_targets, positive_rois["positive"])
    if self.keypoint_head is not None:
      heatmaps = self.keypoint_predictor(self.keypoint_head(self.pool(
          levels, positive_rois["boxes"], positive_rois["positive"], 14)))
      cells, visible = jax.vmap(detection_losses.keypoint_targets)(
          targets["keypoints"], positive_rois["matched_gt"], positive_rois["boxes"])
      out["loss_keypoint"] = detection_losses.keypoint_loss(
          heatmaps.reshape(b, first, *heatmaps.shape[1:]), cells,
          visible & positive_rois["positive"][..., None])
    return out

  def __call__(self, images: jax.Array) -> Any:
    raise NotImplementedError(
        "a detector has two forwards: losses(images, targets) in training and "
        "detect(images, image_sizes) in evaluation (the detection task calls them)")
