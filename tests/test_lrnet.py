"""LR-Net presets: the paper's parameter and FLOP budgets, shapes, training on CPU, configs.

Parameters are counted as every trainable array (convolutions, local
relation layers, BN scale and bias, classifier), without BN running
statistics -- the convention under which ResNet-50 has the 25.5M of the
LR-Net paper's Table 1. FLOPs are XLA's cost analysis of the batch-1
224 x 224 eval forward pass, where a multiply-add is 2 FLOPs; the paper's
"FLOPs" (4.3e9 for ResNet-50) count multiply-adds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cifar10, imagenet
from nonlocal_jax import train
from nonlocal_jax.local_relation import LocalRelation
from nonlocal_jax.models import LRNet, create_model, eval_mode, get_spec


def num_params(model: nnx.Module) -> int:
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract(name: str, **kwargs) -> nnx.Module:
  return nnx.eval_shape(lambda: create_model(name, num_classes=1000, rngs=nnx.Rngs(0), **kwargs))


@pytest.mark.parametrize("name,paper", [
    ("lrnet50", 23.3e6), ("lrnet26", 14.7e6), ("resnet50", 25.5e6)])
def test_parameter_counts_match_the_paper(name, paper):
  # LR-Net paper Table 1 (LR-Net-50, ResNet-50); LR-Net-26: 14.7M as reported with its 75.7%.
  assert num_params(abstract(name)) == pytest.approx(paper, rel=0.01)


@pytest.mark.slow
def test_lrnet50_builds():
  model = create_model("lrnet50", num_classes=1000, rngs=nnx.Rngs(0))
  assert num_params(model) == num_params(abstract("lrnet50"))


def test_without_the_output_projection_lrnet50_is_far_below_the_paper():
  """The 1x1 projection after the aggregation is what makes the 23.3M."""
  model = abstract("lrnet50", local_relation_options=dict(output_projection=False))
  assert num_params(model) < 0.9 * 23.3e6


def gmacs(name: str) -> float:
  model = abstract(name)
  graphdef, state = nnx.split(eval_mode(model))
  x = jax.ShapeDtypeStruct((1, *get_spec(name).input_shape), jnp.float32)
  flops = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).cost_analysis()["flops"]
  return flops / 2e9


def test_lrnet50_multiply_adds_near_the_papers():
  # Table 1: 4.3 GFLOPs (multiply-adds) for both LR-Net-50 and ResNet-50.
  lr, resnet = gmacs("lrnet50"), gmacs("resnet50")
  assert lr == pytest.approx(4.3, rel=0.05)
  assert lr / resnet == pytest.approx(1.0, abs=0.07)


def test_architecture_follows_table_1():
  model = abstract("lrnet50")
  assert model.stem_conv.conv.kernel.shape == (1, 1, 3, 64)
  stem = model.stem_relation.relation
  assert (stem.kernel_size, stem.stride, stem.in_features) == (7, 2, 64)
  assert [len(stage) for stage in model.stages] == [3, 4, 6, 3]
  for stage, (width, out, m) in zip(model.stages, [(100, 256, 5), (200, 512, 8),
                                                     (400, 1024, 8), (800, 2048, 8)]):
    for i, block in enumerate(stage):
      relation = block.b.relation
      assert isinstance(relation, LocalRelation)
      assert (relation.in_features, relation.kernel_size, relation.channels_per_group) == (
          width, 7, m)
      assert relation.stride == (2 if i == 0 and width > 100 else 1)
      assert block.c.conv.kernel.shape == (1, 1, width, out)
  graphdef, state = nnx.split(eval_mode(model))
  features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).features(x), state,
                            jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert features.shape == (1, 7, 7, 2048)


@pytest.mark.slow
def test_tiny_preset_trains_on_cpu():
  model = create_model("lrnet_tiny", num_classes=10, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  labels = jnp.array([1, 7])

  @nnx.jit
  def step(model, x):
    def loss(model):
      logits = model(x)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    return nnx.value_and_grad(loss)(model)

  value, grads = step(model, x)
  assert np.isfinite(float(value))
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  stem_grad = grads["stem_relation"]["relation"]["query"]["kernel"][...]
  assert float(jnp.abs(stem_grad).sum()) > 0
  logits = nnx.jit(lambda m, x: m(x))(eval_mode(model), x)
  assert logits.shape == (2, 10)


def test_bf16_forward():
  model = create_model("lrnet_tiny", num_classes=10, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  logits = nnx.jit(lambda m, x: m(x))(eval_mode(model), jnp.ones((1, 32, 32, 3)))
  assert logits.dtype == jnp.bfloat16 and np.isfinite(np.asarray(logits, np.float32)).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(channels_per_group=8), "channels_per_group=8 does not divide in_features=100"),
    (dict(channels_per_group=(8, 4, 8)), "one int or five"),
    (dict(depth=34), "depth=34 is not supported"),
    (dict(stage_widths=(100, 200, 400)), "one entry per stage"),
    (dict(kernel_size=6, channels_per_group=4), "kernel_size=6 must be odd"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    nnx.eval_shape(lambda: LRNet(num_classes=10, rngs=nnx.Rngs(0), **kwargs))


@pytest.mark.parametrize("module,variant,model", [
    (imagenet, "lrnet50", "lrnet50"), (imagenet, "lrnet26", "lrnet26"),
    (cifar10, "lrnet", "lrnet_tiny"), (cifar10, "lrnet_tiny", "lrnet_tiny")])
def test_configs_build_their_model(module, variant, model):
  config = module.get_config(variant)
  assert config.model.name == model
  get_spec(config.model.name)
  size = 32 if module is cifar10 else 224
  built = nnx.eval_shape(lambda: train.build_model(config, nnx.Rngs(0)))
  graphdef, state = nnx.split(built)
  logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                          jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
  assert logits.shape == (2, config.num_classes)
