"""max_pool against lax.reduce_window (nnx.max_pool): values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nonlocal_jax.pooling import max_pool


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 8, 27, 27, 3), (1, 3, 3), (1, 2, 2), ((0, 0), (0, 0), (0, 0))),  # official pool1
    ((2, 8, 56, 56, 3), (1, 3, 3), (1, 2, 2), ((0, 0), (1, 1), (1, 1))),  # PySlowFast pool1
    ((2, 16, 55, 55, 3), (2, 3, 3), (2, 2, 2), ((0, 0), (0, 0), (0, 0))),  # 32x2 pool1
    ((2, 7, 7, 7, 3), (2, 1, 1), (2, 1, 1), "VALID"),  # pool2, odd T
    ((2, 4, 7, 9, 3), (1, 2, 2), (1, 2, 2), "VALID"),  # NL subsampling, odd H, W
    ((2, 15, 15, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # 2D stem
    ((2, 10, 4), (3,), (1,), ((1, 1),)),  # 1D, stride 1
])
def test_max_pool_matches_reduce_window(shape, window, strides, padding):
  x = jax.random.normal(jax.random.key(0), shape)  # no ties: gradients are unique
  ours = max_pool(x, window, strides, padding)
  reference = nnx.max_pool(x, window, strides, padding)
  assert ours.shape == reference.shape
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))
  weights = jax.random.normal(jax.random.key(1), ours.shape)
  loss = lambda pool: lambda v: jnp.sum(pool(v, window, strides, padding) * weights)
  np.testing.assert_allclose(np.asarray(jax.grad(loss(max_pool))(x)),
                             np.asarray(jax.grad(loss(nnx.max_pool))(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window,strides,padding", [
    ((1, 3, 3), (1, 2, 2), (0, 0, 0)), ((1, 3, 3), (1, 2, 2), (0, 1, 1)),
    ((2, 3, 3), (2, 2, 2), (0, 0, 0)), ((1, 2, 2), (1, 2, 2), (0, 0, 0))])
def test_ties_send_the_gradient_to_one_entry_as_pytorch(window, strides, padding):
  """Flat regions tie; like PyTorch, the whole gradient goes to the first maximal entry."""
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).integers(0, 3, (2, 4, 9, 9, 3)).astype(np.float32)
  pads = [(p, p) for p in padding]
  weights = np.random.default_rng(1).normal(size=max_pool(jnp.asarray(x), window, strides,
                                                          pads).shape).astype(np.float32)
  ours = jax.grad(lambda v: jnp.sum(max_pool(v, window, strides, pads) * weights))(jnp.asarray(x))
  xt = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
  yt = torch.nn.functional.max_pool3d(xt, window, strides, padding)
  (yt * torch.tensor(np.moveaxis(weights, -1, 1))).sum().backward()
  np.testing.assert_allclose(np.asarray(ours), np.moveaxis(xt.grad.numpy(), 1, -1), atol=1e-6)


def test_max_pool_rejects_bad_shapes():
  with pytest.raises(ValueError, match="larger than the \\(padded\\) positions"):
    max_pool(jnp.zeros((1, 1, 4, 4, 2)), (2, 2, 2))
  with pytest.raises(ValueError, match="position axes"):
    max_pool(jnp.zeros((1, 4, 4, 2)), (2, 2, 2))
