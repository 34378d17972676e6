"""Layers of the detection heads that Flax does not provide with PyTorch's exact semantics.

* :class:`ConvTranspose2d`: ``torch.nn.ConvTranspose2d`` (kernel k, stride s,
  padding p: output (H - 1) s - 2p + k), used by Mask R-CNN's mask predictor
  (k2 s2) and Keypoint R-CNN's keypoint predictor (k4 s2 p1).
* :func:`resize_nearest`: ``F.interpolate(mode='nearest')`` to a given size
  (source index floor(dst * in / out)), the FPN's top-down path.
* :func:`upsample_bilinear`: ``F.interpolate(scale_factor, mode='bilinear',
  align_corners=False)``, the keypoint heatmaps' final x2.

Channels-last: (B, H, W, C).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# torchvision's detection heads initialise with kaiming_normal_(mode='fan_out', relu).
kaiming_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# The same for a transposed convolution: PyTorch's fan_out of its (I, O, k, k) weight is
# I k k, which is Flax's fan_in of our (k, k, I, O) kernel.
kaiming_transposed = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


class ConvTranspose2d(nnx.Module):
  """torch.nn.ConvTranspose2d on channels-last maps: (B, H, W, I) -> (B, (H-1)s-2p+k, ..., O).

  ``kernel`` is (k, k, I, O) with out[s i + a - p, s j + b - p, o] +=
  x[i, j, c] * kernel[a, b, c, o]; a PyTorch weight (I, O, k, k) maps to it
  by ``transpose(2, 3, 0, 1)``.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int,
               padding: int = 0, kernel_init=kaiming_transposed, param_dtype=jnp.float32,
               dtype=None, rngs: nnx.Rngs):
    if padding > kernel_size - 1:
      raise ValueError(f"padding={padding} must be at most kernel_size - 1 = {kernel_size - 1}")
    self.stride, self.padding, self.dtype = stride, padding, dtype
    self.kernel = nnx.Param(kernel_init(rngs.params(),
                                        (kernel_size, kernel_size, in_features, out_features),
                                        param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = self.kernel[...], self.bias[...]
    if self.dtype is not None:
      x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    k, s, p = kernel.shape[0], self.stride, self.padding
    n, h, w, _ = x.shape
    # Sub-pixel form: every input pixel times every tap, (B, H, W, k, k, O), then tap
    # a = q s + r lands on output row s (i + q) + r: an overlap-add over the q shifts of
    # each phase r, and the phases interleaved. Only matmuls and pads, forward and backward
    # (XLA:CPU's convolution with lhs_dilation had a weight gradient ~100x slower).
    taps = -(-k // s)
    z = jnp.einsum("nhwc,abco->nhwabo", x, kernel)
    z = jnp.pad(z, ((0, 0),) * 3 + ((0, taps * s - k),) * 2 + ((0, 0),))
    z = z.reshape(n, h, w, taps, s, taps, s, -1)
    phases = sum(jnp.pad(z[:, :, :, qy, :, qx], ((0, 0), (qy, taps - 1 - qy),
                                                 (qx, taps - 1 - qx), (0, 0), (0, 0), (0, 0)))
                 for qy in range(taps) for qx in range(taps))
    y = phases.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h + taps - 1) * s, (w + taps - 1) * s, -1)
    return y[:, p:p + (h - 1) * s - 2 * p + k, p:p + (w - 1) * s - 2 * p + k] + bias


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(B, h, w, C) -> (B, H, W, C) with PyTorch's 'nearest' rule: source floor(dst * h / H)."""
  rows = jnp.floor(jnp.arange(size[0]) * (x.shape[1] / size[0])).astype(jnp.int32)
  cols = jnp.floor(jnp.arange(size[1]) * (x.shape[2] / size[1])).astype(jnp.int32)
  return x[:, rows][:, :, cols]


def upsample_bilinear(x: jax.Array, scale: int) -> jax.Array:
  """(B, H, W, C) -> (B, sH, sW, C), bilinear with half-pixel centres (align_corners=False)."""
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, h * scale, w * scale, c), method="linear", antialias=False)
