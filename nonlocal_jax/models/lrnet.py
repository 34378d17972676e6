"""Local Relation Networks (LR-Net-26/50; Hu, Zhang, Xie, Lin, ICCV 2019).

A ResNet whose bottleneck 3x3 convolutions are local relation layers (7x7,
m = 8 channels per aggregation map), with the bottlenecks widened (100, 200,
400, 800 channels in res2..res5 instead of 64..512) to spend the FLOPs the
cheaper aggregation saves, and the 7x7 stem convolution replaced by a 1x1
convolution to 64 channels followed by a 7x7 local relation layer with stride
2 (the paper's Table 1). Every 1x1 convolution and local relation layer is
followed by a norm and a ReLU, like the convolutions they replace.

Input (B, H, W, 3) channels-last; output logits (B, num_classes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nonlocal_jax.local_relation import LocalRelation
from nonlocal_jax.models.resnet_layers import (Bottleneck, ClassificationHead, ConvNorm, Norm,
                                               check_input, make_norm)
from nonlocal_jax.pooling import max_pool

# Bottlenecks per stage res2..res5: LR-Net-26 (2 x 4 x 3 + 2 layers) and LR-Net-50.
LRNET_STAGE_DEPTHS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3)}


class LocalRelationNorm(nnx.Module):
  """A LocalRelation layer and a norm: (B, H, W, C) -> (B, H / stride, W / stride, C_out)."""

  def __init__(self, in_features: int, out_features: int, *, kernel_size: int, stride: int,
               channels_per_group: int, options: Mapping[str, Any], norm: Norm, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.relation = LocalRelation(
        in_features, out_features, kernel_size=kernel_size, stride=stride,
        channels_per_group=channels_per_group, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        **options)
    self.norm = make_norm(out_features, norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.relation(x))


class LRBottleneck(Bottleneck):
  """Bottleneck 1x1 -> k x k local relation (strided) -> 1x1, plus the shortcut.

  The residual computation is Bottleneck's; only the middle layer differs.
  x: (B, H, W, in_features) -> (B, H / stride, W / stride, out_features).
  """

  def __init__(self, in_features: int, inner_features: int, out_features: int, *,
               stride: int, kernel_size: int, channels_per_group: int,
               options: Mapping[str, Any], norm: Norm, zero_init_residual: bool, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    common = dict(norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.a = ConvNorm(in_features, inner_features, (1, 1), **common)
    self.b = LocalRelationNorm(inner_features, inner_features, kernel_size=kernel_size,
                               stride=stride, channels_per_group=channels_per_group,
                               options=options, **common)
    self.c = ConvNorm(inner_features, out_features, (1, 1), zero_init_norm=zero_init_residual,
                      **common)
    needs_projection = in_features != out_features or stride != 1
    self.shortcut = (ConvNorm(in_features, out_features, (1, 1), stride=stride, **common)
                     if needs_projection else None)


class LRNet(nnx.Module):
  """Local Relation Network for image classification.

  Args:
    num_classes: classifier outputs.
    depth: 26 or 50 (ignored when `stage_depths` is given).
    stage_depths: bottlenecks in res2..res5 (tiny presets).
    stage_widths: channels of each stage's local relation layers (paper:
      100, 200, 400, 800).
    stage_out_features: output channels of each stage (ResNet's 256..2048).
    stem_width: channels of the stem's 1x1 convolution and local relation
      layer (64).
    kernel_size: window of every local relation layer (paper: 7).
    channels_per_group: m, channels sharing one aggregation map: one int, or
      five (stem, res2..res5); each must divide its layer's width.
    local_relation_options: further keyword arguments of every LocalRelation
      (e.g. ``composability``, ``geometry_prior``, ``appearance``,
      ``key_reduction``).
    dropout_rate: dropout before the classifier.
    norm: ``'batch_norm'`` or ``'affine'``.
    zero_init_residual: gamma = 0 in the last norm of every bottleneck.
    in_channels: input channels.
  """

  def __init__(
      self,
      *,
      num_classes: int,
      depth: int = 50,
      stage_depths: Sequence[int] | None = None,
      stage_widths: Sequence[int] = (100, 200, 400, 800),
      stage_out_features: Sequence[int] = (256, 512, 1024, 2048),
      stem_width: int = 64,
      kernel_size: int = 7,
      channels_per_group: int | Sequence[int] = 8,
      local_relation_options: Mapping[str, Any] | None = None,
      dropout_rate: float = 0.0,
      norm: Norm = "batch_norm",
      zero_init_residual: bool = True,
      in_channels: int = 3,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if stage_depths is None:
      if depth not in LRNET_STAGE_DEPTHS:
        raise ValueError(f"depth={depth!r} is not supported; choose one of "
                         f"{tuple(LRNET_STAGE_DEPTHS)} or give stage_depths")
      stage_depths = LRNET_STAGE_DEPTHS[depth]
    stage_depths, stage_widths = tuple(stage_depths), tuple(stage_widths)
    stage_out_features = tuple(stage_out_features)
    if not len(stage_depths) == len(stage_widths) == len(stage_out_features) == 4:
      raise ValueError(f"stage_depths {stage_depths}, stage_widths {stage_widths} and "
                       f"stage_out_features {stage_out_features} need one entry per stage "
                       f"res2..res5")
    groups = ((channels_per_group,) * 5 if isinstance(channels_per_group, int)
              else tuple(channels_per_group))
    if len(groups) != 5:
      raise ValueError(f"channels_per_group={channels_per_group!r} needs one int or five "
                       f"(stem, res2..res5)")
    options = dict(local_relation_options or {})
    common = dict(norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    self.stem_conv = ConvNorm(in_channels, stem_width, (1, 1), **common)
    self.stem_relation = LocalRelationNorm(
        stem_width, stem_width, kernel_size=kernel_size, stride=2,
        channels_per_group=groups[0], options=options, **common)
    stages = []
    in_features = stem_width
    for s, (n, width, out, m) in enumerate(
        zip(stage_depths, stage_widths, stage_out_features, groups[1:])):
      blocks = []
      for i in range(n):
        blocks.append(LRBottleneck(
            in_features, width, out, stride=2 if s > 0 and i == 0 else 1,
            kernel_size=kernel_size, channels_per_group=m, options=options,
            zero_init_residual=zero_init_residual, **common))
        in_features = out
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.head = ClassificationHead(in_features, num_classes, dropout_rate=dropout_rate,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> res5 features (B, H/32, W/32, stage_out_features[-1])."""
    check_input(x, "(B, H, W, C) images")
    x = nnx.relu(self.stem_conv(x))
    x = nnx.relu(self.stem_relation(x))
    x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for stage in self.stages:
      for block in stage:
        x = block(x)
    return x

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> logits (B, num_classes)."""
    return self.head(self.features(x))
