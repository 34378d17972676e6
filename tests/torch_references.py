"""PyTorch models laid out as torchvision's ResNet and mmsegmentation's NonLocalNet.

Written from the frameworks' module structure (spec 5.3, 5.4) so that their
``state_dict()`` keys are the published checkpoints' keys. Test-only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class Bottleneck(nn.Module):
  """torchvision / mmseg (style 'pytorch') bottleneck: stride and dilation on conv2."""

  def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = None
    if stride != 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes * 4))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def _layer(inplanes: int, planes: int, blocks: int, stride: int, dilation: int,
           first_dilation: int) -> nn.Sequential:
  return nn.Sequential(*[
      Bottleneck(inplanes if i == 0 else planes * 4, planes, stride if i == 0 else 1,
                 first_dilation if i == 0 else dilation) for i in range(blocks)])


class TorchvisionResNet(nn.Module):
  """torchvision ``resnet50`` (``conv1``, ``bn1``, ``layer1..4``, ``fc``) at any width."""

  def __init__(self, stage_depths: Sequence[int] = (3, 4, 6, 3), width: int = 64,
               num_classes: int = 1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = width
    for k, blocks in enumerate(stage_depths):
      planes = width * 2**k
      setattr(self, f"layer{k + 1}", _layer(inplanes, planes, blocks, 1 if k == 0 else 2, 1, 1))
      inplanes = planes * 4
    self.fc = nn.Linear(inplanes, num_classes)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(x.mean(dim=(2, 3)))


class ConvModule(nn.Module):
  """mmcv ConvModule: ``.conv`` (bias only without norm), optional ``.bn``, optional ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int, *, norm: bool = True, relu: bool = True):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=not norm)
    if norm:
      self.bn = nn.BatchNorm2d(cout)
    self.relu = relu

  def forward(self, x):
    x = self.conv(x)
    x = self.bn(x) if hasattr(self, "bn") else x
    return F.relu(x) if self.relu else x


class NonLocal2d(nn.Module):
  """mmcv ``NonLocal2d`` (embedded Gaussian, use_scale, no subsampling, BN on conv_out)."""

  def __init__(self, channels: int):
    super().__init__()
    self.inter = channels // 2
    self.g = ConvModule(channels, self.inter, 1, norm=False, relu=False)
    self.theta = ConvModule(channels, self.inter, 1, norm=False, relu=False)
    self.phi = ConvModule(channels, self.inter, 1, norm=False, relu=False)
    self.conv_out = ConvModule(self.inter, channels, 1, relu=False)

  def forward(self, x):
    n, _, h, w = x.shape
    g_x = self.g(x).view(n, self.inter, -1).permute(0, 2, 1)
    theta_x = self.theta(x).view(n, self.inter, -1).permute(0, 2, 1)
    phi_x = self.phi(x).view(n, self.inter, -1)
    weight = (torch.matmul(theta_x, phi_x) / theta_x.shape[-1]**0.5).softmax(dim=-1)
    y = torch.matmul(weight, g_x).permute(0, 2, 1).reshape(n, self.inter, h, w)
    return x + self.conv_out(y)


class ResNetV1c(nn.Module):
  """mmseg ``ResNetV1c``: deep stem, strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contracted."""

  def __init__(self, stage_depths: Sequence[int], width: int):
    super().__init__()
    half = width // 2
    self.stem = nn.Sequential(
        nn.Conv2d(3, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
        nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
        nn.Conv2d(half, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = width
    for k, (blocks, stride, dilation) in enumerate(zip(stage_depths, (1, 2, 1, 1), (1, 1, 2, 4))):
      planes = width * 2**k
      setattr(self, f"layer{k + 1}",
              _layer(inplanes, planes, blocks, stride, dilation, max(dilation // 2, 1)))
      inplanes = planes * 4

  def forward(self, x):
    x = self.maxpool(self.stem(x))
    outs = []
    for k in range(4):
      x = getattr(self, f"layer{k + 1}")(x)
      outs.append(x)
    return outs


class NLHead(nn.Module):
  def __init__(self, cin: int, channels: int, num_classes: int):
    super().__init__()
    self.convs = nn.ModuleList([ConvModule(cin, channels, 3), ConvModule(channels, channels, 3)])
    self.nl_block = NonLocal2d(channels)
    self.conv_cat = ConvModule(cin + channels, channels, 3)
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)

  def forward(self, x):
    y = self.convs[1](self.nl_block(self.convs[0](x)))
    return self.conv_seg(self.conv_cat(torch.cat([x, y], dim=1)))


class FCNHead(nn.Module):
  def __init__(self, cin: int, channels: int, num_classes: int):
    super().__init__()
    self.convs = nn.ModuleList([ConvModule(cin, channels, 3)])
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)

  def forward(self, x):
    return self.conv_seg(self.convs[0](x))


class NonLocalNet(nn.Module):
  """mmseg EncoderDecoder with ``backbone``, ``decode_head`` (NLHead), ``auxiliary_head`` (FCN).

  Returns (logits, aux_logits), bilinearly resized to the input (align_corners=False).
  """

  def __init__(self, stage_depths: Sequence[int] = (3, 4, 6, 3), width: int = 64,
               head_channels: int = 512, aux_channels: int = 256, num_classes: int = 19):
    super().__init__()
    self.backbone = ResNetV1c(stage_depths, width)
    self.decode_head = NLHead(width * 32, head_channels, num_classes)
    self.auxiliary_head = FCNHead(width * 16, aux_channels, num_classes)

  def forward(self, x):
    outs = self.backbone(x)
    size = x.shape[2:]
    resize = lambda y: F.interpolate(y, size=size, mode="bilinear", align_corners=False)
    return resize(self.decode_head(outs[3])), resize(self.auxiliary_head(outs[2]))
