"""The object relation module (Hu, Gu, Zhang, Dai, Wei, CVPR 2018) as a Flax NNX module.

For N objects with appearance features f_A^n (D-d) and boxes f_G^n, each of
N_r heads computes (paper eqs. 2-5)

    f_R(n)  = sum_m w^{mn} (W_V f_A^m)
    w^{mn}  = w_G^{mn} exp(w_A^{mn}) / sum_k w_G^{kn} exp(w_A^{kn})
    w_A^{mn} = <W_K f_A^m, W_Q f_A^n> / sqrt(d_k)
    w_G^{mn} = max(0, W_G E_G(f_G^m, f_G^n))

and the module returns f_A^n + Concat_r[f_R^r(n)] (each head D / N_r wide).
The weights are computed stably as softmax_m(log(max(w_G, eps)) + w_A), as in
the official MXNet code (msracver/Relation-Networks-for-Object-Detection).

Relative geometry follows the official code: for query n and key m,
(log(max(|cx_n - cx_m| / w_n, 1e-3)), log(max(|cy_n - cy_m| / h_n, 1e-3)),
log(w_n / w_m), log(h_n / h_m)) -- centre offsets normalised by the query box
(the paper's text normalises by the key box). E_G embeds each of the 4 values
with sin and cos of 100 * value / 1000^(8 i / d_g), i < d_g / 8, concatenated
per coordinate (dx, dy, dw, dh) into d_g dims.

W_V is applied before the aggregation (one D x D matrix); the official code
applies it after, as a 1x1 convolution with N_r groups, which is the same map.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# Constants of the official position embedding (extract_position_embedding).
WAVE_LENGTH = 1000.0
POSITION_SCALE = 100.0
MIN_CENTRE_OFFSET = 1e-3


def _positive_int(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def relative_geometry(boxes: jax.Array, size_offset: float = 0.0) -> jax.Array:
  """(..., N, 4) boxes (x1, y1, x2, y2) -> (..., N, N, 4), entry [n, m] for query n, key m.

  Box widths are x2 - x1 + size_offset (1.0 reproduces the official code's
  pixel-inclusive sizes).
  """
  x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
  w, h = x2 - x1 + size_offset, y2 - y1 + size_offset
  cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
  pair = lambda a: (a[..., :, None], a[..., None, :])  # (query, key)
  (cxn, cxm), (cyn, cym), (wn, wm), (hn, hm) = pair(cx), pair(cy), pair(w), pair(h)
  dx = jnp.log(jnp.maximum(jnp.abs(cxn - cxm) / wn, MIN_CENTRE_OFFSET))
  dy = jnp.log(jnp.maximum(jnp.abs(cyn - cym) / hn, MIN_CENTRE_OFFSET))
  return jnp.stack([dx, dy, jnp.log(wn / wm), jnp.log(hn / hm)], axis=-1)


def geometry_embedding(geometry: jax.Array, features: int) -> jax.Array:
  """E_G: (..., 4) -> (..., features), per coordinate [sin(features / 8), cos(features / 8)]."""
  freqs = WAVE_LENGTH ** (8.0 / features * jnp.arange(features // 8, dtype=geometry.dtype))
  angles = POSITION_SCALE * geometry[..., None] / freqs  # (..., 4, features / 8)
  embedding = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return embedding.reshape(*geometry.shape[:-1], features)


class RelationModule(nnx.Module):
  """Object relation module: multi-head attention between objects with a geometry term.

  Args:
    in_features: D, the object feature width (1024 after the detector's fc).
    num_heads: N_r (paper default 16); must divide D.
    key_features: d_k, key and query width per head (64).
    geometry_features: d_g, width of the geometry embedding E_G (64); a
      multiple of 8.
    geometry: include w_G (False: plain softmax of w_A, the paper's 'none'
      geometry ablation).
    eps: floor of w_G inside the log (official 1e-6).
    size_offset: added to x2 - x1 and y2 - y1 for box sizes (official 1.0).
    init_std: std of the normal init of every layer, biases 0 (official 0.01).
    dtype: computation dtype (None: inferred) of the query, key and value
      projections. The geometry term (embedding and W_G), logits and softmax
      are float32 (float64 for float64 inputs or parameters).
    param_dtype: parameter dtype.
    rngs: random streams for parameter init.

  Shapes: features (..., N, D), boxes (..., N, 4) as (x1, y1, x2, y2), optional
  mask (..., N) bool (False: a padded object, ignored as a key and returned
  unchanged) -> (..., N, D).
  """

  def __init__(
      self,
      in_features: int = 1024,
      *,
      num_heads: int = 16,
      key_features: int = 64,
      geometry_features: int = 64,
      geometry: bool = True,
      eps: float = 1e-6,
      size_offset: float = 0.0,
      init_std: float = 0.01,
      dtype: jnp.dtype | None = None,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    _positive_int("in_features", in_features)
    _positive_int("num_heads", num_heads)
    _positive_int("key_features", key_features)
    _positive_int("geometry_features", geometry_features)
    if in_features % num_heads:
      raise ValueError(f"num_heads={num_heads} does not divide in_features={in_features} "
                       f"(each head outputs in_features / num_heads channels)")
    if geometry_features % 8:
      raise ValueError(f"geometry_features={geometry_features} must be a multiple of 8 "
                       f"(4 box coordinates x sin/cos x frequencies)")
    if not eps > 0:
      raise ValueError(f"eps must be positive, got {eps!r}")
    self.in_features = in_features
    self.num_heads = num_heads
    self.key_features = key_features
    self.geometry_features = geometry_features
    self.eps = eps
    self.size_offset = size_offset
    self.dtype = dtype

    linear = lambda i, o: nnx.Linear(
        i, o, kernel_init=nnx.initializers.normal(init_std), dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.query = linear(in_features, num_heads * key_features)
    self.key = linear(in_features, num_heads * key_features)
    self.value = linear(in_features, in_features)
    self.geometry = linear(geometry_features, num_heads) if geometry else None

  def _check_inputs(self, features: jax.Array, boxes: jax.Array, mask: jax.Array | None) -> None:
    if features.ndim < 2 or features.shape[-1] != self.in_features:
      raise ValueError(f"features must be (..., N, {self.in_features}), got shape "
                       f"{features.shape}")
    if boxes.shape != (*features.shape[:-1], 4):
      raise ValueError(f"boxes must be (..., N, 4) matching features {features.shape}, got "
                       f"shape {boxes.shape}")
    if mask is not None and mask.shape != features.shape[:-1]:
      raise ValueError(f"mask must be (..., N) = {features.shape[:-1]}, got shape {mask.shape}")

  def relation_weights(self, features: jax.Array, boxes: jax.Array,
                       mask: jax.Array | None = None) -> jax.Array:
    """w^{mn}: (..., N_r, N, N), entry [r, n, m] for query n and key m.

    Rows of padded queries are whatever the valid keys give; columns of padded
    keys are 0 (all 0 when no object is valid).
    """
    self._check_inputs(features, boxes, mask)
    if self.dtype is not None:
      features = features.astype(self.dtype)
    acc = jnp.promote_types(jnp.float32,
                            jnp.result_type(features.dtype, self.query.kernel[...].dtype))
    *lead, n, _ = features.shape
    q = self.query(features).reshape(*lead, n, self.num_heads, self.key_features)
    k = self.key(features).reshape(*lead, n, self.num_heads, self.key_features)
    logits = jnp.einsum("...nrd,...mrd->...rnm", q, k, preferred_element_type=acc)
    logits = logits / math.sqrt(self.key_features)
    if self.geometry is not None:
      embedding = geometry_embedding(
          relative_geometry(boxes.astype(acc), self.size_offset), self.geometry_features)
      # w_G (..., N, N, N_r) at (at least) float32 whatever `dtype`: log(w_G) magnifies
      # rounding errors of small w_G.
      w_g = nnx.relu(embedding @ self.geometry.kernel[...].astype(acc)
                     + self.geometry.bias[...].astype(acc))
      logits = logits + jnp.log(jnp.maximum(jnp.moveaxis(w_g, -1, -3), self.eps))
    if mask is None:
      return jax.nn.softmax(logits, axis=-1)
    keys = mask[..., None, None, :]
    logits = jnp.where(keys, logits, jnp.finfo(acc).min)
    return jax.nn.softmax(logits, axis=-1) * keys

  def __call__(self, features: jax.Array, boxes: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    """features (..., N, D), boxes (..., N, 4), mask (..., N) -> f_A + relation (..., N, D)."""
    weights = self.relation_weights(features, boxes, mask)
    if self.dtype is not None:
      features = features.astype(self.dtype)
    *lead, n, d = features.shape
    values = self.value(features).reshape(*lead, n, self.num_heads, d // self.num_heads)
    relation = jnp.einsum("...rnm,...mrc->...nrc", weights.astype(values.dtype), values,
                          preferred_element_type=weights.dtype).astype(features.dtype)
    relation = relation.reshape(*lead, n, d)
    if mask is not None:
      relation = jnp.where(mask[..., None], relation, 0)
    return features + relation
