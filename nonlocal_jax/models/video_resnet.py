"""C2D and I3D ResNet-50/101 video classifiers with non-local blocks.

Built as the official code (video-nonlocal-net ``resnet_video.py`` for 8x8
clips, ``resnet_video_org.py`` for the paper's 32x2 clips) and PySlowFast
build them (spec sections 2.2-2.5):

* stem: conv (1 or 5) x 7 x 7, spatial stride 2 (temporal stride 2 for 32x2),
  BN, ReLU, max pool 1x3x3 stride 1x2x2 (8x8) or 2x3x3 stride 2x2x2 (32x2);
* res2, then a 2x1x1 temporal max pool, then res3-res5; the spatial stride is
  on the 3x3 convolution of the first block of res3-res5;
* I3D 3x1x1 inflates the first 1x1 of res2 blocks 0-2, res3 0 and 2, res4 0, 2,
  4, ... and res5 1 (PySlowFast ``_TEMPORAL_KERNEL_BASIS['i3d']``); I3D 3x3x3
  inflates the 3x3 of the same blocks instead (paper Table 2e);
* head: average pool, dropout 0.5, linear.

Input (B, T, H, W, 3) channels-last; output logits (B, num_classes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from nonlocal_jax.models.resnet_layers import (ClassificationHead, ConvNorm, Norm, Remat,
                                               ResStage, check_input, check_remat,
                                               resolve_stage_depths)
from nonlocal_jax.pooling import max_pool

ARCHS = ("c2d", "i3d")
INFLATIONS = ("3x1x1", "3x3x3")
CLIPS = ("8x8", "32x2")
STEM_POOL_PADDINGS = ("caffe2", "pyslowfast")

# Temporal kernel pattern per stage, tiled over the blocks (PySlowFast basis = Caffe2 obtain_arc).
_I3D_TEMPORAL_PATTERN = ((3,), (3, 1), (3, 1), (1, 3))


def temporal_kernels(arch: str, stage_depths: Sequence[int]) -> list[list[int]]:
  """Temporal kernel size of each block's inflated convolution, per stage."""
  if arch == "c2d":
    return [[1] * n for n in stage_depths]
  return [[pattern[i % len(pattern)] for i in range(n)]
          for pattern, n in zip(_I3D_TEMPORAL_PATTERN, stage_depths)]


class VideoResNet(nnx.Module):
  """C2D / I3D ResNet with non-local blocks.

  Args:
    num_classes: classifier outputs.
    depth: 50 or 101 (ignored when `stage_depths` is given).
    stage_depths: blocks in res2..res5 (tiny presets).
    arch: ``'c2d'`` (all kernels 1 x k x k) or ``'i3d'``.
    inflation: ``'3x1x1'`` (official) or ``'3x3x3'`` (paper Table 2e).
    clip: ``'8x8'`` (8 frames, official short clips) or ``'32x2'`` (the
      paper's 32 frames: temporal stride 2 in conv1 and pool1).
    nonlocal_blocks: for res2..res5, the 0-based indices of the blocks followed
      by a non-local block, e.g. ((), (1, 3), (1, 3, 5), ()) for NL5 R50.
    nonlocal_options: keyword arguments of every NonLocalBlock (instantiation,
      pool_window, attention_path, ...).
    nonlocal_stage_options: per-stage overrides of `nonlocal_options` for
      res2..res5, e.g. ({}, {'temporal_group_size': 4}, {}, {}) for the
      official frozen-BN long-clip models, whose res3 blocks attend within
      groups of 4 frames.
    width: channels of the stem (64); stage widths follow as 4x, 8x, 16x, 32x.
    stem_pool_padding: ``'caffe2'`` (pad 0: 112 -> 55, official code) or
      ``'pyslowfast'`` (pad 0,1,1: 112 -> 56).
    temporal_pool: the 2x1x1 max pool after res2 (False: PySlowFast
      ``C2D_NOPOOL``, which keeps every frame up to res5).
    dropout_rate: dropout before the classifier (0.5).
    head_pool_window: None for global average pooling, or the official
      fixed window (e.g. (4, 7, 7)) for fully-convolutional testing.
    norm: ``'batch_norm'`` or ``'affine'`` (frozen, folded BN).
    zero_init_residual: gamma = 0 in the last BN of every bottleneck.
    in_channels: input channels (3).
    remat: rematerialisation in training (less activation memory, about
      one more forward pass of compute): ``'none'``, ``'blocks'`` (every
      residual and non-local block under ``nnx.remat``) or ``'full'`` (the
      whole backbone forward under one ``nnx.remat``). Parameters and their
      paths do not depend on it.
  """

  def __init__(
      self,
      *,
      num_classes: int,
      depth: int = 50,
      stage_depths: Sequence[int] | None = None,
      arch: Literal["c2d", "i3d"] = "c2d",
      inflation: Literal["3x1x1", "3x3x3"] = "3x1x1",
      clip: Literal["8x8", "32x2"] = "8x8",
      nonlocal_blocks: Sequence[Sequence[int]] = ((), (), (), ()),
      nonlocal_options: Mapping[str, Any] | None = None,
      nonlocal_stage_options: Sequence[Mapping[str, Any]] | None = None,
      width: int = 64,
      stem_pool_padding: Literal["caffe2", "pyslowfast"] = "caffe2",
      temporal_pool: bool = True,
      dropout_rate: float = 0.5,
      head_pool_window: Sequence[int] | None = None,
      norm: Norm = "batch_norm",
      zero_init_residual: bool = True,
      in_channels: int = 3,
      remat: Remat = "none",
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.remat = check_remat(remat)
    for name, value, choices in [("arch", arch, ARCHS), ("inflation", inflation, INFLATIONS),
                                 ("clip", clip, CLIPS),
                                 ("stem_pool_padding", stem_pool_padding, STEM_POOL_PADDINGS)]:
      if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {choices}")
    stage_depths = resolve_stage_depths(depth, stage_depths, nonlocal_blocks)
    stage_options = tuple(nonlocal_stage_options or ({},) * 4)
    if len(stage_options) != 4:
      raise ValueError(f"nonlocal_stage_options needs one mapping per stage res2..res5, got "
                       f"{len(stage_options)}: {stage_options!r}")
    self.temporal_pool = temporal_pool
    common = dict(norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    stem_t = 5 if arch == "i3d" else 1
    stride_t = 2 if clip == "32x2" else 1
    self.stem = ConvNorm(in_channels, width, (stem_t, 7, 7), stride=(stride_t, 2, 2), **common)
    self.stem_pool_window = (stride_t, 3, 3)
    self.stem_pool_stride = (stride_t, 2, 2)
    self.stem_pool_padding = ((0, 0), (0, 0), (0, 0)) if stem_pool_padding == "caffe2" else (
        (0, 0), (1, 1), (1, 1))

    stages = []
    in_features = width
    for s, (n, kernels, nl, options) in enumerate(zip(
        stage_depths, temporal_kernels(arch, stage_depths), nonlocal_blocks, stage_options)):
      inner = width * 2**s
      if inflation == "3x1x1":
        a_kernels, b_kernels = [(kt, 1, 1) for kt in kernels], [(1, 3, 3)] * n
      else:
        a_kernels, b_kernels = [(1, 1, 1)] * n, [(kt, 3, 3) for kt in kernels]
      stages.append(ResStage(
          in_features, inner, 4 * inner, a_kernels=a_kernels, b_kernels=b_kernels,
          stride=(1, 1, 1) if s == 0 else (1, 2, 2), dilations=[(1, 1, 1)] * n,
          nonlocal_indices=tuple(nl), nonlocal_options={**(nonlocal_options or {}), **options},
          zero_init_residual=zero_init_residual, remat_blocks=remat == "blocks", **common))
      in_features = 4 * inner
    self.stages = nnx.List(stages)
    self.head = ClassificationHead(in_features, num_classes, dropout_rate=dropout_rate,
                                   pool_window=head_pool_window, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """(B, T, H, W, C) -> res5 features (B, T/2 (/8 for 32x2), H/32, W/32, 32 * width).

    Without the temporal pool after res2, T is not halved there.
    """
    check_input(x, "(B, T, H, W, C) clips")
    x = nnx.relu(self.stem(x))
    x = max_pool(x, self.stem_pool_window, self.stem_pool_stride, self.stem_pool_padding)
    for s, stage in enumerate(self.stages):
      x = stage(x)
      if s == 0 and self.temporal_pool:  # Caffe2 pool2 / PySlowFast pathway0_pool
        if x.shape[1] < 2:
          raise ValueError(f"the clip is too short: {x.shape[1]} frame(s) reach the temporal "
                           "pool after res2, which needs at least 2")
        x = max_pool(x, (2, 1, 1))
    return x

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, T, H, W, C) -> logits (B, num_classes)."""
    if self.remat == "full":
      return self.head(nnx.remat(VideoResNet.features)(self, x))
    return self.head(self.features(x))
