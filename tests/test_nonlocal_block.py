"""NonLocalBlock against the direct definition y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j).

The reference below is written from the paper's equations with explicit loops
over query positions i and key positions j, on numpy arrays; it shares no code
with the implementation.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nonlocal_jax import NonLocalBlock


def randomize_params(block: nnx.Module, seed: int = 0, scale: float = 0.5) -> None:
  """Replaces every parameter with N(0, scale^2) so nothing is trivially zero."""
  rng = np.random.default_rng(seed)
  params = nnx.state(block, nnx.Param)
  randomized = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, scale, p.shape), p.dtype), params)
  nnx.update(block, randomized)


def np_params(block):
  get = lambda layer: (np.asarray(layer.kernel[...], np.float64),
                       None if layer.bias is None else np.asarray(layer.bias[...], np.float64))
  return {name: get(getattr(block, name)) for name in ("theta", "phi", "g", "out", "concat_project")
          if hasattr(block, name)}


def linear(x, wb):
  w, b = wb
  return x @ w + (0 if b is None else b)


def np_max_pool(x, window):
  """x: (*grid, C) -> pooled (*grid // window, C), VALID, non-overlapping."""
  grid = x.shape[:-1]
  out_grid = tuple(n // w for n, w in zip(grid, window))
  out = np.empty(out_grid + x.shape[-1:])
  for cell in itertools.product(*[range(n) for n in out_grid]):
    sl = tuple(slice(c * w, (c + 1) * w) for c, w in zip(cell, window))
    out[cell] = x[sl].reshape(-1, x.shape[-1]).max(axis=0)
  return out


def reference_block(x, p, *, instantiation, use_scale, window, pool_position, group, restriction):
  """Direct double loop. x: (B, *grid, C) numpy; returns W_z y (before the norm)."""
  x = np.asarray(x, np.float64)
  batch, *grid, _ = x.shape
  grid = tuple(grid)
  ndim = len(grid)
  window = window or (1,) * ndim
  group = group or grid[0]
  out = np.zeros(x.shape[:-1] + (p["out"][0].shape[1],))
  for b in range(batch):
    # Keys per temporal group: pooled (time-grouped) grids of phi and g inputs.
    keys = []  # (group index, key cell coords, phi_j, g_j)
    for gi in range(grid[0] // group):
      xs = x[b, gi * group:(gi + 1) * group]
      if instantiation == "gaussian":
        phi_grid = np_max_pool(xs, window)  # raw features, no theta/phi
        g_grid = (linear(np_max_pool(xs, window), p["g"]) if pool_position == "before"
                  else np_max_pool(linear(xs, p["g"]), window))
      elif pool_position == "before":
        pooled = np_max_pool(xs, window)
        phi_grid, g_grid = linear(pooled, p["phi"]), linear(pooled, p["g"])
      else:
        phi_grid = np_max_pool(linear(xs, p["phi"]), window)
        g_grid = np_max_pool(linear(xs, p["g"]), window)
      for cell in itertools.product(*[range(n) for n in phi_grid.shape[:-1]]):
        keys.append((gi, cell, phi_grid[cell], g_grid[cell]))
    for pos in itertools.product(*[range(n) for n in grid]):
      xi = x[(b,) + pos]
      gi = pos[0] // group
      local = (pos[0] % group,) + pos[1:]
      query_cell = tuple(c // w for c, w in zip(local, window))
      theta_i = xi if instantiation == "gaussian" else linear(xi, p["theta"])
      f, gs = [], []
      for kg, cell, phi_j, g_j in keys:
        if kg != gi:
          continue
        if restriction == "space" and cell[0] != query_cell[0]:
          continue
        if restriction == "time" and cell[1:] != query_cell[1:]:
          continue
        if instantiation in ("gaussian", "embedded_gaussian"):
          s = theta_i @ phi_j
          if use_scale:
            s = s / np.sqrt(theta_i.shape[0])
          f.append(s)
        elif instantiation == "dot_product":
          f.append(theta_i @ phi_j)
        else:
          w_f = p["concat_project"][0][:, 0]
          f.append(max(0.0, w_f @ np.concatenate([theta_i, phi_j])))
        gs.append(g_j)
      f = np.array(f)
      if instantiation in ("gaussian", "embedded_gaussian"):
        f = np.exp(f - f.max())
        c = f.sum()
      else:
        c = len(f)
      y_i = sum(fj * gj for fj, gj in zip(f, gs)) / c
      out[(b,) + pos] = linear(y_i, p["out"])
  return out


INSTANTIATIONS = ["embedded_gaussian", "gaussian", "dot_product", "concatenation"]


def run_block(x, **kwargs):
  block = NonLocalBlock(x.shape[-1], final_norm="none", rngs=nnx.Rngs(0), **kwargs)
  randomize_params(block)
  z = block(jnp.asarray(x))
  return block, np.asarray(z, np.float64) - np.asarray(x, np.float64)


CASES = [
    # (input shape, pool window, pool position, group, restriction)
    ((2, 6, 5), None, "before", None, "spacetime"),
    ((2, 6, 5), (2,), "before", None, "spacetime"),
    ((2, 6, 5), (2,), "after", None, "spacetime"),
    ((1, 4, 5, 6), (2, 2), "before", None, "spacetime"),
    ((1, 4, 5, 6), (2, 2), "after", None, "spacetime"),
    ((1, 4, 4, 4, 6), (1, 2, 2), "before", None, "spacetime"),
    ((1, 4, 4, 4, 6), (1, 2, 2), "after", None, "spacetime"),
    ((1, 4, 4, 4, 6), (2, 2, 2), "before", None, "spacetime"),
    ((1, 4, 4, 4, 6), None, "before", 2, "spacetime"),
    ((1, 4, 4, 4, 6), (1, 2, 2), "before", 2, "spacetime"),
    ((1, 4, 4, 4, 6), (1, 2, 2), "before", None, "space"),
    ((1, 4, 4, 4, 6), (2, 2, 2), "before", None, "space"),
    ((1, 4, 4, 4, 6), (1, 2, 2), "before", None, "time"),
    ((1, 4, 4, 4, 6), None, "after", None, "time"),
]


@pytest.mark.parametrize("instantiation", INSTANTIATIONS)
@pytest.mark.parametrize("shape,window,position,group,restriction", CASES)
def test_matches_double_loop(instantiation, shape, window, position, group, restriction):
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  block, got = run_block(x, instantiation=instantiation, pool_window=window, pool_position=position,
                         temporal_group_size=group, restriction=restriction, attention_path="einsum")
  want = reference_block(x, np_params(block), instantiation=instantiation, use_scale=block.use_scale,
                         window=window, pool_position=position, group=group, restriction=restriction)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("instantiation", INSTANTIATIONS)
def test_chunked_matches_double_loop(instantiation):
  x = np.random.default_rng(2).normal(size=(2, 4, 6, 6, 6)).astype(np.float32)
  block, got = run_block(x, instantiation=instantiation, attention_path="chunked", chunk_size=7)
  want = reference_block(x, np_params(block), instantiation=instantiation, use_scale=block.use_scale,
                         window=(1, 2, 2), pool_position="before", group=None, restriction="spacetime")
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_batch_norm_output_in_eval_mode():
  """z = x + gamma * (W_z y - mean) / sqrt(var + eps) + beta with running statistics."""
  x = np.random.default_rng(3).normal(size=(2, 4, 4, 4, 8)).astype(np.float32)
  block = NonLocalBlock(8, rngs=nnx.Rngs(0))
  randomize_params(block)
  mean = np.random.default_rng(4).normal(size=8).astype(np.float32)
  var = np.random.default_rng(5).uniform(0.5, 2, size=8).astype(np.float32)
  block.bn.mean[...] = mean
  block.bn.var[...] = var
  eval_block = nnx.view(block, use_running_average=True)
  got = np.asarray(eval_block(jnp.asarray(x)))
  wz_y = reference_block(x, np_params(block), instantiation="embedded_gaussian", use_scale=True,
                         window=(1, 2, 2), pool_position="before", group=None, restriction="spacetime")
  gamma, beta = np.asarray(block.bn.scale[...]), np.asarray(block.bn.bias[...])
  want = x + gamma * (wz_y - mean) / np.sqrt(var + 1e-5) + beta
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("final_norm", ["batch_norm", "none"])
@pytest.mark.parametrize("instantiation", INSTANTIATIONS)
def test_identity_at_init(final_norm, instantiation):
  x = jax.random.normal(jax.random.key(0), (2, 4, 6, 6, 8))
  block = NonLocalBlock(8, instantiation=instantiation, final_norm=final_norm, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(block(x)), np.asarray(x))


def test_official_defaults():
  block = NonLocalBlock(512, rngs=nnx.Rngs(0))
  assert block.inner_features == 256 and block.use_scale
  assert block.theta.kernel.shape == (512, 256) and block.out.kernel.shape == (256, 512)
  assert block.theta.bias is not None and block.out.bias is not None
  np.testing.assert_allclose(np.std(np.asarray(block.theta.kernel[...])), 0.01, rtol=0.05)
  assert np.all(np.asarray(block.bn.scale[...]) == 0) and np.all(np.asarray(block.bn.bias[...]) == 0)
  num_params = sum(p.size for p in jax.tree.leaves(nnx.state(block, nnx.Param)))
  assert num_params == 526_592  # spec 1.9: res3 block with biases and BN gamma/beta


def test_default_pool_windows():
  """Videos pool (1,2,2), images (2,2), sequences (2,): visible in the attention shape."""
  for shape, keys in [((1, 8, 4), (4,)), ((1, 4, 6, 4), (2, 3)), ((1, 2, 4, 6, 4), (2, 2, 3))]:
    block = NonLocalBlock(4, capture_attention=True, rngs=nnx.Rngs(0))
    _, inter = nnx.capture(block, nnx.Intermediate)(jnp.ones(shape))
    (weights,) = inter["attention_weights"].get_value()
    assert weights.shape == (1, *shape[1:-1], *keys)
    key_axes = tuple(range(len(shape) - 1, weights.ndim))
    np.testing.assert_allclose(np.asarray(weights).sum(key_axes), 1.0, rtol=1e-5)


def test_captured_weights_are_the_ones_used():
  """Capturing forces the einsum path and returns the same output."""
  x = jax.random.normal(jax.random.key(4), (2, 4, 6, 6, 8))
  block = NonLocalBlock(8, final_norm="none", attention_path="chunked", rngs=nnx.Rngs(0))
  randomize_params(block)
  plain = block(x)
  block.capture_attention = True
  captured, inter = nnx.capture(block, nnx.Intermediate)(x)
  np.testing.assert_allclose(np.asarray(captured), np.asarray(plain), rtol=1e-5, atol=1e-5)
  (weights,) = inter["attention_weights"].get_value()
  assert weights.shape == (2, 4, 6, 6, 4, 3, 3)


@pytest.mark.parametrize("instantiation", INSTANTIATIONS)
@pytest.mark.parametrize("restriction,group", [("spacetime", None), ("space", None), ("time", None),
                                               ("spacetime", 2)])
def test_einsum_and_chunked_agree_with_gradients(instantiation, restriction, group):
  x = jax.random.normal(jax.random.key(1), (2, 4, 6, 6, 8))
  block = NonLocalBlock(8, instantiation=instantiation, final_norm="none", restriction=restriction,
                        temporal_group_size=group, rngs=nnx.Rngs(0))
  randomize_params(block, scale=0.3)

  def loss(block, x, path):
    block.attention_path = path
    return jnp.sum(jnp.sin(block(x)))

  results = {}
  for path, chunk in [("einsum", 512), ("chunked", 5)]:
    block.chunk_size = chunk
    value, (grads, dx) = jax.value_and_grad(loss, argnums=(0, 1))(block, x, path)
    results[path] = (value, grads, dx)
  (v1, g1, dx1), (v2, g2, dx2) = results["einsum"], results["chunked"]
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dx1), np.asarray(dx2), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_auto_path_picks_chunked_above_threshold():
  x = jnp.ones((1, 4, 8, 8, 4))
  block = NonLocalBlock(4, attention_path="auto", auto_threshold_bytes=1, rngs=nnx.Rngs(0))
  block = nnx.view(block, use_running_average=True)
  hlo = jax.jit(lambda x: block(x)).lower(x).as_text()
  assert "while" in hlo  # the chunked path scans over key blocks
  block.auto_threshold_bytes = 2**30
  assert "while" not in jax.jit(lambda x: block(x)).lower(x).as_text()


def test_jit_and_grad_under_nnx():
  block = NonLocalBlock(8, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 4, 6, 6, 8))

  @nnx.jit
  def step(block, x):
    return nnx.grad(lambda b: jnp.mean(b(x) ** 2))(block)

  grads = step(block, x)
  # At init gamma = 0, so only the BN parameters get a gradient through z.
  assert float(jnp.abs(grads["bn"]["scale"][...]).sum()) > 0
  assert float(jnp.abs(grads["theta"]["kernel"][...]).sum()) == 0


def test_bf16_close_to_float32():
  x = jax.random.normal(jax.random.key(3), (2, 4, 8, 8, 16))
  block = NonLocalBlock(16, final_norm="none", rngs=nnx.Rngs(0))
  randomize_params(block, scale=0.2)
  z32 = block(x)
  block_bf16 = NonLocalBlock(16, final_norm="none", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  nnx.update(block_bf16, nnx.state(block, nnx.Param))
  for path in ("einsum", "chunked"):
    block_bf16.attention_path = path
    z16 = block_bf16(x)
    assert z16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(z16, np.float32), np.asarray(z32), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kwargs,shape,match", [
    ({}, (2, 8), "rank 2"),
    ({}, (1, 2, 2, 2, 2, 8), "rank 6"),
    ({}, (1, 4, 4, 4, 6), "6 channels"),
    ({"pool_window": (1, 8, 8)}, (1, 4, 4, 4, 8), "larger than the input"),
    ({"pool_window": (2, 2)}, (1, 4, 4, 4, 8), "2 entries"),
    ({"restriction": "space"}, (1, 4, 4, 8), "needs a video"),
    ({"temporal_group_size": 3}, (1, 4, 4, 4, 8), "does not divide"),
    ({"restriction": "time"}, (1, 4, 5, 4, 8), "divisible"),
])
def test_bad_input_raises(kwargs, shape, match):
  block = NonLocalBlock(8, rngs=nnx.Rngs(0), **kwargs)
  with pytest.raises(ValueError, match=match):
    block(jnp.ones(shape))


@pytest.mark.parametrize("kwargs,match", [
    ({"instantiation": "gaussian_embed"}, "instantiation='gaussian_embed'.*embedded_gaussian"),
    ({"restriction": "frame"}, "restriction='frame'"),
    ({"attention_path": "flash"}, "attention_path='flash'"),
    ({"pool_window": (0, 2)}, "pool_window"),
    ({"final_norm": "layer_norm"}, "final_norm"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    NonLocalBlock(8, rngs=nnx.Rngs(0), **kwargs)


def test_xla_dot_product_attention_path_matches_einsum():
  x = jax.random.normal(jax.random.key(5), (2, 4, 6, 6, 8))
  block = NonLocalBlock(8, final_norm="none", rngs=nnx.Rngs(0))
  randomize_params(block, scale=0.3)
  outputs = {}
  for path in ("einsum", "xla"):
    block.attention_path = path
    outputs[path] = jax.value_and_grad(lambda b: jnp.sum(jnp.sin(b(x))))(block)
  np.testing.assert_allclose(outputs["einsum"][0], outputs["xla"][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(outputs["einsum"][1]), jax.tree.leaves(outputs["xla"][1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  block = NonLocalBlock(8, instantiation="dot_product", attention_path="xla", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="needs a softmax instantiation"):
    block(x)
