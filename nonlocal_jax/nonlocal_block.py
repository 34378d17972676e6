"""The non-local block (Wang et al., CVPR 2018) as a Flax NNX module.

    y_i = 1/C(x) * sum_j f(x_i, x_j) g(x_j),     z = BN(W_z y) + x

Inputs are channels-last with 1, 2 or 3 position axes: (B, L, C) sequences,
(B, H, W, C) images, (B, T, H, W, C) videos. Positions are flattened and the
pairwise term is computed by :mod:`nonlocal_jax.attention`.

Defaults follow the official Caffe2 code (facebookresearch/video-nonlocal-net)
and PySlowFast, which produced the published numbers; the paper's and mmcv's
variants are options (see the constructor).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from nonlocal_jax import attention
from nonlocal_jax.normalization import batch_norm
from nonlocal_jax.pooling import max_pool

Instantiation = Literal["embedded_gaussian", "gaussian", "dot_product", "concatenation"]
INSTANTIATIONS = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
RESTRICTIONS = ("spacetime", "space", "time")
ATTENTION_PATHS = ("einsum", "chunked", "xla", "auto")
POOL_POSITIONS = ("before", "after")
FINAL_NORMS = ("batch_norm", "none")

# Default subsampling window per number of position axes (time is never pooled).
DEFAULT_POOL_WINDOWS = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}

# (score, normalisation) of each instantiation; see nonlocal_jax.attention.
_KERNELS = {
    "embedded_gaussian": ("dot", "softmax"),
    "gaussian": ("dot", "softmax"),
    "dot_product": ("dot", "mean"),
    "concatenation": ("sum", "relu_mean"),
}


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not supported; choose one of {choices}")


def _project(linear: nnx.Linear, x: jax.Array) -> jax.Array:
  """A 1x1 projection of (B, *positions, C) as one 2D matmul (cheaper backward on XLA CPU)."""
  return linear(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], linear.out_features)


def _fold_local_axes(x: jax.Array, local_axes: Sequence[int], cells: Sequence[int]) -> jax.Array:
  """Groups positions by cell along `local_axes` and folds the cell index into the batch.

  x: (B, L_0, ..., L_{n-1}, D) with L_a = K_a * cells[a] for every local axis.
  Returns (B * prod_local K_a, prod of the remaining extents, D): each row of
  the result holds the positions that share one cell along the local axes.
  """
  b, *lengths, d = x.shape
  shape, outer, inner = [b], [0], []
  for axis, length in enumerate(lengths):
    if axis in local_axes:
      shape += [length // cells[axis], cells[axis]]
      outer.append(len(shape) - 2)
      inner.append(len(shape) - 1)
    else:
      shape.append(length)
      inner.append(len(shape) - 1)
  x = x.reshape(*shape, d).transpose(*outer, *inner, len(shape))
  return x.reshape(math.prod(x.shape[: len(outer)]), -1, d)


def _unfold_local_axes(y: jax.Array, batch: int, lengths: Sequence[int], local_axes: Sequence[int],
                       cells: Sequence[int]) -> jax.Array:
  """Inverse of `_fold_local_axes`: (B * cells, positions, D) -> (B, *lengths, D)."""
  d = y.shape[-1]
  outer_shape = [lengths[a] // cells[a] for a in range(len(lengths)) if a in local_axes]
  inner_shape = [cells[a] if a in local_axes else lengths[a] for a in range(len(lengths))]
  y = y.reshape(batch, *outer_shape, *inner_shape, d)
  # Interleave each local axis' outer and inner index back into place.
  n_outer = len(outer_shape)
  order, next_outer = [0], 1
  for axis in range(len(lengths)):
    if axis in local_axes:
      order.append(next_outer)
      next_outer += 1
    order.append(1 + n_outer + axis)
  y = y.transpose(*order, y.ndim - 1)
  return y.reshape(batch, *lengths, d)


class NonLocalBlock(nnx.Module):
  """Non-local block z = x + BN(W_z y) over all positions of a feature map.

  Args:
    in_features: channels C of the input (and output).
    instantiation: pairwise function f. ``'embedded_gaussian'`` (default;
      softmax_j(theta_i . phi_j)), ``'gaussian'`` (softmax_j(x_i . x_j) on the
      raw features, no theta/phi), ``'dot_product'`` (theta_i . phi_j divided
      by the number of key positions) or ``'concatenation'``
      (ReLU(w_f [theta_i, phi_j]) divided by the number of key positions).
    inner_features: channels of theta, phi and g (default C // 2).
    use_scale: multiply softmax logits by 1/sqrt(d) (d = inner_features, or C
      for ``'gaussian'``). Default: on for embedded Gaussian as in the official
      code, off otherwise.
    pool_window: max-pool window (= stride) over the position axes that
      subsamples the keys and values; ``'auto'`` is (2,), (2, 2) or (1, 2, 2)
      for 1, 2 or 3 position axes; ``None`` switches subsampling off.
    pool_position: ``'before'`` phi/g (official Caffe2 and PySlowFast) or
      ``'after'`` them (the paper's wording, mmcv, AlexHex7). The two differ
      numerically.
    final_norm: ``'batch_norm'`` after W_z with gamma = beta = 0 at init
      (official), or ``'none'``: no norm and W_z = 0 at init (the official
      frozen-BN 'affine' runs). Either way the block is the identity at init.
    use_bias: biases on theta, phi and g (official: on).
    use_out_bias: bias on W_z (official: on; mmcv has none when a norm follows).
    temporal_group_size: attend only within groups of this many consecutive
      steps of the first position axis (official ``add_nonlocal_group``).
    restriction: ``'spacetime'`` (all positions), ``'space'`` (keys in the
      query's own frame) or ``'time'`` (keys at the query's own spatial cell);
      the paper's Table 2d. Videos only.
    attention_path: ``'einsum'`` (materialises the N x M matrix),
      ``'chunked'`` (exact, streams over key blocks), ``'xla'``
      (``jax.nn.dot_product_attention``; softmax instantiations with
      d(theta) = d(g)) or ``'auto'`` (chunked when the float32 N x M matrix
      would exceed `auto_threshold_bytes`, else einsum).
    chunk_size: keys per block of the chunked path.
    auto_threshold_bytes: see `attention_path`.
    init_std: std of the normal init of theta, phi, g, W_z and w_f
      (official 0.01).
    bn_momentum, bn_epsilon: BatchNorm running-average momentum (Flax
      convention: 0.9 keeps 90% of the old value) and epsilon.
    dtype: computation dtype (None: inferred). Scores and softmax stay float32
      (float64 for float64 inputs).
    param_dtype: parameter dtype.
    capture_attention: if True, sow the attention weights as
      ``nnx.Intermediate`` 'attention_weights' (read them with
      ``nnx.capture``); forces the einsum path. Set it on a whole model with
      ``nnx.view(model, capture_attention=True)``.
    rngs: random streams for parameter init.

  Shapes: input and output (B, *positions, C). The sown weights are
  (B, *positions, *key_positions) for spacetime attention without groups
  (key positions: the pooled grid), else (B', Nq, Nk) in the folded layout.
  """

  def __init__(
      self,
      in_features: int,
      *,
      instantiation: Instantiation = "embedded_gaussian",
      inner_features: int | None = None,
      use_scale: bool | None = None,
      pool_window: Sequence[int] | Literal["auto"] | None = "auto",
      pool_position: Literal["before", "after"] = "before",
      final_norm: Literal["batch_norm", "none"] = "batch_norm",
      use_bias: bool = True,
      use_out_bias: bool = True,
      temporal_group_size: int | None = None,
      restriction: Literal["spacetime", "space", "time"] = "spacetime",
      attention_path: Literal["einsum", "chunked", "xla", "auto"] = "auto",
      chunk_size: int = 512,
      auto_threshold_bytes: int = 256 * 2**20,
      init_std: float = 0.01,
      bn_momentum: float = 0.9,
      bn_epsilon: float = 1e-5,
      dtype: jnp.dtype | None = None,
      param_dtype: jnp.dtype = jnp.float32,
      capture_attention: bool = False,
      rngs: nnx.Rngs,
  ):
    _check_choice("instantiation", instantiation, INSTANTIATIONS)
    _check_choice("restriction", restriction, RESTRICTIONS)
    _check_choice("attention_path", attention_path, ATTENTION_PATHS)
    _check_choice("pool_position", pool_position, POOL_POSITIONS)
    _check_choice("final_norm", final_norm, FINAL_NORMS)
    if not isinstance(in_features, int) or in_features < 1:
      raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    inner_features = max(in_features // 2, 1) if inner_features is None else inner_features
    if not isinstance(inner_features, int) or inner_features < 1:
      raise ValueError(f"inner_features must be a positive int, got {inner_features!r}")
    if pool_window is not None and pool_window != "auto":
      pool_window = tuple(pool_window)
      if not pool_window or not all(isinstance(p, int) and p >= 1 for p in pool_window):
        raise ValueError(f"pool_window must be positive ints, 'auto' or None; got {pool_window!r}")
    if temporal_group_size is not None and (
        not isinstance(temporal_group_size, int) or temporal_group_size < 1):
      raise ValueError(f"temporal_group_size must be a positive int or None, got {temporal_group_size!r}")

    self.in_features = in_features
    self.inner_features = inner_features
    self.instantiation = instantiation
    self.use_scale = (instantiation == "embedded_gaussian") if use_scale is None else use_scale
    self.pool_window = pool_window
    self.pool_position = pool_position
    self.final_norm = final_norm
    self.temporal_group_size = temporal_group_size
    self.restriction = restriction
    self.attention_path = attention_path
    self.chunk_size = chunk_size
    self.auto_threshold_bytes = auto_threshold_bytes
    self.dtype = dtype
    self.capture_attention = capture_attention

    init = nnx.initializers.normal(init_std)
    linear = lambda i, o, bias, kinit=init: nnx.Linear(  # 1x1(x1) convolutions
        i, o, use_bias=bias, kernel_init=kinit, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if instantiation != "gaussian":
      self.theta = linear(in_features, inner_features, use_bias)
      self.phi = linear(in_features, inner_features, use_bias)
    self.g = linear(in_features, inner_features, use_bias)
    if instantiation == "concatenation":
      # w_f: [theta_i, phi_j] (2d) -> 1, no bias (mmcv concat_project).
      self.concat_project = linear(2 * inner_features, 1, False)
    out_init = init if final_norm == "batch_norm" else nnx.initializers.zeros_init()
    self.out = linear(inner_features, in_features, use_out_bias, out_init)
    if final_norm == "batch_norm":
      self.bn = batch_norm(
          in_features, momentum=bn_momentum, epsilon=bn_epsilon,
          scale_init=nnx.initializers.zeros_init(), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def set_view(self, capture_attention: bool | None = None):
    """Used by ``nnx.view``: ``nnx.view(model, capture_attention=True)``."""
    if capture_attention is not None:
      self.capture_attention = capture_attention

  # -- shape handling -------------------------------------------------------

  def _pool_window_for(self, num_positions: int) -> tuple[int, ...] | None:
    if self.pool_window == "auto":
      return DEFAULT_POOL_WINDOWS[num_positions]
    if self.pool_window is not None and len(self.pool_window) != num_positions:
      raise ValueError(
          f"pool_window={self.pool_window} has {len(self.pool_window)} entries but the input has "
          f"{num_positions} position axes")
    return self.pool_window

  def _check_input(self, x: jax.Array) -> None:
    if x.ndim not in (3, 4, 5):
      raise ValueError(
          f"NonLocalBlock expects (B, L, C), (B, H, W, C) or (B, T, H, W, C) input, got rank "
          f"{x.ndim} with shape {x.shape}")
    if x.shape[-1] != self.in_features:
      raise ValueError(
          f"input has {x.shape[-1]} channels (shape {x.shape}) but the block was built with "
          f"in_features={self.in_features}")
    if self.restriction != "spacetime" and x.ndim != 5:
      raise ValueError(
          f"restriction={self.restriction!r} needs a video (B, T, H, W, C); got shape {x.shape}")
    if self.temporal_group_size and x.shape[1] % self.temporal_group_size:
      raise ValueError(
          f"temporal_group_size={self.temporal_group_size} does not divide the first position "
          f"axis of length {x.shape[1]} (input shape {x.shape})")

  # -- forward --------------------------------------------------------------

  def _embed(self, x: jax.Array, window: tuple[int, ...] | None):
    """Returns theta (queries), phi (keys), g (values) on position grids."""
    pool = (lambda t: max_pool(t, window)) if window else (lambda t: t)
    g = functools.partial(_project, self.g)
    if self.instantiation == "gaussian":
      keys_in = pool(x)
      return x, keys_in, g(keys_in) if self.pool_position == "before" else pool(g(x))
    phi = functools.partial(_project, self.phi)
    theta = _project(self.theta, x)
    if self.pool_position == "before":
      x_pooled = pool(x)
      return theta, phi(x_pooled), g(x_pooled)
    return theta, pool(phi(x)), pool(g(x))

  def _pairwise_inputs(self, theta: jax.Array, phi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Queries and keys as the attention kernels take them (scale and w_f folded in)."""
    if self.instantiation == "concatenation":
      w_f = self.concat_project.kernel[...]  # (2d, 1)
      d = self.inner_features
      return theta @ w_f[:d].astype(theta.dtype), phi @ w_f[d:].astype(phi.dtype)
    if self.use_scale:
      theta = theta * (theta.shape[-1] ** -0.5)
    return theta, phi

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, grids: tuple | None) -> jax.Array:
    score, normalization = _KERNELS[self.instantiation]
    if self.capture_attention:
      w = attention.attention_weights(q, k, score, normalization)
      self.sow(nnx.Intermediate, "attention_weights",
               w if grids is None else w.reshape(w.shape[0], *grids[0], *grids[1]))
      return jnp.einsum("bnm,bmd->bnd", w.astype(v.dtype), v,
                        preferred_element_type=attention.accumulator_dtype(w, v)).astype(v.dtype)
    path = self.attention_path
    if path == "auto":
      path = "chunked" if attention.einsum_bytes(q, k) > self.auto_threshold_bytes else "einsum"
    if path == "chunked":
      return attention.attend_chunked(q, k, v, score, normalization, self.chunk_size)
    if path == "xla":
      if normalization != "softmax":
        raise ValueError(f"attention_path='xla' needs a softmax instantiation, not "
                         f"{self.instantiation!r}")
      return attention.attend_dot_product_attention(q, k, v)
    return attention.attend_einsum(q, k, v, score, normalization)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, *positions, C) -> z: same shape."""
    self._check_input(x)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    batch, *positions, _ = x.shape
    window = self._pool_window_for(len(positions))
    if window is not None:
      for axis, (length, w) in enumerate(zip(positions, window)):
        extent = self.temporal_group_size if axis == 0 and self.temporal_group_size else length
        if w > extent:
          raise ValueError(
              f"pool_window={window} is larger than the input positions {tuple(positions)} "
              f"(axis {axis}: window {w} > size {extent}); use a smaller window or None")

    xg = x
    if self.temporal_group_size:  # fold groups of consecutive steps into the batch
      g = self.temporal_group_size
      xg = x.reshape(batch * (positions[0] // g), g, *positions[1:], x.shape[-1])

    theta, phi, g = self._embed(xg, window)
    query_grid = theta.shape[1:-1]
    key_grid = phi.shape[1:-1]
    local_axes = {"spacetime": (), "space": (0,), "time": (1, 2)}[self.restriction]
    cells = tuple(q // k for q, k in zip(query_grid, key_grid))
    for axis in local_axes:
      if query_grid[axis] != key_grid[axis] * cells[axis]:
        raise ValueError(
            f"restriction={self.restriction!r} needs position axis {axis} of size "
            f"{query_grid[axis]} to be divisible by the pool window {window}")

    q, k = self._pairwise_inputs(theta, phi)
    q = _fold_local_axes(q, local_axes, cells)
    k = _fold_local_axes(k, local_axes, (1,) * len(cells))
    v = _fold_local_axes(g, local_axes, (1,) * len(cells))
    unfolded = not local_axes and not self.temporal_group_size
    y = self._attend(q, k, v, (query_grid, key_grid) if unfolded else None)
    y = _unfold_local_axes(y, xg.shape[0], query_grid, local_axes, cells)
    y = y.reshape(batch, *positions, y.shape[-1])

    out = _project(self.out, y)
    if self.final_norm == "batch_norm":
      out = self.bn(out)
    return x + out
