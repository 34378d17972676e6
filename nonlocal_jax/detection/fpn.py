"""Feature pyramid network (Lin et al., CVPR 2017) as torchvision builds it for Mask R-CNN.

torchvision ``ops.feature_pyramid_network.FeaturePyramidNetwork`` with
``LastLevelMaxPool``: a 1x1 lateral convolution per input level, a top-down
path adding the nearest-upsampled coarser level, a 3x3 output convolution per
level, and one extra coarsest level by max pooling (kernel 1, stride 2) of the
last output (P6, only for the RPN). All convolutions have biases.

Input: ResNet res2..res5 maps (B, H/4, W/4, C2) ... (B, H/32, W/32, C5);
output: P2..P6 (B, H/4, W/4, D) ... (B, H/64, W/64, D), D = 256 by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nonlocal_jax.detection.layers import resize_nearest

# torchvision initialises the FPN convolutions with kaiming_uniform_(a=1), bias 0.
_kaiming_uniform_a1 = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")


class FeaturePyramid(nnx.Module):
  """P_l = 3x3(lateral_l(C_l) + nearest_upsample(inner_{l+1})); plus P6 = P5[::2, ::2].

  Args:
    in_features: channels of the input levels, finest first (256, 512, 1024, 2048).
    out_features: channels of every output level (256).
    extra_max_pool: append the max-pooled coarsest level (torchvision's
      ``LastLevelMaxPool``, key ``'pool'``).
  """

  def __init__(self, in_features: Sequence[int], out_features: int = 256, *,
               extra_max_pool: bool = True, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if not in_features:
      raise ValueError("in_features must list at least one level's channels")
    common = dict(kernel_init=_kaiming_uniform_a1, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)
    self.inner = nnx.List([nnx.Conv(c, out_features, (1, 1), **common) for c in in_features])
    self.layer = nnx.List([nnx.Conv(out_features, out_features, (3, 3),
                                    padding=((1, 1), (1, 1)), **common) for _ in in_features])
    self.extra_max_pool = extra_max_pool

  def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
    """[C2..C5] finest first -> [P2..P5 (, P6)], each (B, H_l, W_l, out_features)."""
    if len(features) != len(self.inner):
      raise ValueError(f"expected {len(self.inner)} input levels, got {len(features)}")
    last = self.inner[-1](features[-1])
    outputs = [self.layer[-1](last)]
    for level in range(len(features) - 2, -1, -1):
      lateral = self.inner[level](features[level])
      last = lateral + resize_nearest(last, lateral.shape[1:3])
      outputs.insert(0, self.layer[level](last))
    if self.extra_max_pool:  # F.max_pool2d(x, kernel_size=1, stride=2)
      outputs.append(outputs[-1][:, ::2, ::2])
    return outputs
