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
from nonlocal_jax.relation_module import RelationModule

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

  With ``relation_modules`` = r > 0 this is the "2fc + RM" head of Hu et al.
  (CVPR 2018, eq. 10; r1 = r2 = 1 in the paper): after each fully connected
  layer, r object relation modules in sequence relate the RoIs of each image
  (appearance + box geometry), each adding its output to the features, then
  the ReLU (official code: ``fc_all_1 = fc_new_1 + attention_1``, then ReLU).
  Every valid RoI of an image is a key; the official code keys on the RPN
  proposals only, leaving out the ground-truth boxes appended in training.

  Args:
    relation_modules: relation modules after each of fc6 and fc7 (0: none,
      torchvision's head).
    relation_options: keyword arguments of every RelationModule (N_r 16,
      d_k 64, d_g 64 by default, the paper's).
  """

  def __init__(self, in_features: int, num_classes: int, *, resolution: int = 7,
               representation: int = 1024, relation_modules: int = 0,
               relation_options: Mapping[str, Any] | None = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not isinstance(relation_modules, int) or isinstance(relation_modules, bool) or (
        relation_modules < 0):
      raise ValueError(f"relation_modules must be an int >= 0 (relation modules after each "
                       f"fully connected layer), got {relation_modules!r}")
    common = dict(kernel_init=_torch_linear_init, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)
    self.fc6 = nnx.Conv(in_features, representation, (resolution, resolution),
                        padding="VALID", **common)
    self.fc7 = nnx.Linear(representation, representation, **common)
    self.scores = nnx.Linear(representation, num_classes, **common)
    self.deltas = nnx.Linear(representation, 4 * num_classes, **common)
    options = {"dtype": dtype, "param_dtype": param_dtype, **dict(relation_options or {})}
    relations = lambda: nnx.List([RelationModule(representation, rngs=rngs, **options)
                                  for _ in range(relation_modules)])
    self.fc6_relations, self.fc7_relations = relations(), relations()

  def __call__(self, pooled: jax.Array, boxes: jax.Array | None = None,
               valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """pooled (B * R, 7, 7, C) RoI features; with relation modules also the RoIs'
    boxes (B, R, 4) (x1, y1, x2, y2) and validity (B, R) -> logits, deltas."""
    x = self.fc6(pooled).reshape(pooled.shape[0], -1)
    x = nnx.relu(self._relate(self.fc6_relations, x, boxes, valid))
    x = nnx.relu(self._relate(self.fc7_relations, self.fc7(x), boxes, valid))
    return self.scores(x), self.deltas(x).reshape(x.shape[0], -1, 4)

  @staticmethod
  def _relate(modules: nnx.List, x: jax.Array, boxes: jax.Array | None,
              valid: jax.Array | None) -> jax.Array:
    """(B * R, D) features -> (B * R, D) after the relation modules, per image."""
    if not len(modules):
      return x
    if boxes is None or valid is None:
      raise ValueError("a box head with relation modules needs the RoIs' boxes (B, R, 4) and "
                       "validity (B, R)")
    per_image = x.reshape(*valid.shape, x.shape[-1])
    for module in modules:
      per_image = module(per_image, boxes, valid)
    return per_image.reshape(x.shape)


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
