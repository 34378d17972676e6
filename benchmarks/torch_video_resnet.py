"""A PyTorch C2D / I3D ResNet with non-local blocks, structured and named as PySlowFast's.

Reference for benchmarks and for the converter tests: the module names follow
``slowfast/models/video_model_builder.py`` (``s1.pathway0_stem``,
``s{2..5}.pathway0_res{i}.branch2.{a,b,c}``, ``pathway0_nonlocal{i}``,
``pathway0_pool``, ``head.projection``), and so do the numerics: max pool
before phi/g, BN eps 1e-5, and the head's softmax averaged over positions in
eval mode (``ResNetBasicHead``). Only for benchmarks and tests; the core never
imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_I3D_PATTERN = ((3,), (3, 1), (3, 1), (1, 3))
_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class Nonlocal(nn.Module):
  """PySlowFast ``Nonlocal``: pool before phi/g, softmax with 1/sqrt(d), conv_out, BN, residual.

  ``use_bn=False`` is the official frozen-BN ("affine") block, which has no
  BN; ``group_size`` attends within groups of that many consecutive frames
  (Caffe2 ``add_nonlocal_group``).
  """

  def __init__(self, dim: int, pool_size: Sequence[int] = (1, 2, 2), use_bn: bool = True,
               group_size: int | None = None):
    super().__init__()
    inner = dim // 2
    self.conv_theta = nn.Conv3d(dim, inner, 1)
    self.conv_phi = nn.Conv3d(dim, inner, 1)
    self.conv_g = nn.Conv3d(dim, inner, 1)
    self.conv_out = nn.Conv3d(inner, dim, 1)
    if use_bn:
      self.bn = nn.BatchNorm3d(dim)
    self.pool = nn.MaxPool3d(pool_size, pool_size)
    self.inner = inner
    self.group_size = group_size

  def _attend(self, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    theta = self.conv_theta(x)
    pooled = self.pool(x)
    phi, g = self.conv_phi(pooled), self.conv_g(pooled)
    theta, phi, g = (t.reshape(n, self.inner, -1) for t in (theta, phi, g))
    attention = torch.einsum("nct,ncp->ntp", theta, phi) * self.inner**-0.5
    attention = attention.softmax(dim=2)
    y = torch.einsum("ntg,ncg->nct", attention, g).reshape(n, self.inner, *x.shape[2:])
    y = self.conv_out(y)
    return self.bn(y) if hasattr(self, "bn") else y

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if not self.group_size:
      return x + self._attend(x)
    n, c, t, h, w = x.shape
    groups = t // self.group_size
    grouped = x.reshape(n, c, groups, self.group_size, h, w).transpose(1, 2).reshape(
        n * groups, c, self.group_size, h, w)
    y = self._attend(grouped).reshape(n, groups, c, self.group_size, h, w).transpose(1, 2)
    return x + y.reshape(n, c, t, h, w)


class BottleneckTransform(nn.Module):
  def __init__(self, dim_in: int, dim_inner: int, dim_out: int, temporal: int, stride: int):
    super().__init__()
    self.a = nn.Conv3d(dim_in, dim_inner, (temporal, 1, 1), padding=(temporal // 2, 0, 0),
                       bias=False)
    self.a_bn = nn.BatchNorm3d(dim_inner)
    self.b = nn.Conv3d(dim_inner, dim_inner, (1, 3, 3), stride=(1, stride, stride),
                       padding=(0, 1, 1), bias=False)
    self.b_bn = nn.BatchNorm3d(dim_inner)
    self.c = nn.Conv3d(dim_inner, dim_out, 1, bias=False)
    self.c_bn = nn.BatchNorm3d(dim_out)

  def forward(self, x):
    x = torch.relu(self.a_bn(self.a(x)))
    x = torch.relu(self.b_bn(self.b(x)))
    return self.c_bn(self.c(x))


class ResBlock(nn.Module):
  def __init__(self, dim_in: int, dim_inner: int, dim_out: int, temporal: int, stride: int):
    super().__init__()
    if dim_in != dim_out or stride != 1:
      self.branch1 = nn.Conv3d(dim_in, dim_out, 1, stride=(1, stride, stride), bias=False)
      self.branch1_bn = nn.BatchNorm3d(dim_out)
    self.branch2 = BottleneckTransform(dim_in, dim_inner, dim_out, temporal, stride)

  def forward(self, x):
    shortcut = self.branch1_bn(self.branch1(x)) if hasattr(self, "branch1") else x
    return torch.relu(shortcut + self.branch2(x))


class ResStage(nn.Module):
  def __init__(self, dim_in, dim_inner, dim_out, temporals, stride, nonlocal_indices,
               nonlocal_options=None):
    super().__init__()
    self.num_blocks = len(temporals)
    self.nonlocal_indices = set(nonlocal_indices)
    for i, temporal in enumerate(temporals):
      self.add_module(f"pathway0_res{i}", ResBlock(dim_in if i == 0 else dim_out, dim_inner,
                                                   dim_out, temporal, stride if i == 0 else 1))
      if i in self.nonlocal_indices:
        self.add_module(f"pathway0_nonlocal{i}", Nonlocal(dim_out, **(nonlocal_options or {})))

  def forward(self, x):
    for i in range(self.num_blocks):
      x = getattr(self, f"pathway0_res{i}")(x)
      if i in self.nonlocal_indices:
        x = getattr(self, f"pathway0_nonlocal{i}")(x)
    return x


class Stem(nn.Module):
  def __init__(self, width: int, temporal: int, temporal_stride: int, pool_padding: int):
    super().__init__()
    self.conv = nn.Conv3d(3, width, (temporal, 7, 7), stride=(temporal_stride, 2, 2),
                          padding=(temporal // 2, 3, 3), bias=False)
    self.bn = nn.BatchNorm3d(width)
    self.pool_layer = nn.MaxPool3d((temporal_stride, 3, 3), (temporal_stride, 2, 2),
                                   (0, pool_padding, pool_padding))

  def forward(self, x):
    return self.pool_layer(torch.relu(self.bn(self.conv(x))))


class VideoStem(nn.Module):
  def __init__(self, *args):
    super().__init__()
    self.pathway0_stem = Stem(*args)

  def forward(self, x):
    return self.pathway0_stem(x)


class Head(nn.Module):
  """PySlowFast ``ResNetBasicHead``: average pool (global if no window), dropout, projection.

  In eval mode the softmax is applied per location and averaged over the
  remaining positions: the output is then probabilities, not logits.
  """

  def __init__(self, dim_in: int, num_classes: int, dropout: float,
               pool_size: Sequence[int] | None = None):
    super().__init__()
    self.pool = nn.AvgPool3d(pool_size, stride=1) if pool_size else nn.AdaptiveAvgPool3d(1)
    self.dropout = nn.Dropout(dropout)
    self.projection = nn.Linear(dim_in, num_classes)

  def forward(self, x):
    x = self.projection(self.dropout(self.pool(x).permute(0, 2, 3, 4, 1)))
    if not self.training:
      x = x.softmax(dim=4)
    return x.mean(dim=(1, 2, 3))


class VideoResNet(nn.Module):
  """C2D / I3D ResNet-50/101 (NCTHW input) with NL blocks after the given block indices.

  Args:
    clip: '8x8' (official short clips) or '32x2' (temporal stride 2 in conv1
      and pool1, Caffe2 ``resnet_video_org``).
    stem_pool_padding: 0 (Caffe2) or 1 (PySlowFast).
    temporal_pool: the 2x1x1 max pool between s2 and s3 (False: PySlowFast
      ``c2d_nopool``).
    nonlocal_options / res3_nonlocal_options: keyword arguments of every
      ``Nonlocal`` / of those of s3 (e.g. ``group_size``).
  """

  def __init__(self, arch: str = "i3d", depth: int = 50, num_classes: int = 400,
               nonlocal_blocks: Sequence[Sequence[int]] = ((), (1, 3), (1, 3, 5), ()),
               stem_pool_padding: int = 0, dropout: float = 0.5, *, width: int = 64,
               stage_depths: Sequence[int] | None = None, clip: str = "8x8",
               temporal_pool: bool = True, head_pool_size: Sequence[int] | None = None,
               nonlocal_options: dict | None = None, res3_nonlocal_options: dict | None = None):
    super().__init__()
    depths = stage_depths or _DEPTHS[depth]
    temporal_stride = 2 if clip == "32x2" else 1
    self.s1 = VideoStem(width, 5 if arch == "i3d" else 1, temporal_stride, stem_pool_padding)
    dim_in = width
    for s, (n, pattern, nl) in enumerate(zip(depths, _I3D_PATTERN, nonlocal_blocks)):
      temporals = [pattern[i % len(pattern)] if arch == "i3d" else 1 for i in range(n)]
      inner = width * 2**s
      options = dict(nonlocal_options or {})
      if s == 1:
        options.update(res3_nonlocal_options or {})
      self.add_module(f"s{s + 2}", ResStage(dim_in, inner, 4 * inner, temporals,
                                            1 if s == 0 else 2, nl, options))
      dim_in = 4 * inner
    self.pathway0_pool = nn.MaxPool3d((2, 1, 1), (2, 1, 1)) if temporal_pool else nn.Identity()
    self.head = Head(dim_in, num_classes, dropout, head_pool_size)

  def forward(self, x):
    x = self.s2(self.s1(x))
    x = self.pathway0_pool(x)
    return self.head(self.s5(self.s4(self.s3(x))))
