"""Building blocks shared by the 2D, video and segmentation ResNets (channels-last, N-d).

Every kernel, stride and dilation is a tuple with one entry per position axis,
so the same modules build 2D (H, W) and 3D (T, H, W) networks. Convolutions
have no bias and are followed by a norm, as in the official code and
PySlowFast; the stride sits on the 3x3 convolution (PySlowFast
``STRIDE_1X1=False``, torchvision, mmseg ``style='pytorch'``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from nonlocal_jax.nonlocal_block import NonLocalBlock
from nonlocal_jax.normalization import batch_norm

Norm = Literal["batch_norm", "affine"]
NORMS = ("batch_norm", "affine")
Remat = Literal["none", "blocks", "full"]
# Rematerialisation (gradient checkpointing, JAX docs "Control autodiff's saved
# values with jax.checkpoint"): 'blocks' keeps only the input of every residual
# and non-local block for the backward pass and recomputes the rest; 'full'
# puts the whole backbone forward under one checkpoint.
REMAT_MODES = ("none", "blocks", "full")


def check_remat(remat: str) -> str:
  """`remat` itself if it is one of REMAT_MODES; a ValueError naming them otherwise."""
  if remat not in REMAT_MODES:
    raise ValueError(f"remat={remat!r} is not supported; choose one of {REMAT_MODES}")
  return remat


def _call(module: nnx.Module, *args: Any) -> Any:
  return module(*args)


def rematerialized(module: nnx.Module, *args: Any, enabled: bool = True) -> Any:
  """``module(*args)`` under ``nnx.remat`` (jax.checkpoint lifted to NNX) when `enabled`.

  The forward activations inside `module` are not kept for the backward pass
  but recomputed from its inputs; results, gradients and state updates (BN
  statistics) are the same. Only a trace-time wrapper: the module's
  parameters and their paths are untouched.
  """
  return nnx.remat(_call)(module, *args) if enabled else module(*args)

# Caffe2 MSRAFill / fvcore c2_msra_fill: He normal with fan_out.
msra_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class FrozenAffine(nnx.Module):
  """Per-channel y = scale * x + bias: a BatchNorm folded with frozen statistics.

  The official long-clip ('affine') models replace every BN by this
  (Caffe2 ``AffineChannel``); converted frozen-BN checkpoints load into it.
  """

  def __init__(self, num_features: int, *, scale_init=nnx.initializers.ones_init(),
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.scale = nnx.Param(scale_init(rngs.params(), (num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


def make_norm(num_features: int, norm: Norm, *, zero_init: bool = False, dtype=None,
              param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
  """BatchNorm (momentum 0.9 in Flax convention = Caffe2 0.9 = PyTorch 0.1, eps 1e-5)."""
  if norm not in NORMS:
    raise ValueError(f"norm={norm!r} is not supported; choose one of {NORMS}")
  scale_init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.ones_init()
  if norm == "affine":
    return FrozenAffine(num_features, scale_init=scale_init, param_dtype=param_dtype, rngs=rngs)
  return batch_norm(num_features, momentum=0.9, epsilon=1e-5, scale_init=scale_init,
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def check_input(x: jax.Array, layout: str) -> None:
  """A model's input must have the rank of `layout` (e.g. '(B, T, H, W, C) clips') and be float.

  Models take normalised float inputs, as the input pipeline makes them
  (``nonlocal_jax.preprocessing``: video (x / 255 - 0.45) / 0.225, images
  with the ImageNet mean / std); raw uint8 pixels are refused here rather
  than failing inside a convolution.
  """
  rank = layout.split(")")[0].count(",") + 1
  if x.ndim != rank:
    raise ValueError(f"this model takes {layout}; got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"this model takes float {layout}, normalised as the input pipeline does "
                    f"(e.g. video: (x / 255 - 0.45) / 0.225); got dtype {x.dtype}. Convert uint8 "
                    "pixels first, e.g. with nonlocal_jax.preprocessing.video.normalize")


STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def resolve_stage_depths(depth: int, stage_depths: Sequence[int] | None,
                         nonlocal_blocks: Sequence[Sequence[int]]) -> tuple[int, ...]:
  """Blocks per stage res2..res5 from a ResNet depth or an explicit list, checked."""
  if stage_depths is None:
    if depth not in STAGE_DEPTHS:
      raise ValueError(f"depth={depth!r} is not supported; choose one of {tuple(STAGE_DEPTHS)}")
    stage_depths = STAGE_DEPTHS[depth]
  if len(stage_depths) != 4 or len(nonlocal_blocks) != 4:
    raise ValueError(f"stage_depths {tuple(stage_depths)} and nonlocal_blocks "
                     f"{tuple(nonlocal_blocks)} need one entry per stage res2..res5")
  return tuple(stage_depths)


def _as_tuple(value: int | Sequence[int], rank: int) -> tuple[int, ...]:
  return (value,) * rank if isinstance(value, int) else tuple(value)


def _pointwise(x: jax.Array, w: jax.Array) -> jax.Array:
  """(..., I) @ (I, O) as one 2D matmul (a rank-5 contraction costs XLA transposes in backward)."""
  return (x.reshape(-1, w.shape[0]) @ w).reshape(*x.shape[:-1], w.shape[1])


class ConvNorm(nnx.Module):
  """Convolution (no bias, 'same'-style symmetric padding) followed by a norm.

  x: (B, *positions, C_in) -> (B, *positions / stride, C_out).
  """

  def __init__(self, in_features: int, out_features: int, kernel: Sequence[int], *,
               stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1,
               norm: Norm = "batch_norm", zero_init_norm: bool = False, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kernel = tuple(kernel)
    rank = len(kernel)
    dilation = _as_tuple(dilation, rank)
    padding = [((k - 1) * d // 2, (k - 1) * d // 2) for k, d in zip(kernel, dilation)]
    self.conv = nnx.Conv(in_features, out_features, kernel, strides=_as_tuple(stride, rank),
                         padding=padding, kernel_dilation=dilation, use_bias=False,
                         kernel_init=msra_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = make_norm(out_features, norm, zero_init=zero_init_norm, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

  def convolve(self, x: jax.Array) -> jax.Array:
    """The convolution alone, lowered to what XLA runs fastest (same result as ``self.conv``).

    XLA's CPU conv3d, and the transposes its gradients need, are much slower
    than matmuls and 2D convolutions (docs/benchmarks.md), so: pointwise
    kernels become one 2D matmul on the flattened (strided) positions;
    kt x 1 x 1 kernels (I3D) become kt such matmuls on time-shifted slices,
    summed; other video kernels (1 x 3 x 3, the I3D 5 x 7 x 7 stem, 3 x 3 x 3)
    become one 2D convolution with time folded into the batch and the kt
    time-shifted (strided) frames stacked on the channels.
    """
    conv = self.conv
    kernel = conv.kernel[...]
    if conv.dtype is not None:
      x, kernel = x.astype(conv.dtype), kernel.astype(conv.dtype)
    spatial = kernel.shape[:-2]
    if all(k == 1 for k in spatial):
      x = x[(slice(None), *(slice(None, None, s) for s in conv.strides))]
      return _pointwise(x, kernel.reshape(kernel.shape[-2:]))
    if len(spatial) == 3 and spatial[1:] == (1, 1) and conv.strides == (1, 1, 1) and (
        conv.kernel_dilation[0] == 1):
      x = jnp.pad(x, ((0, 0), conv.padding[0], (0, 0), (0, 0), (0, 0)))
      steps = x.shape[1] - spatial[0] + 1
      return sum(_pointwise(x[:, k:k + steps], kernel[k, 0, 0]) for k in range(spatial[0]))
    if len(spatial) == 3 and conv.kernel_dilation[0] == 1:
      # Time taps stacked on the channels: one 2D convolution, time folded into the batch.
      taps, stride = spatial[0], conv.strides[0]
      if taps > 1:
        x = jnp.pad(x, ((0, 0), conv.padding[0], (0, 0), (0, 0), (0, 0)))
      steps = (x.shape[1] - taps) // stride + 1
      x = jnp.concatenate([x[:, k:k + stride * (steps - 1) + 1:stride] for k in range(taps)],
                          axis=-1)
      kernel = jnp.moveaxis(kernel, 0, 2).reshape(*spatial[1:], -1, kernel.shape[-1])
      b = x.shape[0]
      y = jax.lax.conv_general_dilated(
          x.reshape(b * steps, *x.shape[2:]), kernel, conv.strides[1:], conv.padding[1:],
          rhs_dilation=conv.kernel_dilation[1:], dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return y.reshape(b, steps, *y.shape[1:])
    return conv(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.convolve(x))


class Bottleneck(nnx.Module):
  """ResNet bottleneck: a (1x1, or kt x1x1 when inflated) -> b (3x3, strided) -> c (1x1) + shortcut.

  Args:
    a_kernel / b_kernel: kernels of the first two convolutions, e.g. (3, 1, 1)
      and (1, 3, 3) for an I3D 3x1x1 block, (1, 1) and (3, 3) in 2D.
    stride: stride of b and of the projection shortcut.
    dilation: dilation of b (dilated segmentation backbones).
    zero_init_residual: gamma = 0 in c's norm (Caffe2 BN_INIT_GAMMA = 0,
      PySlowFast ZERO_INIT_FINAL_BN).

  x: (B, *positions, in_features) -> (B, *positions / stride, out_features).
  """

  def __init__(self, in_features: int, inner_features: int, out_features: int, *,
               a_kernel: Sequence[int], b_kernel: Sequence[int], stride: Sequence[int],
               dilation: Sequence[int], norm: Norm, zero_init_residual: bool, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    ones = (1,) * len(b_kernel)
    common = dict(norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.a = ConvNorm(in_features, inner_features, a_kernel, **common)
    self.b = ConvNorm(inner_features, inner_features, b_kernel, stride=stride, dilation=dilation,
                      **common)
    self.c = ConvNorm(inner_features, out_features, ones, zero_init_norm=zero_init_residual,
                      **common)
    needs_projection = in_features != out_features or any(s != 1 for s in stride)
    self.shortcut = (ConvNorm(in_features, out_features, ones, stride=stride, **common)
                     if needs_projection else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.a(x))
    y = nnx.relu(self.b(y))
    y = self.c(y)
    return nnx.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class ResStage(nnx.Module):
  """A stage of bottlenecks with non-local blocks after chosen blocks.

  Args:
    a_kernels / b_kernels / dilations: one entry per block.
    stride: stride of the first block.
    nonlocal_indices: 0-based block indices after which a NonLocalBlock is
      inserted (after the block's final ReLU, as in the official code).
    nonlocal_options: keyword arguments of every NonLocalBlock of the stage.
    remat_blocks: every bottleneck and non-local block under ``nnx.remat``
      (the model's ``remat='blocks'``).

  x: (B, *positions, in_features) -> (B, *positions / stride, out_features).
  """

  def __init__(self, in_features: int, inner_features: int, out_features: int, *,
               a_kernels: Sequence[Sequence[int]], b_kernels: Sequence[Sequence[int]],
               stride: Sequence[int], dilations: Sequence[Sequence[int]],
               nonlocal_indices: Sequence[int] = (),
               nonlocal_options: Mapping[str, Any] | None = None, norm: Norm = "batch_norm",
               zero_init_residual: bool = True, remat_blocks: bool = False, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.remat_blocks = remat_blocks
    num_blocks = len(a_kernels)
    bad = [i for i in nonlocal_indices if not 0 <= i < num_blocks]
    if bad:
      raise ValueError(
          f"non-local block indices {bad} are outside this stage's blocks 0..{num_blocks - 1}")
    blocks = []
    for i in range(num_blocks):
      blocks.append(Bottleneck(
          in_features if i == 0 else out_features, inner_features, out_features,
          a_kernel=a_kernels[i], b_kernel=b_kernels[i],
          stride=stride if i == 0 else (1,) * len(stride), dilation=dilations[i], norm=norm,
          zero_init_residual=zero_init_residual, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
    self.blocks = nnx.List(blocks)
    options = dict(nonlocal_options or {})
    options.setdefault("dtype", dtype)
    options.setdefault("param_dtype", param_dtype)
    self.nonlocal_blocks = nnx.Dict({
        str(i): NonLocalBlock(out_features, rngs=rngs, **options) for i in sorted(nonlocal_indices)})

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, block in enumerate(self.blocks):
      x = rematerialized(block, x, enabled=self.remat_blocks)
      if str(i) in self.nonlocal_blocks:
        x = rematerialized(self.nonlocal_blocks[str(i)], x, enabled=self.remat_blocks)
    return x


class ClassificationHead(nnx.Module):
  """Average pool -> dropout -> linear, optionally fully convolutional.

  With ``pool_window=None`` features are averaged over all positions and the
  head returns logits (B, num_classes) for any input size. With a window (the
  official code: (T_res5, 7, 7) for 224 training crops) the average pool has
  stride 1 and the linear layer is applied at every remaining location; in
  training mode the per-location logits are averaged, in eval mode the
  per-location softmax is averaged (official fully-convolutional test) and
  its log is returned, so ``softmax(output)`` is that average.

  x: (B, *positions, C) -> (B, num_classes).
  """

  def __init__(self, in_features: int, num_classes: int, *, dropout_rate: float,
               pool_window: Sequence[int] | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.pool_window = None if pool_window is None else tuple(pool_window)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.projection = nnx.Linear(in_features, num_classes,
                                 kernel_init=nnx.initializers.normal(0.01), dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    self.deterministic = False

  def set_view(self, deterministic: bool | None = None):
    """Used by ``nnx.view``: eval mode averages probabilities instead of logits."""
    if deterministic is not None:
      self.deterministic = deterministic

  def __call__(self, x: jax.Array) -> jax.Array:
    position_axes = tuple(range(1, x.ndim - 1))
    if self.pool_window is None:
      return self.projection(self.dropout(jnp.mean(x, axis=position_axes)))
    if len(self.pool_window) != len(position_axes) or any(
        w > n for w, n in zip(self.pool_window, x.shape[1:-1])):
      raise ValueError(f"head pool_window={self.pool_window} does not fit features of shape "
                       f"{x.shape}; the input clip is too small for this model")
    x = nnx.avg_pool(x, self.pool_window, strides=(1,) * len(position_axes), padding="VALID")
    logits = self.projection(self.dropout(x))
    logits = logits.astype(jnp.promote_types(jnp.float32, logits.dtype))
    if self.deterministic:
      probs = jax.nn.softmax(logits, axis=-1).mean(axis=position_axes)
      return jnp.log(probs)
    return logits.mean(axis=position_axes)
