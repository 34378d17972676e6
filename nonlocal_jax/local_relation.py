"""The local relation layer (Hu, Zhang, Xie, Lin, ICCV 2019) as a Flax NNX module.

For an output position p' and every neighbour p of its k x k window Omega(p'):

    w(p', p) = softmax_{p in Omega(p')} ( Phi(q_{p'}, k_p) + g(p - p') )
    y(c, p') = sum_{p in Omega(p')} w_{group(c)}(p', p) x(c, p)

q = W_q x and k = W_k x are 1x1 projections (the appearance term Phi compares
them), g is a small network on the relative position p - p' (the geometry
prior), and the values are the input itself. One weight map is shared by each
group of m consecutive channels (the paper's channel sharing; the official
LR-Net V2 CUDA kernel also groups consecutive channels). A 1x1 projection
follows the aggregation: it is what makes the paper's LR-Net-50 23.3M
parameters (without it the network has 20.3M).

Neighbours outside the image are left out of the softmax (weight 0), as in the
official kernel, which gives them a logit of -100 and no value. With a stride
s the windows are centred on every s-th input position (padding k // 2), so
the output grid matches a k x k convolution with 'same'-style padding.

Inputs are channels-last images (B, H, W, C). Patches are strided slices of
the padded maps stacked on a neighbour axis, contracted with einsum; logits,
softmax and sums are float32 for bf16 / float32 inputs (float64 for float64).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Composability = Literal["squared_difference", "absolute_difference", "multiplication"]
COMPOSABILITIES = ("squared_difference", "absolute_difference", "multiplication")

# He normal with fan_out, the init of the ResNets' convolutions (Caffe2 MSRAFill).
_msra_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _positive_int(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def output_size(size: int, stride: int) -> int:
  """Output extent of a window sweep with padding k // 2: ceil(size / stride)."""
  return -(-size // stride)


def extract_patches(x: jax.Array, kernel_size: int, stride: int) -> jax.Array:
  """The k x k neighbourhood of every output position, zero outside the image.

  x: (B, H, W, D) -> (B, H', W', k * k, D), H' = ceil(H / stride); neighbour
  index i * k + j is the offset (i - k // 2, j - k // 2) from the window centre
  (s * h', s * w').
  """
  r = kernel_size // 2
  b, h, w, d = x.shape
  ho, wo = output_size(h, stride), output_size(w, stride)
  x = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
  # Separable: k column shifts, then k row shifts of those (2k slices, not k * k).
  cols = jnp.stack([x[:, :, j:j + stride * (wo - 1) + 1:stride] for j in range(kernel_size)],
                   axis=3)  # (B, H + 2r, W', k, D)
  rows = jnp.stack([cols[:, i:i + stride * (ho - 1) + 1:stride] for i in range(kernel_size)],
                   axis=3)  # (B, H', W', k, k, D)
  return rows.reshape(b, ho, wo, kernel_size * kernel_size, d)


def relative_positions(kernel_size: int) -> np.ndarray:
  """(k * k, 2) offsets p - p' = (dy, dx) of the window's neighbours, in pixels."""
  r = kernel_size // 2
  return np.array([(i - r, j - r) for i in range(kernel_size) for j in range(kernel_size)],
                  np.float32)


def valid_neighbours(height: int, width: int, kernel_size: int, stride: int) -> np.ndarray:
  """(H', W', k * k) bool: which window neighbours lie inside the H x W image."""
  r = kernel_size // 2
  rows = stride * np.arange(output_size(height, stride))[:, None] + np.arange(-r, r + 1)
  cols = stride * np.arange(output_size(width, stride))[:, None] + np.arange(-r, r + 1)
  row_ok = (rows >= 0) & (rows < height)  # (H', k)
  col_ok = (cols >= 0) & (cols < width)  # (W', k)
  return (row_ok[:, None, :, None] & col_ok[None, :, None, :]).reshape(
      row_ok.shape[0], col_ok.shape[0], kernel_size * kernel_size)


class LocalRelation(nnx.Module):
  """Local relation layer: adaptive k x k aggregation of the input channels.

  Args:
    in_features: channels C of the input.
    out_features: channels of the output 1x1 projection (default C).
    kernel_size: odd window size k (the paper studies 3, 5, 7 and 9; 7 in LR-Net).
    stride: output positions are every `stride`-th input position.
    channels_per_group: m, the number of consecutive channels sharing one
      aggregation weight map (paper default 8); it must divide C.
    key_reduction: r, the channel reduction of the key and query maps: they
      have C / r channels, split evenly over the C / m weight maps, and Phi
      sums over the channels of a map. Default r = m: one scalar key and query
      per map (the paper's C / m channels). r must divide m.
    composability: Phi. ``'squared_difference'`` -(q - k)^2 (default),
      ``'absolute_difference'`` -|q - k| or ``'multiplication'`` q k (the
      official V2 kernel's default), summed over a map's key channels.
    appearance: include the appearance term Phi (False: weights from the
      geometry prior alone, a softmax-normalised depthwise kernel per map).
    geometry_prior: include g(p - p'), two 1x1 layers with a ReLU between on
      the (dy, dx) offset, one output per weight map.
    geometry_hidden_features: width of g's hidden layer (default half the
      number of weight maps, at least 1).
    output_projection: the 1x1 projection after the aggregation (no bias: a
      norm follows in LR-Net). Without it `out_features` must equal C.
    use_bias: biases on the key and query maps and the geometry prior's hidden
      layer (its output layer has none: a constant per map cancels in the
      softmax).
    dtype: computation dtype (None: inferred). Logits, softmax and sums are
      float32 (float64 for float64 inputs).
    param_dtype: parameter dtype.
    rngs: random streams for parameter init.

  Shapes: x (B, H, W, C) -> (B, ceil(H / stride), ceil(W / stride), out_features).
  """

  def __init__(
      self,
      in_features: int,
      out_features: int | None = None,
      *,
      kernel_size: int = 7,
      stride: int = 1,
      channels_per_group: int = 8,
      key_reduction: int | None = None,
      composability: Composability = "squared_difference",
      appearance: bool = True,
      geometry_prior: bool = True,
      geometry_hidden_features: int | None = None,
      output_projection: bool = True,
      use_bias: bool = True,
      dtype: jnp.dtype | None = None,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    _positive_int("in_features", in_features)
    out_features = in_features if out_features is None else out_features
    _positive_int("out_features", out_features)
    _positive_int("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
      raise ValueError(f"kernel_size={kernel_size} must be odd (a window centred on each "
                       f"position), e.g. 3, 5, 7 or 9")
    _positive_int("stride", stride)
    _positive_int("channels_per_group", channels_per_group)
    if in_features % channels_per_group:
      raise ValueError(f"channels_per_group={channels_per_group} does not divide "
                       f"in_features={in_features}; use a divisor of {in_features}")
    key_reduction = channels_per_group if key_reduction is None else key_reduction
    _positive_int("key_reduction", key_reduction)
    if channels_per_group % key_reduction:
      raise ValueError(f"key_reduction={key_reduction} must divide channels_per_group="
                       f"{channels_per_group} (each weight map gets "
                       f"channels_per_group / key_reduction key channels)")
    if composability not in COMPOSABILITIES:
      raise ValueError(f"composability={composability!r} is not supported; choose one of "
                       f"{COMPOSABILITIES}")
    if not appearance and not geometry_prior:
      raise ValueError("appearance=False and geometry_prior=False leave no term to weigh the "
                       "neighbours; keep at least one")
    if not output_projection and out_features != in_features:
      raise ValueError(f"output_projection=False keeps the {in_features} input channels; "
                       f"out_features={out_features} needs the projection")

    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = kernel_size
    self.stride = stride
    self.channels_per_group = channels_per_group
    self.num_groups = in_features // channels_per_group
    self.key_features = in_features // key_reduction
    self.composability = composability
    self.dtype = dtype

    linear = lambda i, o, bias, **kw: nnx.Linear(
        i, o, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kw)
    self.query = linear(in_features, self.key_features, use_bias) if appearance else None
    self.key = linear(in_features, self.key_features, use_bias) if appearance else None
    if geometry_prior:
      hidden = (max(self.num_groups // 2, 1) if geometry_hidden_features is None
                else geometry_hidden_features)
      _positive_int("geometry_hidden_features", hidden)
      self.geometry_hidden = linear(2, hidden, use_bias)
      # No bias: a constant per weight map cancels in the softmax.
      self.geometry_out = linear(hidden, self.num_groups, False)
    else:
      self.geometry_hidden = self.geometry_out = None
    self.projection = (linear(in_features, out_features, False, kernel_init=_msra_init)
                       if output_projection else None)

  def geometry_logits(self) -> jax.Array:
    """g(p - p') for the k * k offsets: (k * k, C / m), float32 (float64 for float64 params).

    Computed at (at least) float32 whatever `dtype`: it is a k * k table.
    """
    acc = jnp.promote_types(jnp.float32, self.geometry_out.kernel[...].dtype)

    def dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
      y = x @ layer.kernel[...].astype(acc)
      return y if layer.bias is None else y + layer.bias[...].astype(acc)

    offsets = jnp.asarray(relative_positions(self.kernel_size), acc)
    return dense(self.geometry_out, nnx.relu(dense(self.geometry_hidden, offsets)))

  def _appearance_logits(self, x: jax.Array, acc: jnp.dtype) -> jax.Array:
    """Phi(q_{p'}, k_p): (B, H', W', k * k, C / m) in `acc`."""
    s, g = self.stride, self.num_groups
    q = _project(self.query, x[:, ::s, ::s])
    k = extract_patches(_project(self.key, x), self.kernel_size, s)
    q = q.reshape(*q.shape[:3], 1, g, -1).astype(acc)  # (B, H', W', 1, G, d)
    k = k.reshape(*k.shape[:4], g, -1).astype(acc)  # (B, H', W', k*k, G, d)
    if self.composability == "multiplication":
      return jnp.sum(q * k, axis=-1)
    if self.composability == "absolute_difference":
      return -jnp.sum(jnp.abs(q - k), axis=-1)
    return -jnp.sum(jnp.square(q - k), axis=-1)

  def aggregation_weights(self, x: jax.Array) -> jax.Array:
    """w(p', p): (B, H', W', k * k, C / m), float32 (float64 for float64 inputs).

    Neighbour index i * k + j is the offset (i - k // 2, j - k // 2); weights of
    neighbours outside the image are 0.
    """
    self._check_input(x)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    acc = jnp.promote_types(jnp.float32, x.dtype)
    b, h, w, _ = x.shape
    valid = valid_neighbours(h, w, self.kernel_size, self.stride)
    shape = (b, *valid.shape, self.num_groups)
    logits = jnp.zeros(shape, acc)
    if self.query is not None:
      logits = self._appearance_logits(x, acc)
    if self.geometry_out is not None:
      logits = logits + self.geometry_logits().astype(acc)
    logits = jnp.where(jnp.asarray(valid)[None, :, :, :, None], logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=3)

  def _check_input(self, x: jax.Array) -> None:
    if x.ndim != 4:
      raise ValueError(f"LocalRelation expects (B, H, W, C) images, got rank {x.ndim} with "
                       f"shape {x.shape}")
    if x.shape[-1] != self.in_features:
      raise ValueError(f"input has {x.shape[-1]} channels (shape {x.shape}) but the layer was "
                       f"built with in_features={self.in_features}")

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, ceil(H / stride), ceil(W / stride), out_features)."""
    weights = self.aggregation_weights(x)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    acc = weights.dtype
    values = extract_patches(x, self.kernel_size, self.stride)
    values = values.reshape(*values.shape[:4], self.num_groups, self.channels_per_group)
    y = jnp.einsum("bhwng,bhwngc->bhwgc", weights.astype(x.dtype), values,
                   preferred_element_type=acc).astype(x.dtype)
    y = y.reshape(*y.shape[:3], self.in_features)
    return y if self.projection is None else _project(self.projection, y)


def _project(linear: nnx.Linear, x: jax.Array) -> jax.Array:
  """A 1x1 projection of (B, H, W, C) as one 2D matmul."""
  return linear(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], linear.out_features)
