"""A PyTorch C2D / I3D ResNet with non-local blocks, structured and named as PySlowFast's.

Reference for benchmarks (and a source of PySlowFast-style state dicts): the
module names follow ``slowfast/models/video_model_builder.py`` (``s1.pathway0_stem``,
``s{2..5}.pathway0_res{i}.branch2.{a,b,c}``, ``pathway0_nonlocal{i}``,
``head.projection``). Only for benchmarks and tests; the core never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_I3D_PATTERN = ((3,), (3, 1), (3, 1), (1, 3))


class Nonlocal(nn.Module):
  """PySlowFast ``Nonlocal``: pool before phi/g, softmax with 1/sqrt(d), conv_out, BN, residual."""

  def __init__(self, dim: int, pool_size: Sequence[int] = (1, 2, 2)):
    super().__init__()
    inner = dim // 2
    self.conv_theta = nn.Conv3d(dim, inner, 1)
    self.conv_phi = nn.Conv3d(dim, inner, 1)
    self.conv_g = nn.Conv3d(dim, inner, 1)
    self.conv_out = nn.Conv3d(inner, dim, 1)
    self.bn = nn.BatchNorm3d(dim)
    self.pool = nn.MaxPool3d(pool_size, pool_size)
    self.inner = inner

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    theta = self.conv_theta(x)
    pooled = self.pool(x)
    phi, g = self.conv_phi(pooled), self.conv_g(pooled)
    theta, phi, g = theta.view(n, self.inner, -1), phi.view(n, self.inner, -1), g.view(
        n, self.inner, -1)
    attention = torch.einsum("nct,ncp->ntp", theta, phi) * self.inner**-0.5
    attention = attention.softmax(dim=2)
    y = torch.einsum("ntg,ncg->nct", attention, g).view(n, self.inner, *x.shape[2:])
    return x + self.bn(self.conv_out(y))


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
  def __init__(self, dim_in, dim_inner, dim_out, temporals, stride, nonlocal_indices):
    super().__init__()
    self.num_blocks = len(temporals)
    self.nonlocal_indices = set(nonlocal_indices)
    for i, temporal in enumerate(temporals):
      self.add_module(f"pathway0_res{i}", ResBlock(dim_in if i == 0 else dim_out, dim_inner,
                                                   dim_out, temporal, stride if i == 0 else 1))
      if i in self.nonlocal_indices:
        self.add_module(f"pathway0_nonlocal{i}", Nonlocal(dim_out))

  def forward(self, x):
    for i in range(self.num_blocks):
      x = getattr(self, f"pathway0_res{i}")(x)
      if i in self.nonlocal_indices:
        x = getattr(self, f"pathway0_nonlocal{i}")(x)
    return x


class Stem(nn.Module):
  def __init__(self, temporal: int, pool_padding: int):
    super().__init__()
    self.conv = nn.Conv3d(3, 64, (temporal, 7, 7), stride=(1, 2, 2),
                          padding=(temporal // 2, 3, 3), bias=False)
    self.bn = nn.BatchNorm3d(64)
    self.pool_layer = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, pool_padding, pool_padding))

  def forward(self, x):
    return self.pool_layer(torch.relu(self.bn(self.conv(x))))


class VideoStem(nn.Module):
  def __init__(self, temporal: int, pool_padding: int):
    super().__init__()
    self.pathway0_stem = Stem(temporal, pool_padding)

  def forward(self, x):
    return self.pathway0_stem(x)


class Head(nn.Module):
  def __init__(self, dim_in: int, num_classes: int, dropout: float):
    super().__init__()
    self.dropout = nn.Dropout(dropout)
    self.projection = nn.Linear(dim_in, num_classes)

  def forward(self, x):
    return self.projection(self.dropout(x.mean(dim=(2, 3, 4))))


class VideoResNet(nn.Module):
  """8x8 C2D / I3D ResNet-50/101 (NCTHW input) with NL blocks after the given block indices."""

  def __init__(self, arch: str = "i3d", depth: int = 50, num_classes: int = 400,
               nonlocal_blocks: Sequence[Sequence[int]] = ((), (1, 3), (1, 3, 5), ()),
               stem_pool_padding: int = 0, dropout: float = 0.5):
    super().__init__()
    depths = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    self.s1 = VideoStem(5 if arch == "i3d" else 1, stem_pool_padding)
    dim_in = 64
    for s, (n, pattern, nl) in enumerate(zip(depths, _I3D_PATTERN, nonlocal_blocks)):
      temporals = [pattern[i % len(pattern)] if arch == "i3d" else 1 for i in range(n)]
      inner = 64 * 2**s
      self.add_module(f"s{s + 2}", ResStage(dim_in, inner, 4 * inner, temporals,
                                            1 if s == 0 else 2, nl))
      dim_in = 4 * inner
    self.pathway0_pool = nn.MaxPool3d((2, 1, 1), (2, 1, 1))
    self.head = Head(dim_in, num_classes, dropout)

  def forward(self, x):
    x = self.s2(self.s1(x))
    x = self.pathway0_pool(x)
    return self.head(self.s5(self.s4(self.s3(x))))
