"""NonLocalNet for semantic segmentation (mmsegmentation ``nonlocal_r50-d8``; spec 4.6).

* Backbone ResNetV1c: deep stem (3x3/2 32, 3x3 32, 3x3 64, each BN ReLU; then
  3x3/2 max pool), stages with strides (1, 2, 1, 1) and dilations
  (1, 1, 2, 4), the first block of a dilated stage using half the dilation
  (``contract_dilation``): output stride 8.
* Decode head ``NLHead``: 3x3 conv 2048 -> 512 BN ReLU; 2D embedded-Gaussian
  non-local block (inner 256, 1/sqrt(256) scale, no subsampling, no bias on
  W_z, BN with weight = bias = 0); 3x3 conv BN ReLU; concat with the head
  input; 3x3 conv BN ReLU; Dropout2d 0.1; 1x1 classifier.
* Auxiliary ``FCNHead`` on stage 3 (1024 channels): 3x3 conv 256 BN ReLU,
  Dropout2d 0.1, 1x1 classifier.
* Logits are upsampled bilinearly (half-pixel, ``align_corners=False``) to
  the input size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nonlocal_jax.models.resnet_layers import (ConvNorm, Norm, Remat, ResStage, check_input,
                                               check_remat, rematerialized, resolve_stage_depths)
from nonlocal_jax.nonlocal_block import NonLocalBlock
from nonlocal_jax.pooling import max_pool


class ConvNormReLU(ConvNorm):
  """ConvNorm followed by ReLU (mmcv ConvModule)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.relu(super().__call__(x))


class SegmentationClassifier(nnx.Module):
  """Dropout2d (whole channels) then a 1x1 classifier with bias, N(0, 0.01) init (mmseg cls_seg)."""

  def __init__(self, in_features: int, num_classes: int, *, dropout_rate: float, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dropout = nnx.Dropout(dropout_rate, broadcast_dims=(1, 2), rngs=rngs)
    self.conv = nnx.Linear(in_features, num_classes, kernel_init=nnx.initializers.normal(0.01),
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(self.dropout(x))


class NonLocalSegmenter(nnx.Module):
  """Dilated ResNetV1c + NLHead (+ auxiliary FCNHead in training).

  Args:
    num_classes: classes (19 Cityscapes, 150 ADE20K, 21 VOC).
    depth / stage_depths: ResNet depth, or explicit blocks per stage.
    width: stem output channels (64); stage widths 4x..32x; the deep stem's
      first two convolutions use width / 2.
    head_channels: decode-head channels (512).
    aux_channels: auxiliary-head channels (256).
    dropout_rate: Dropout2d before both classifiers (0.1).
    nonlocal_options: overrides of the head's NonLocalBlock (defaults are
      mmseg's: no subsampling, no W_z bias, 1/sqrt(d) scale).
    norm: backbone and head norm.
    remat: ``'none'``, ``'blocks'`` (every residual block and the head's
      non-local block under ``nnx.remat``) or ``'full'`` (the whole backbone
      forward under one ``nnx.remat``): less activation memory in training,
      same results and parameter paths.

  Input (B, H, W, C). Returns (logits, aux_logits), both (B, H, W,
  num_classes); aux_logits is None in eval mode (``nnx.view(model,
  deterministic=True, ...)``).
  """

  def __init__(
      self,
      *,
      num_classes: int,
      depth: int = 50,
      stage_depths: Sequence[int] | None = None,
      width: int = 64,
      head_channels: int = 512,
      aux_channels: int = 256,
      dropout_rate: float = 0.1,
      nonlocal_options: Mapping[str, Any] | None = None,
      norm: Norm = "batch_norm",
      in_channels: int = 3,
      remat: Remat = "none",
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.remat = check_remat(remat)
    stage_depths = resolve_stage_depths(depth, stage_depths, ((),) * 4)
    common = dict(norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    half = max(width // 2, 1)
    self.stem = nnx.List([
        ConvNormReLU(in_channels, half, (3, 3), stride=2, **common),
        ConvNormReLU(half, half, (3, 3), **common),
        ConvNormReLU(half, width, (3, 3), **common),
    ])
    strides, dilations = (1, 2, 1, 1), (1, 1, 2, 4)
    stages, in_features = [], width
    for s, (n, stride, dilation) in enumerate(zip(stage_depths, strides, dilations)):
      inner = width * 2**s
      block_dilations = [max(dilation // 2, 1) if i == 0 else dilation for i in range(n)]
      stages.append(ResStage(
          in_features, inner, 4 * inner, a_kernels=[(1, 1)] * n, b_kernels=[(3, 3)] * n,
          stride=(stride, stride), dilations=[(d, d) for d in block_dilations],
          zero_init_residual=False, remat_blocks=remat == "blocks", **common))
      in_features = 4 * inner
    self.stages = nnx.List(stages)
    stage3_features = in_features // 2

    options = dict(pool_window=None, use_out_bias=False)
    options.update(nonlocal_options or {})
    options.setdefault("dtype", dtype)
    self.head_in = ConvNormReLU(in_features, head_channels, (3, 3), **common)
    self.nonlocal_block = NonLocalBlock(head_channels, param_dtype=param_dtype, rngs=rngs,
                                        **options)
    self.head_out = ConvNormReLU(head_channels, head_channels, (3, 3), **common)
    self.head_cat = ConvNormReLU(in_features + head_channels, head_channels, (3, 3), **common)
    self.classifier = SegmentationClassifier(head_channels, num_classes,
                                             dropout_rate=dropout_rate, dtype=dtype,
                                             param_dtype=param_dtype, rngs=rngs)
    self.aux_in = ConvNormReLU(stage3_features, aux_channels, (3, 3), **common)
    self.aux_classifier = SegmentationClassifier(aux_channels, num_classes,
                                                 dropout_rate=dropout_rate, dtype=dtype,
                                                 param_dtype=param_dtype, rngs=rngs)
    self.deterministic = False

  def set_view(self, deterministic: bool | None = None):
    """Used by ``nnx.view``: eval mode skips the auxiliary head."""
    if deterministic is not None:
      self.deterministic = deterministic

  def backbone(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, C) -> (stage-3 features, stage-4 features), both at stride 8."""
    check_input(x, "(B, H, W, C) images")
    for layer in self.stem:
      x = layer(x)
    x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    outputs = []
    for stage in self.stages:
      x = stage(x)
      outputs.append(x)
    return outputs[2], outputs[3]

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(B, H, W, C) -> (logits, aux_logits or None), each (B, H, W, num_classes)."""
    size = x.shape[1:3]
    if self.remat == "full":
      stage3, stage4 = nnx.remat(NonLocalSegmenter.backbone)(self, x)
    else:
      stage3, stage4 = self.backbone(x)
    y = rematerialized(self.nonlocal_block, self.head_in(stage4), enabled=self.remat == "blocks")
    y = self.head_out(y)
    y = self.head_cat(jnp.concatenate([stage4, y], axis=-1))
    logits = _upsample(self.classifier(y), size)
    if self.deterministic:
      return logits, None
    return logits, _upsample(self.aux_classifier(self.aux_in(stage3)), size)


def _upsample(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize with half-pixel centres (PyTorch ``align_corners=False``)."""
  shape = (x.shape[0], *size, x.shape[-1])
  return jax.image.resize(x, shape, method="bilinear", antialias=False).astype(x.dtype)


def slide_inference(model: nnx.Module, images: jax.Array, crop_size: Sequence[int],
                    stride: Sequence[int]) -> jax.Array:
  """Logits of overlapping crops averaged where they overlap (mmseg ``mode='slide'``).

  images (B, H, W, C) -> logits (B, H, W, K); windows are placed as mmseg
  does (the last one flush with the border).
  """
  _, height, width, _ = images.shape
  (crop_h, crop_w), (stride_h, stride_w) = crop_size, stride
  rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
  cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
  total, count = None, jnp.zeros((1, height, width, 1), jnp.float32)
  for r in range(rows):
    for c in range(cols):
      y2, x2 = min(r * stride_h + crop_h, height), min(c * stride_w + crop_w, width)
      y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
      logits = model(images[:, y1:y2, x1:x2])[0].astype(jnp.float32)
      if total is None:
        total = jnp.zeros(images.shape[:3] + logits.shape[-1:], jnp.float32)
      total = total.at[:, y1:y2, x1:x2].add(logits)
      count = count.at[:, y1:y2, x1:x2].add(1.0)
  return total / count
