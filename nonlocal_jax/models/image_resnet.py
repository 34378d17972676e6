"""2D ResNet-50/101 image classifiers with non-local blocks (torchvision layout).

Stem 7x7/2 conv, BN, ReLU, 3x3/2 max pool (padding 1); bottlenecks with the
stride on the 3x3 convolution; global average pool and a linear classifier.
Non-local blocks are 2D (default subsampling (2, 2)) and sit after the chosen
blocks of each stage: the user's seed note puts one after every res3 and res4
block, the paper's COCO model one before the last block of res4.

Input (B, H, W, 3) channels-last; output logits (B, num_classes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nonlocal_jax.models.resnet_layers import (ClassificationHead, ConvNorm, Norm, Remat,
                                               ResStage, check_input, check_remat,
                                               resolve_stage_depths)
from nonlocal_jax.pooling import max_pool


class ImageResNet(nnx.Module):
  """2D ResNet with non-local blocks.

  Args:
    num_classes: classifier outputs; 0 builds the backbone alone (no head: a
      detector's trunk, read with :meth:`stage_outputs`).
    depth: 50 or 101 (ignored when `stage_depths` is given).
    stage_depths: blocks in res2..res5 (tiny presets).
    nonlocal_blocks: for res2..res5, the 0-based indices of the blocks followed
      by a non-local block.
    nonlocal_options: keyword arguments of every NonLocalBlock.
    width: stem channels (64).
    dropout_rate: dropout before the classifier (0: torchvision).
    norm: ``'batch_norm'`` or ``'affine'``.
    zero_init_residual: gamma = 0 in the last BN of every bottleneck.
    in_channels: input channels.
    remat: ``'none'``, ``'blocks'`` (every residual and non-local block under
      ``nnx.remat``) or ``'full'`` (the whole backbone forward under one
      ``nnx.remat``): less activation memory in training, same results and
      parameter paths.
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
      dropout_rate: float = 0.0,
      norm: Norm = "batch_norm",
      zero_init_residual: bool = True,
      in_channels: int = 3,
      remat: Remat = "none",
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.remat = check_remat(remat)
    stage_depths = resolve_stage_depths(depth, stage_depths, nonlocal_blocks)
    common = dict(norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stem = ConvNorm(in_channels, width, (7, 7), stride=2, **common)
    stages = []
    in_features = width
    for s, (n, nl) in enumerate(zip(stage_depths, nonlocal_blocks)):
      inner = width * 2**s
      stages.append(ResStage(
          in_features, inner, 4 * inner, a_kernels=[(1, 1)] * n, b_kernels=[(3, 3)] * n,
          stride=(1, 1) if s == 0 else (2, 2), dilations=[(1, 1)] * n,
          nonlocal_indices=tuple(nl), nonlocal_options=nonlocal_options,
          zero_init_residual=zero_init_residual, remat_blocks=remat == "blocks", **common))
      in_features = 4 * inner
    self.stages = nnx.List(stages)
    self.head = ClassificationHead(in_features, num_classes, dropout_rate=dropout_rate,
                                   dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs) if num_classes else None

  def stage_outputs(self, x: jax.Array) -> list[jax.Array]:
    """(B, H, W, C) -> [res2, res3, res4, res5]: (B, H/4, W/4, 4 * width) ... (B, H/32, W/32, 32 * width).

    The multi-scale features a feature pyramid (detection) reads.
    """
    check_input(x, "(B, H, W, C) images")
    x = nnx.relu(self.stem(x))
    x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    outputs = []
    for stage in self.stages:
      x = stage(x)
      outputs.append(x)
    return outputs

  def features(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> res5 features (B, H/32, W/32, 32 * width)."""
    return self.stage_outputs(x)[-1]

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> logits (B, num_classes)."""
    if self.head is None:
      raise ValueError("this ImageResNet was built with num_classes=0 (no head); "
                       "call stage_outputs(x) or features(x)")
    if self.remat == "full":
      return self.head(nnx.remat(ImageResNet.features)(self, x))
    return self.head(self.features(x))
