"""BatchNorm whose running statistics keep the parameters' precision."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def batch_norm(num_features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
               scale_init=nnx.initializers.ones_init(), dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs) -> nnx.BatchNorm:
  """``nnx.BatchNorm`` with running mean / variance in float32, or float64 for float64 params.

  Flax always stores the statistics in float32; a float64 model (jax x64,
  exact comparisons with other frameworks) needs them in float64 too.
  Momentum is Flax's (0.9 keeps 90% of the old value: PyTorch 0.1).
  """
  norm = nnx.BatchNorm(num_features, momentum=momentum, epsilon=epsilon, scale_init=scale_init,
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  stats_dtype = jnp.promote_types(jnp.float32, param_dtype)
  norm.mean = nnx.BatchStat(jnp.zeros((num_features,), stats_dtype))
  norm.var = nnx.BatchStat(jnp.ones((num_features,), stats_dtype))
  return norm
