"""The convolutional and fully connected heads of Mask R-CNN and Keypoint R-CNN.

Layer for layer torchvision's (``models/detection/rpn.py`` ``RPNHead``,
``faster_rcnn.py`` ``TwoMLPHead`` / ``FastRCNNPredictor``, ``mask_rcnn.py``
``MaskRCNNHeads`` / ``MaskRCNNPredictor``, ``keypoint_rcnn.py``
``KeypointRCNNHeads`` / ``KeypointRCNNPredictor``), which are Detectron's
(He et al., ICCV 2017) up to initialisation. Channels-last throughout.

The heads can carry non-local blocks: Wang et al. (CVPR 2018, section 6)
insert 4 into the keypoint head, one after every 2 of its 8 convolutions
(:class:`ConvStackHead` ``nonlocal_after``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nonlocal_jax.detection.layers import ConvTranspose2d, kaiming_fan_out, upsample_bilinear
from nonlocal_jax.nonlocal_block import NonLocalBlock

# nn.Linear's default initialisation (kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in))).
_torch_linear_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class RPNHead(nnx.Module):
  """Shared over levels: 3x3 conv + ReLU, then 1x1 objectness (A) and 1x1 box deltas (4A).

  Per level (B, H, W, C) -> objectness (B, H * W * A) and deltas (B, H * W * A, 4),
  ordered location-major then anchor, as torchvision's ``permute_and_flatten``.
  """

  def __init__(self, in_features: int, num_anchors: int, *, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    common = dict(kernel_init=nnx.initializers.normal(0.01), dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
    self.conv = nnx.Conv(in_features, in_features, (3, 3), padding=((1, 1), (1, 1)), **common)
    self.objectness = nnx.Conv(in_features, num_anchors, (1, 1), **common)
    self.deltas = nnx.Conv(in_features, 4 * num_anchors, (1, 1), **common)

  def __call__(self, levels: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """[(B, H_l, W_l, C)] -> (objectness (B, N), deltas (B, N, 4)), N = sum_l H_l W_l A."""
    scores, deltas = [], []
    for x in levels:
      t = nnx.relu(self.conv(x))
      b = x.shape[0]
      scores.append(self.objectness(t).reshape(b, -1))
      deltas.append(self.deltas(t).reshape(b, -1, 4))
    return jnp.concatenate(scores, axis=1), jnp.concatenate(deltas, axis=1)


class BoxHead(nnx.Module):
  """TwoMLPHead + FastRCNNPredictor: (R, 7, 7, C) -> class logits (R, K), deltas (R, K, 4).

  ``fc6`` is a 7x7 'valid' convolution, i.e. torchvision's Linear over the
  flattened (C, 7, 7) features with its weight reshaped to (O, C, 7, 7).
  """

  def __init__(self, in_features: int, num_classes: int, *, resolution: int = 7,
               representation: int = 1024, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    common = dict(kernel_init=_torch_linear_init, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)
    self.fc6 = nnx.Conv(in_features, representation, (resolution, resolution),
                        padding="VALID", **common)
    self.fc7 = nnx.Linear(representation, representation, **common)
    self.scores = nnx.Linear(representation, num_classes, **common)
    self.deltas = nnx.Linear(representation, 4 * num_classes, **common)

  def __call__(self, pooled: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = nnx.relu(self.fc6(pooled).reshape(pooled.shape[0], -1))
    x = nnx.relu(self.fc7(x))
    return self.scores(x), self.deltas(x).reshape(x.shape[0], -1, 4)


class ConvStackHead(nnx.Module):
  """`num_convs` 3x3 convolutions + ReLU (MaskRCNNHeads, KeypointRCNNHeads).

  Args:
    nonlocal_after: 0-based indices of the convolutions followed by a
      non-local block (Wang et al.: (1, 3, 5, 7) in the 8-conv keypoint head).
    nonlocal_options: keyword arguments of those NonLocalBlocks.

  (R, S, S, C_in) -> (R, S, S, features).
  """

  def __init__(self, in_features: int, features: int, num_convs: int, *,
               nonlocal_after: Sequence[int] = (),
               nonlocal_options: Mapping[str, Any] | None = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    bad = [i for i in nonlocal_after if not 0 <= i < num_convs]
    if bad:
      raise ValueError(f"nonlocal_after {bad} are outside the head's convolutions "
                       f"0..{num_convs - 1}")
    self.convs = nnx.List([
        nnx.Conv(in_features if i == 0 else features, features, (3, 3),
                 padding=((1, 1), (1, 1)), kernel_init=kaiming_fan_out, dtype=dtype,
                 param_dtype=param_dtype, rngs=rngs) for i in range(num_convs)])
    options = {"dtype": dtype, "param_dtype": param_dtype, **dict(nonlocal_options or {})}
    self.nonlocal_blocks = nnx.Dict({
        str(i): NonLocalBlock(features, rngs=rngs, **options) for i in sorted(nonlocal_after)})

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, conv in enumerate(self.convs):
      x = nnx.relu(conv(x))
      if str(i) in self.nonlocal_blocks:
        x = self.nonlocal_blocks[str(i)](x)
    return x


class MaskPredictor(nnx.Module):
  """MaskRCNNPredictor: 2x2/2 transposed conv + ReLU, 1x1 conv: (R, 14, 14, C) -> (R, 28, 28, K)."""

  def __init__(self, in_features: int, features: int, num_classes: int, *, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.upsample = ConvTranspose2d(in_features, features, 2, stride=2, **common)
    self.logits = nnx.Conv(features, num_classes, (1, 1), kernel_init=kaiming_fan_out, **common)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.logits(nnx.relu(self.upsample(x)))


class KeypointPredictor(nnx.Module):
  """KeypointRCNNPredictor: 4x4/2 transposed conv (padding 1), then bilinear x2.

  (R, 14, 14, C) -> heatmap logits (R, 56, 56, num_keypoints).
  """

  def __init__(self, in_features: int, num_keypoints: int, *, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.upsample = ConvTranspose2d(in_features, num_keypoints, 4, stride=2, padding=1,
                                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return upsample_bilinear(self.upsample(x), 2)
