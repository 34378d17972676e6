"""LocalRelation against the direct definition of the local relation layer (Hu et al., ICCV 2019).

    w(p', p) = softmax_{p in Omega(p')} (Phi(q_{p'}, k_p) + g(p - p')),  y(c, p') = sum_p w x(c, p)

The numpy reference loops over output positions and window neighbours in
float64 and skips neighbours outside the image; it shares no code with the
implementation. A PyTorch port of the official LR-Net V2 CUDA kernel's forward
pass (microsoft/Swin-Transformer, branch LR-Net, ops/local_relation) checks
the conventions the paper leaves to code: consecutive channel groups, window
centres at stride * output position, out-of-image neighbours.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from nonlocal_jax.local_relation import LocalRelation


def randomize_params(layer: nnx.Module, seed: int = 0, scale: float = 0.5) -> None:
  """Every parameter N(0, scale^2), so biases and the geometry prior are not trivially zero."""
  rng = np.random.default_rng(seed)
  params = nnx.state(layer, nnx.Param)
  nnx.update(layer, jax.tree.map(
      lambda p: jnp.asarray(rng.normal(0, scale, p.shape), p.dtype), params))


def np_linear(layer, x):
  y = x @ np.asarray(layer.kernel[...], np.float64)
  return y if layer.bias is None else y + np.asarray(layer.bias[...], np.float64)


def reference(layer: LocalRelation, x) -> np.ndarray:
  """Direct loop over output positions p' and window neighbours p, float64."""
  x = np.asarray(x, np.float64)
  batch, height, width, channels = x.shape
  k, s, m = layer.kernel_size, layer.stride, layer.channels_per_group
  groups, r = channels // m, k // 2
  use_appearance, use_geometry = layer.query is not None, layer.geometry_out is not None
  if use_appearance:
    q_all, k_all = np_linear(layer.query, x), np_linear(layer.key, x)
    d = q_all.shape[-1] // groups  # key channels per weight map
  out_h, out_w = -(-height // s), -(-width // s)
  y = np.zeros((batch, out_h, out_w, channels))
  for b, i, j in itertools.product(range(batch), range(out_h), range(out_w)):
    ci, cj = s * i, s * j  # window centre p'
    logits, values = [], []
    for di, dj in itertools.product(range(-r, r + 1), range(-r, r + 1)):
      pi, pj = ci + di, cj + dj
      if not (0 <= pi < height and 0 <= pj < width):
        continue  # outside the image: not in the softmax
      logit = np.zeros(groups)
      if use_appearance:
        q = q_all[b, ci, cj].reshape(groups, d)
        kk = k_all[b, pi, pj].reshape(groups, d)
        logit += {"squared_difference": -((q - kk) ** 2).sum(-1),
                  "absolute_difference": -np.abs(q - kk).sum(-1),
                  "multiplication": (q * kk).sum(-1)}[layer.composability]
      if use_geometry:
        hidden = np.maximum(np_linear(layer.geometry_hidden, np.array([di, dj], np.float64)), 0)
        logit += np_linear(layer.geometry_out, hidden)
      logits.append(logit)
      values.append(x[b, pi, pj].reshape(groups, m))
    logits = np.array(logits)  # (neighbours, G)
    weights = np.exp(logits - logits.max(0))
    weights /= weights.sum(0)
    y[b, i, j] = np.einsum("ng,ngc->gc", weights, np.array(values)).reshape(-1)
  return y if layer.projection is None else np_linear(layer.projection, y)


@nnx.jit
def forward(layer, x):
  return layer(x)


def build(channels=8, seed=0, scale=0.5, **kwargs):
  layer = LocalRelation(channels, rngs=nnx.Rngs(seed), **kwargs)
  randomize_params(layer, seed, scale)
  return layer


CASES = [
    # kernel sizes of the paper, both strides, odd image sizes, every Phi
    dict(kernel_size=3, channels_per_group=2),
    dict(kernel_size=5, stride=2, channels_per_group=4, composability="absolute_difference"),
    dict(kernel_size=7, channels_per_group=2, composability="multiplication"),
    dict(kernel_size=9, stride=2, channels_per_group=8),
    # channel reduction: 2 key channels per weight map, 4 per map
    dict(kernel_size=5, channels_per_group=4, key_reduction=2),
    dict(kernel_size=3, stride=2, channels_per_group=4, key_reduction=1,
         composability="multiplication"),
    # without one of the two terms, without the output projection, other widths
    dict(kernel_size=5, channels_per_group=2, geometry_prior=False),
    dict(kernel_size=7, stride=2, channels_per_group=4, appearance=False),
    dict(kernel_size=3, channels_per_group=1, output_projection=False),
    dict(kernel_size=5, stride=3, channels_per_group=2, out_features=6,
         geometry_hidden_features=5),
]


@pytest.mark.parametrize("kwargs", CASES)
def test_matches_direct_loop(kwargs):
  layer = build(**kwargs)
  x = jax.random.normal(jax.random.key(1), (2, 7, 6, 8))
  y = forward(layer, x)
  expected = reference(layer, x)
  assert y.shape == expected.shape
  np.testing.assert_allclose(np.asarray(y), expected, rtol=2e-5, atol=2e-5)


def test_border_neighbours_get_no_weight():
  layer = build(kernel_size=5, channels_per_group=4)
  x = jax.random.normal(jax.random.key(2), (1, 6, 6, 8))
  w = np.asarray(layer.aggregation_weights(x)).reshape(1, 6, 6, 5, 5, 2)
  # Output (0, 0): rows and columns -2, -1 of its window are outside the image.
  assert np.all(w[0, 0, 0, :2] == 0) and np.all(w[0, 0, 0, :, :2] == 0)
  assert np.all(w[0, 0, 0, 2:, 2:] > 0)
  np.testing.assert_allclose(w.sum(axis=(3, 4)), 1, rtol=1e-6)
  # Interior positions use the full window.
  assert np.all(w[0, 2:4, 2:4] > 0)


def test_geometry_only_is_a_normalised_depthwise_kernel_in_the_interior():
  layer = build(kernel_size=3, channels_per_group=4, appearance=False, output_projection=False)
  x = jax.random.normal(jax.random.key(3), (1, 5, 5, 8))
  kernel = np.asarray(jax.nn.softmax(layer.geometry_logits(), axis=0))  # (9, G)
  y = np.asarray(layer(x))
  xn = np.asarray(x)
  window = xn[0, 1:4, 1:4].reshape(9, 2, 4)  # neighbours of the centre (2, 2)
  np.testing.assert_allclose(y[0, 2, 2], np.einsum("ng,ngc->gc", kernel, window).reshape(-1),
                             rtol=1e-5)


# -- official kernel ---------------------------------------------------------

SIM_METHODS = {"multiplication": 0, "absolute_difference": 2, "squared_difference": 5}


def official_local_relation(query, key, value, pos_weight, kernel_size, groups, stride,
                            sim_method, no_define_value=-100.0):
  """PyTorch port of the LR-Net V2 kernel's forward (similarity, softmax, aggregation).

  query (B, Cq, H', W'), key (B, Cq, H, W), value (B, Cv, H, W), pos_weight
  (groups, k, k); NCHW as the kernel. Channel c of value / key belongs to group
  c // (C / groups); a neighbour outside the image gets the logit
  no_define_value + pos_weight and no value.
  """
  b, cq, ho, wo = query.shape
  cv, kk, half = value.shape[1], kernel_size * kernel_size, kernel_size // 2
  unfold = lambda t: F.unfold(t, kernel_size, padding=half, stride=stride).view(
      b, t.shape[1], kk, ho, wo)
  keys = unfold(key).view(b, groups, cq // groups, kk, ho, wo)
  q = query.view(b, groups, cq // groups, 1, ho, wo)
  inside = unfold(torch.ones_like(key[:, :1]))[:, 0] > 0  # (B, k*k, H', W')
  sim = {0: q * keys, 2: -(q - keys).abs(), 5: -(q - keys) ** 2}[sim_method].sum(2)
  sim = torch.where(inside[:, None], sim, torch.full_like(sim, no_define_value))
  sim = sim + pos_weight.view(1, groups, kk, 1, 1)
  weights = sim.softmax(dim=2)
  values = unfold(value).view(b, groups, cv // groups, kk, ho, wo)
  return (weights[:, :, None] * values).sum(3).view(b, cv, ho, wo)


@pytest.mark.parametrize("composability,stride,kernel_size", [
    ("squared_difference", 1, 7), ("multiplication", 2, 5), ("absolute_difference", 2, 3)])
def test_matches_official_kernel_port(composability, stride, kernel_size):
  layer = build(channels=16, kernel_size=kernel_size, stride=stride, channels_per_group=4,
                key_reduction=2, composability=composability, output_projection=False)
  x = jax.random.normal(jax.random.key(4), (2, 9, 8, 16))
  groups = layer.num_groups
  q = layer.query(x[:, ::stride, ::stride])
  k = layer.key(x)
  pos = layer.geometry_logits().T.reshape(groups, kernel_size, kernel_size)
  nchw = lambda a: torch.from_numpy(np.asarray(a, np.float64)).permute(0, 3, 1, 2)
  expected = official_local_relation(
      nchw(q), nchw(k), nchw(x), torch.from_numpy(np.asarray(pos, np.float64)), kernel_size,
      groups, stride, SIM_METHODS[composability]).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(forward(layer, x)), expected, rtol=2e-5, atol=2e-5)


# -- gradients, jit, sharding, bf16 --------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, stride=2, channels_per_group=2),
    dict(kernel_size=5, channels_per_group=4, key_reduction=2, composability="multiplication"),
    dict(kernel_size=3, channels_per_group=4, appearance=False),
])
def test_gradients_match_finite_differences_float64(kwargs):
  with jax.enable_x64(True):
    layer = LocalRelation(8, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **kwargs)
    randomize_params(layer, seed=1)
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(5), (1, 5, 6, 8), jnp.float64)
    assert forward(layer, x).dtype == jnp.float64

    @jax.jit
    def loss(params, x):
      return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    rng = np.random.default_rng(0)
    for _ in range(3):  # directional derivatives along random directions
      dp = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
      dx = jnp.asarray(rng.normal(size=x.shape))
      eps = 1e-6
      shift = lambda t: (jax.tree.map(lambda p, d: p + t * eps * d, params, dp), x + t * eps * dx)
      numeric = (loss(*shift(1)) - loss(*shift(-1))) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads[0]),
                                                    jax.tree.leaves(dp)))
      analytic = analytic + jnp.vdot(grads[1], dx)
      np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6, atol=1e-8)
  assert jnp.zeros(1).dtype == jnp.float32  # x64 restored


def test_sharded_batch_matches_unsharded():
  layer = build(channels=16, kernel_size=5, stride=2, channels_per_group=4)
  x = jax.random.normal(jax.random.key(6), (8, 8, 8, 16))
  expected = forward(layer, x)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  y = forward(layer, jax.device_put(x, sharding))
  assert y.sharding.spec[0] == "data"
  np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_grad_under_nnx_jit():
  layer = build(kernel_size=3, channels_per_group=2)
  x = jax.random.normal(jax.random.key(7), (2, 6, 6, 8))
  grads = nnx.jit(lambda l, x: nnx.grad(lambda l: jnp.mean(l(x) ** 2))(l))(layer, x)
  for name in ("query", "key", "geometry_hidden", "geometry_out", "projection"):
    assert float(jnp.abs(grads[name]["kernel"][...]).sum()) > 0, name


def test_bf16_close_to_float32():
  x = jax.random.normal(jax.random.key(8), (2, 8, 8, 16))
  layer = build(channels=16, kernel_size=7, channels_per_group=8, scale=0.3)
  layer_bf16 = LocalRelation(16, kernel_size=7, channels_per_group=8, dtype=jnp.bfloat16,
                             rngs=nnx.Rngs(0))
  nnx.update(layer_bf16, nnx.state(layer, nnx.Param))
  y16 = forward(layer_bf16, x)
  assert y16.dtype == jnp.bfloat16
  assert layer_bf16.aggregation_weights(x).dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(forward(layer, x)),
                             rtol=0.05, atol=0.05)


def test_parameter_count():
  c, m, hidden = 64, 8, 4
  layer = LocalRelation(c, channels_per_group=m, rngs=nnx.Rngs(0))
  count = sum(p.size for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  # key + query (C -> C/m, bias), geometry 2 -> C/2m (bias) -> C/m, output C -> C
  assert count == 2 * (c * c // m + c // m) + (2 * hidden + hidden) + hidden * 8 + c * c


# -- bad arguments -----------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=4), "kernel_size=4 must be odd"),
    (dict(kernel_size=0), "kernel_size must be a positive int"),
    (dict(channels_per_group=3), "channels_per_group=3 does not divide in_features=8"),
    (dict(channels_per_group=4, key_reduction=3), "key_reduction=3 must divide"),
    (dict(composability="dot"), "composability='dot'.*squared_difference"),
    (dict(appearance=False, geometry_prior=False), "at least one"),
    (dict(output_projection=False, out_features=4), "out_features=4"),
    (dict(stride=0), "stride must be a positive int"),
    (dict(geometry_hidden_features=0), "geometry_hidden_features must be a positive int"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LocalRelation(8, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("shape,match", [((2, 6, 8), "rank 3"), ((1, 4, 4, 6), "6 channels")])
def test_bad_input_raises(shape, match):
  layer = LocalRelation(8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=match):
    layer(jnp.ones(shape))
