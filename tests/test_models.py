"""Model zoo: exact parameter counts, architecture details, modes and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nonlocal_jax.models import create_model, list_models


def abstract_model(name, num_classes=400, **overrides):
  return nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, rngs=nnx.Rngs(0),
                                             **overrides))


def num_params(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def output_shape(model, input_shape):
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)


@pytest.mark.parametrize("name,expected", [
    # Counted from PySlowFast's own models; BN running statistics are not parameters.
    ("c2d_r50", 24_327_632), ("i3d_r50", 28_043_472),
    ("c2d_nl5_r50", 31_686_096), ("i3d_nl5_r50", 35_401_936),
])
def test_parameter_counts_match_pyslowfast(name, expected):
  assert num_params(abstract_model(name)) == expected


def test_image_resnet50_matches_torchvision_count():
  assert num_params(abstract_model("resnet50", num_classes=1000)) == 25_557_032


def test_nonlocal_adds_the_analytic_block_params():
  # spec 1.9: 526,592 per res3 block and 2,101,760 per res4 block.
  base = num_params(abstract_model("c2d_r101"))
  assert num_params(abstract_model("c2d_nl5_r101")) - base == 2 * 526_592 + 3 * 2_101_760
  assert num_params(abstract_model("c2d_nl10_r50")) - num_params(abstract_model("c2d_r50")) == (
      4 * 526_592 + 6 * 2_101_760)
  assert num_params(abstract_model("c2d_nl1_r50")) - num_params(abstract_model("c2d_r50")) == (
      2_101_760)


@pytest.mark.parametrize("name,placement", [
    ("c2d_nl5_r50", [(), ("1", "3"), ("1", "3", "5"), ()]),
    ("i3d_nl5_r101", [(), ("1", "3"), ("13", "20", "6"), ()]),
    ("c2d_nl1_r50", [(), (), ("4",), ()]),
])
def test_nonlocal_placement(name, placement):
  model = abstract_model(name)
  got = [tuple(sorted(stage.nonlocal_blocks.keys())) for stage in model.stages]
  assert got == [tuple(sorted(p)) for p in placement]


def test_i3d_inflation_pattern():
  model = abstract_model("i3d_r50")
  temporal = [[block.a.conv.kernel.shape[0] for block in stage.blocks] for stage in model.stages]
  assert temporal == [[3, 3, 3], [3, 1, 3, 1], [3, 1, 3, 1, 3, 1], [1, 3, 1]]
  assert model.stem.conv.kernel.shape == (5, 7, 7, 3, 64)
  assert all(block.b.conv.kernel.shape[:3] == (1, 3, 3) for s in model.stages for block in s.blocks)
  inflated_3x3 = abstract_model("i3d_r50", inflation="3x3x3")
  assert [[b.b.conv.kernel.shape[0] for b in s.blocks] for s in inflated_3x3.stages] == temporal
  c2d = abstract_model("c2d_r50")
  assert c2d.stem.conv.kernel.shape == (1, 7, 7, 3, 64)


@pytest.mark.parametrize("name,input_shape,feature_shape", [
    ("c2d_nl5_r50", (1, 8, 224, 224, 3), (1, 4, 7, 7, 2048)),
    ("i3d_r50_32x2", (1, 32, 224, 224, 3), (1, 4, 7, 7, 2048)),
    ("i3d_nl5_r50", (1, 8, 256, 256, 3), (1, 4, 8, 8, 2048)),  # fully convolutional test size
])
def test_video_feature_shapes(name, input_shape, feature_shape):
  model = abstract_model(name)
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  feats = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).features(x), state, x)
  assert feats.shape == feature_shape
  assert output_shape(model, input_shape).shape == (1, 400)


@pytest.mark.parametrize("padding,size", [("caffe2", 55), ("pyslowfast", 56)])
def test_stem_pool_padding(padding, size):
  model = create_model("c2d_tiny", num_classes=2, rngs=nnx.Rngs(0), stem_pool_padding=padding)
  x = jnp.zeros((1, 2, 224, 224, 3))
  stem = nnx.max_pool(nnx.relu(model.stem(x)), model.stem_pool_window, model.stem_pool_stride,
                      model.stem_pool_padding)
  assert stem.shape[2:4] == (size, size)


def test_fully_convolutional_head_averages_softmax_in_eval():
  model = create_model("c2d_nl_tiny", num_classes=5, rngs=nnx.Rngs(0), head_pool_window=(2, 1, 1))
  # Random non-zero weights so the per-location predictions differ.
  params = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(0)
  nnx.update(model, jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.3, p.shape), p.dtype), params))
  eval_model = nnx.view(model, deterministic=True, use_running_average=True)
  x = jax.random.normal(jax.random.key(0), (2, 8, 64, 96, 3))
  out = eval_model(x)
  feats = eval_model.features(x)  # (2, 4, 2, 3, 256)
  pooled = (feats[:, :-1] + feats[:, 1:]) / 2  # avg pool (2,1,1) stride 1
  head = eval_model.head.projection
  probs = jax.nn.softmax(pooled @ head.kernel[...] + head.bias[...], axis=-1).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(np.exp(np.asarray(out)), np.asarray(probs), rtol=1e-5, atol=1e-6)


def test_train_and_eval_modes_and_any_clip_size():
  model = create_model("i3d_nl_tiny", num_classes=3, rngs=nnx.Rngs(0))
  for shape in [(2, 8, 32, 32, 3), (1, 4, 48, 40, 3)]:
    x = jax.random.normal(jax.random.key(1), shape)
    assert model(x).shape == (shape[0], 3)
    eval_model = nnx.view(model, deterministic=True, use_running_average=True)
    np.testing.assert_array_equal(np.asarray(eval_model(x)), np.asarray(eval_model(x)))


def test_segmentation_model_output_stride_and_heads():
  model = create_model("nonlocalnet_tiny", num_classes=7, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 64, 48, 3))
  stage3, stage4 = model.backbone(x)
  assert stage3.shape == (2, 8, 6, 128) and stage4.shape == (2, 8, 6, 256)
  logits, aux = model(x)
  assert logits.shape == aux.shape == (2, 64, 48, 7)
  eval_logits, eval_aux = nnx.view(model, deterministic=True, use_running_average=True)(x)
  assert eval_aux is None and eval_logits.shape == (2, 64, 48, 7)
  # contract_dilation: layer3 dilations 1, 2, ...; layer4 2, 4, ...
  r50 = abstract_model("nonlocalnet_r50_d8", num_classes=19)
  dil = [[b.b.conv.kernel_dilation for b in s.blocks] for s in r50.stages]
  assert dil[2] == [(1, 1)] + [(2, 2)] * 5 and dil[3] == [(2, 2), (4, 4), (4, 4)]
  assert r50.nonlocal_block.pool_window is None and r50.nonlocal_block.out.bias is None
  assert r50.nonlocal_block.inner_features == 256 and r50.nonlocal_block.use_scale


def test_required_names_are_registered():
  names = list_models()
  for required in ["c2d_r50", "i3d_r50", "c2d_nl5_r50", "i3d_nl5_r50", "c2d_nl10_r101_32x2",
                   "resnet50_nl10", "nonlocalnet_r101_d8", "c2d_nl_tiny"]:
    assert required in names


def test_bad_names_and_inputs_raise():
  with pytest.raises(ValueError, match="unknown model 'c2d_nl5_r5'.*c2d_nl5_r50"):
    create_model("c2d_nl5_r5", num_classes=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="does not take \\['num_layers'\\].*accepted arguments"):
    create_model("c2d_tiny", num_classes=2, rngs=nnx.Rngs(0), num_layers=3)
  with pytest.raises(ValueError, match="arch='x3d'"):
    create_model("c2d_tiny", num_classes=2, rngs=nnx.Rngs(0), arch="x3d")
  with pytest.raises(ValueError, match="indices \\[7\\]"):
    create_model("c2d_tiny", num_classes=2, rngs=nnx.Rngs(0), nonlocal_blocks=((), (7,), (), ()))
  model = create_model("c2d_tiny", num_classes=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="\\(B, T, H, W, C\\).*\\(2, 32, 32, 3\\)"):
    model(jnp.zeros((2, 32, 32, 3)))
  with pytest.raises(ValueError, match="too short"):
    model(jnp.zeros((1, 1, 32, 32, 3)))


@pytest.mark.parametrize("kernel,stride,dilation,shape", [
    ((1, 1, 1), (1, 2, 2), 1, (2, 4, 9, 9, 6)),
    ((1, 3, 3), (1, 2, 2), 1, (2, 4, 9, 9, 6)),
    ((1, 7, 7), (1, 2, 2), 1, (2, 4, 15, 15, 3)),
    ((5, 7, 7), (2, 2, 2), 1, (2, 6, 15, 15, 3)),
    ((3, 1, 1), 1, 1, (2, 4, 5, 5, 6)),
    ((3, 3, 3), (1, 2, 2), 1, (2, 4, 9, 9, 6)),
    ((5, 7, 7), (1, 2, 2), 1, (2, 8, 15, 15, 3)),
    ((1, 1), (2, 2), 1, (2, 9, 9, 6)),
    ((3, 3), 1, 2, (2, 9, 9, 6)),
])
def test_fast_convolution_lowering_equals_the_convolution(kernel, stride, dilation, shape):
  """Values and both gradients (input, kernel) equal those of the plain XLA convolution."""
  from nonlocal_jax.models.resnet_layers import ConvNorm
  layer = ConvNorm(shape[-1], 5, kernel, stride=stride, dilation=dilation, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), shape)
  y = layer.conv(x)
  np.testing.assert_allclose(np.asarray(layer.convolve(x)), np.asarray(y), rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(jax.random.key(1), y.shape)
  graphdef, params = nnx.split(layer)

  def gradients(apply):
    def loss(params, x):
      return jnp.sum(apply(nnx.merge(graphdef, params), x) * cotangent)
    return jax.grad(loss, argnums=(0, 1))(params, x)

  ours = gradients(lambda layer, x: layer.convolve(x))
  reference = gradients(lambda layer, x: layer.conv(x))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_without_temporal_pool_every_frame_reaches_res5():
  """PySlowFast C2D_NOPOOL: no 2x1x1 pool after res2, so res5 keeps T = frames."""
  pooled = create_model("c2d_tiny", num_classes=3, rngs=nnx.Rngs(0))
  unpooled = create_model("c2d_tiny", num_classes=3, rngs=nnx.Rngs(0), temporal_pool=False)
  x = jax.random.normal(jax.random.key(0), (1, 8, 32, 32, 3))
  assert pooled.features(x).shape[1] == 4
  assert unpooled.features(x).shape[1] == 8
