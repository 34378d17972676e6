"""RelationModule against the paper's formula (Hu et al., CVPR 2018, eqs. 2-6) written out in numpy.

The reference loops over heads, queries n and keys m in float64 and uses the
ratio w_G exp(w_A) / sum_k w_G exp(w_A) directly (not the log-softmax form of
the implementation), with the relative geometry and sin/cos embedding of the
official code spelled out per pair.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nonlocal_jax.relation_module import RelationModule, relative_geometry


def randomize_params(module: nnx.Module, seed: int = 0, scale: float = 0.3) -> None:
  rng = np.random.default_rng(seed)
  params = nnx.state(module, nnx.Param)
  nnx.update(module, jax.tree.map(
      lambda p: jnp.asarray(rng.normal(0, scale, p.shape), p.dtype), params))
  if module.geometry is not None:  # mostly positive w_G, so geometry matters
    module.geometry.bias[...] = jnp.abs(module.geometry.bias[...]) + 0.5


def np_linear(layer, x):
  return x @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...], np.float64)


def pair_embedding(box_n, box_m, d_g, size_offset):
  """E_G(f_G^m, f_G^n) for query box n and key box m (official conventions)."""
  (x1n, y1n, x2n, y2n), (x1m, y1m, x2m, y2m) = box_n, box_m
  wn, hn = x2n - x1n + size_offset, y2n - y1n + size_offset
  wm, hm = x2m - x1m + size_offset, y2m - y1m + size_offset
  cxn, cyn, cxm, cym = (x1n + x2n) / 2, (y1n + y2n) / 2, (x1m + x2m) / 2, (y1m + y2m) / 2
  geometry = [math.log(max(abs(cxn - cxm) / wn, 1e-3)), math.log(max(abs(cyn - cym) / hn, 1e-3)),
              math.log(wn / wm), math.log(hn / hm)]
  embedding = []
  for value in geometry:
    angles = [100.0 * value / 1000.0 ** (8.0 * i / d_g) for i in range(d_g // 8)]
    embedding += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
  return np.array(embedding)


def reference(module: RelationModule, features, boxes, mask=None) -> np.ndarray:
  """(N, D) features, (N, 4) boxes, optional (N,) mask -> (N, D), float64."""
  f = np.asarray(features, np.float64)
  boxes = np.asarray(boxes, np.float64)
  n_obj, d = f.shape
  heads, d_k = module.num_heads, module.key_features
  mask = np.ones(n_obj, bool) if mask is None else np.asarray(mask)
  q = np_linear(module.query, f).reshape(n_obj, heads, d_k)
  k = np_linear(module.key, f).reshape(n_obj, heads, d_k)
  v = np_linear(module.value, f).reshape(n_obj, heads, d // heads)
  out = f.copy()
  for n in range(n_obj):
    if not mask[n]:
      continue
    for r in range(heads):
      num, den = np.zeros(d // heads), 0.0
      for m in range(n_obj):
        if not mask[m]:
          continue
        w_a = q[n, r] @ k[m, r] / math.sqrt(d_k)
        w_g = 1.0
        if module.geometry is not None:
          e = pair_embedding(boxes[n], boxes[m], module.geometry_features, module.size_offset)
          w_g = max(np_linear(module.geometry, e)[r], 0.0)
          w_g = max(w_g, module.eps)  # the implementation's floor (log(max(w_G, eps)))
        num += w_g * math.exp(w_a) * v[m, r]
        den += w_g * math.exp(w_a)
      out[n, r * (d // heads):(r + 1) * (d // heads)] += num / den
  return out


def random_boxes(rng, n):
  xy = rng.uniform(0, 50, (n, 2))
  wh = rng.uniform(2, 30, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def build(d=32, seed=0, **kwargs):
  kwargs = dict(num_heads=4, key_features=8, geometry_features=16) | kwargs
  module = RelationModule(d, rngs=nnx.Rngs(seed), **kwargs)
  randomize_params(module, seed)
  return module


@pytest.mark.parametrize("kwargs", [
    {}, {"geometry": False}, {"size_offset": 1.0, "num_heads": 2, "geometry_features": 8},
    {"num_heads": 1, "key_features": 4}])
def test_matches_formula(kwargs):
  module = build(**kwargs)
  rng = np.random.default_rng(1)
  features = rng.normal(size=(7, 32)).astype(np.float32)
  boxes = random_boxes(rng, 7)
  boxes[3] = boxes[1]  # a duplicate box: centre offset floored at 1e-3
  y = module(jnp.asarray(features), jnp.asarray(boxes))
  np.testing.assert_allclose(np.asarray(y), reference(module, features, boxes), rtol=1e-4,
                             atol=1e-4)


def test_mask_ignores_padded_objects():
  module = build()
  rng = np.random.default_rng(2)
  features = rng.normal(size=(2, 6, 32)).astype(np.float32)
  boxes = np.stack([random_boxes(rng, 6) for _ in range(2)])
  mask = np.array([[True, True, False, True, False, True], [True] * 3 + [False] * 3])
  y = np.asarray(module(jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(mask)))
  for b in range(2):
    np.testing.assert_allclose(y[b], reference(module, features[b], boxes[b], mask[b]),
                               rtol=1e-4, atol=1e-4)
    # Padded rows come back unchanged; valid rows equal the module on the valid objects only.
    np.testing.assert_array_equal(y[b][~mask[b]], features[b][~mask[b]])
    alone = module(jnp.asarray(features[b][mask[b]]), jnp.asarray(boxes[b][mask[b]]))
    np.testing.assert_allclose(y[b][mask[b]], np.asarray(alone), rtol=1e-5, atol=1e-5)
  weights = np.asarray(module.relation_weights(jnp.asarray(features), jnp.asarray(boxes),
                                               jnp.asarray(mask)))
  assert np.all(weights[0][..., ~mask[0]] == 0)


def test_no_valid_object_returns_the_input():
  module = build()
  features = jnp.ones((3, 32))
  boxes = jnp.asarray(random_boxes(np.random.default_rng(3), 3))
  y = module(features, boxes, jnp.zeros(3, bool))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(features))


def test_geometry_is_translation_and_scale_invariant():
  module = build()
  rng = np.random.default_rng(4)
  features = jnp.asarray(rng.normal(size=(5, 32)), jnp.float32)
  boxes = random_boxes(rng, 5)
  moved = boxes * 3.0 + np.array([10.0, -4.0, 10.0, -4.0], np.float32)
  np.testing.assert_allclose(np.asarray(module(features, jnp.asarray(boxes))),
                             np.asarray(module(features, jnp.asarray(moved))), rtol=1e-4,
                             atol=1e-5)


def test_geometry_changes_the_output():
  module = build()
  rng = np.random.default_rng(5)
  features = jnp.asarray(rng.normal(size=(5, 32)), jnp.float32)
  y1 = module(features, jnp.asarray(random_boxes(rng, 5)))
  y2 = module(features, jnp.asarray(random_boxes(rng, 5)))
  assert float(jnp.abs(y1 - y2).max()) > 1e-3


def test_paper_parameter_count():
  module = nnx.eval_shape(lambda: RelationModule(rngs=nnx.Rngs(0)))
  count = sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
  # W_G 64 -> 16, W_Q and W_K 1024 -> 16 x 64, W_V 1024 -> 16 x 64, all with biases.
  assert count == (64 * 16 + 16) + 2 * (1024 * 1024 + 1024) + (1024 * 1024 + 1024)
  # Table 5: the two modules of the 2fc + RM head add 6.0M parameters (58.3M -> 64.3M),
  # in units of 2^20.
  assert 2 * count / 2**20 == pytest.approx(6.0, rel=0.01)


def test_jit_grad_and_bf16():
  module = build()
  rng = np.random.default_rng(6)
  features = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32)
  boxes = jnp.asarray(np.stack([random_boxes(rng, 8) for _ in range(2)]))
  grads = nnx.jit(lambda m, f, b: nnx.grad(lambda m: jnp.mean(m(f, b) ** 2))(m))(
      module, features, boxes)
  for name in ("query", "key", "value", "geometry"):
    assert float(jnp.abs(grads[name]["kernel"][...]).sum()) > 0, name
  module16 = RelationModule(32, num_heads=4, key_features=8, geometry_features=16,
                            dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  nnx.update(module16, nnx.state(module, nnx.Param))
  y16 = module16(features, boxes)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(module(features, boxes)),
                             rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_heads": 5}, "num_heads=5 does not divide in_features=32"),
    ({"geometry_features": 12}, "geometry_features=12 must be a multiple of 8"),
    ({"key_features": 0}, "key_features must be a positive int"),
    ({"eps": 0.0}, "eps must be positive"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    RelationModule(32, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("features,boxes,mask,match", [
    ((4, 16), (4, 4), None, r"features must be \(..., N, 32\)"),
    ((4, 32), (5, 4), None, "boxes must be"),
    ((4, 32), (4, 4), (3,), "mask must be"),
])
def test_bad_inputs_raise(features, boxes, mask, match):
  module = RelationModule(32, num_heads=4, key_features=8, geometry_features=16,
                          rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=match):
    module(jnp.ones(features), jnp.ones(boxes), None if mask is None else jnp.ones(mask, bool))


def test_relative_geometry_by_hand():
  """Query n = (0, 0, 10, 20), key m = (20, 0, 25, 5): offsets normalised by the query box."""
  boxes = jnp.array([[0.0, 0.0, 10.0, 20.0], [20.0, 0.0, 25.0, 5.0]])
  g = np.asarray(relative_geometry(boxes))
  np.testing.assert_allclose(g[0, 1], np.log([17.5 / 10, 7.5 / 20, 10 / 5, 20 / 5]), rtol=1e-6)
  np.testing.assert_allclose(g[1, 0], np.log([17.5 / 5, 7.5 / 5, 5 / 10, 5 / 20]), rtol=1e-6)
  np.testing.assert_allclose(g[0, 0], np.log([1e-3, 1e-3, 1, 1]), rtol=1e-6, atol=1e-7)


# -- the "2fc + RM" box head of the detector (paper eq. 10) ------------------------------------


def test_box_head_with_relation_modules_matches_the_formula():
  """fc6 -> +RM -> ReLU -> fc7 -> +RM -> ReLU -> scores / deltas, written out in numpy per image
  with padded RoIs, against BoxHead(relation_modules=1)."""
  from nonlocal_jax.detection.heads import BoxHead

  options = dict(num_heads=4, key_features=8, geometry_features=16)
  head = BoxHead(6, 3, resolution=2, representation=32, relation_modules=1,
                 relation_options=options, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(7)
  nnx.update(head, jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.3, p.shape), p.dtype),
                                nnx.state(head, nnx.Param)))
  for module in (head.fc6_relations[0], head.fc7_relations[0]):
    module.geometry.bias[...] = jnp.abs(module.geometry.bias[...]) + 0.5
  pooled = rng.normal(size=(2 * 5, 2, 2, 6)).astype(np.float32)
  boxes = np.stack([random_boxes(rng, 5) for _ in range(2)])
  valid = np.array([[True, True, False, True, True], [True, False, False, True, False]])
  scores, deltas = head(jnp.asarray(pooled), jnp.asarray(boxes), jnp.asarray(valid))

  relu = lambda x: np.maximum(x, 0)
  fc6 = np.asarray(head.fc6.kernel[...], np.float64).reshape(-1, 32)
  x = pooled.reshape(10, -1) @ fc6 + np.asarray(head.fc6.bias[...], np.float64)
  x = x.reshape(2, 5, 32)
  x = relu(np.stack([reference(head.fc6_relations[0], x[b], boxes[b], valid[b]) for b in range(2)]))
  x = np_linear(head.fc7, x)
  x = relu(np.stack([reference(head.fc7_relations[0], x[b], boxes[b], valid[b]) for b in range(2)]))
  np.testing.assert_allclose(np.asarray(scores).reshape(2, 5, 3), np_linear(head.scores, x),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(deltas).reshape(2, 5, 12), np_linear(head.deltas, x),
                             rtol=1e-4, atol=1e-4)


def test_box_head_relation_arguments_are_checked():
  from nonlocal_jax.detection.heads import BoxHead

  with pytest.raises(ValueError, match="relation_modules must be an int >= 0.*-1"):
    BoxHead(6, 3, relation_modules=-1, rngs=nnx.Rngs(0))
  head = BoxHead(6, 3, resolution=2, representation=32, relation_modules=1,
                 relation_options=dict(num_heads=4, key_features=8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="needs the RoIs' boxes"):
    head(jnp.zeros((4, 2, 2, 6)))
  with pytest.raises(ValueError, match="num_heads=5 does not divide in_features=32"):
    BoxHead(6, 3, representation=32, relation_modules=1, relation_options=dict(num_heads=5),
            rngs=nnx.Rngs(0))


def test_relation_config_builds_the_2fc_rm_detector():
  from configs import coco
  from nonlocal_jax import train

  config = coco.get_config("shapes_rm")
  assert config.model.kwargs.box_relation_modules == 1
  assert config.model.kwargs.relation_options.num_heads == 16  # the paper's N_r, listed by flag
  model = nnx.eval_shape(lambda: train.build_model(config, nnx.Rngs(0)))
  assert len(model.box_head.fc6_relations) == len(model.box_head.fc7_relations) == 1
  plain = nnx.eval_shape(lambda: train.build_model(coco.get_config("shapes"), nnx.Rngs(0)))
  count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  rm = model.box_head.fc6_relations[0]
  assert count(model) - count(plain) == 2 * count(rm)
