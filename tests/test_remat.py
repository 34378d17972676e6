"""Rematerialisation (remat='blocks' / 'full'): same loss, gradients, weight paths; less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nonlocal_jax import aot
from nonlocal_jax.models import create_model, get_spec
from nonlocal_jax.models.resnet_layers import REMAT_MODES, ResStage
from nonlocal_jax.tpu_chips import parse_slice

TINY = ("c2d_nl_tiny", "resnet_nl_tiny", "nonlocalnet_tiny")
needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu is not installed "
                                  "(pip install -r requirements-tpu.txt)")


def build(name: str, remat: str, **kwargs) -> nnx.Module:
  return create_model(name, num_classes=3, rngs=nnx.Rngs(0), remat=remat, dropout_rate=0.0,
                      **kwargs)


def loss_and_grads(model: nnx.Module, x: jax.Array, y: jax.Array):
  """Cross-entropy of the (main) logits, its parameter gradients and the updated BN statistics."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, x, y):
    model = nnx.merge(graphdef, state)

    def loss_fn(model):
      logits = model(x)
      logits = logits[0] if isinstance(logits, tuple) else logits
      labels = y if logits.ndim == 2 else jnp.broadcast_to(y[:, None, None], logits.shape[:3])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    return loss, grads, nnx.state(model, nnx.BatchStat)

  return step(state, x, y)


@pytest.mark.slow  # three CPU compiles of a video net's backward pass
def test_remat_keeps_loss_gradients_and_statistics():
  name = "c2d_nl_tiny"
  x = jax.random.normal(jax.random.key(1), (2, *get_spec(name).input_shape))
  y = jnp.array([0, 2])
  reference = loss_and_grads(build(name, "none"), x, y)
  for remat in ("blocks", "full"):
    result = loss_and_grads(build(name, remat), x, y)
    np.testing.assert_allclose(result[0], reference[0], rtol=1e-5, err_msg=remat)
    for got, want in zip(jax.tree.leaves(result[1:]), jax.tree.leaves(reference[1:])):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=remat)


@pytest.mark.parametrize("name", ["resnet_nl_tiny", "nonlocalnet_tiny"])
@pytest.mark.parametrize("remat", ["blocks", "full"])
def test_remat_traces_image_and_segmentation_models(name, remat):
  """Shapes of loss, gradients and statistics as without remat (traced only, not compiled)."""
  x = jax.ShapeDtypeStruct((2, *get_spec(name).input_shape), jnp.float32)
  y = jax.ShapeDtypeStruct((2,), jnp.int32)
  shapes = [jax.eval_shape(lambda x, y: loss_and_grads(build(name, mode), x, y), x, y)
            for mode in ("none", remat)]
  assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
  assert jax.tree.leaves(shapes[0]) == jax.tree.leaves(shapes[1])


@pytest.mark.parametrize("name", TINY)
def test_remat_keeps_weight_paths(name):
  """Converters and checkpoints address weights by path: remat must not move any."""
  def paths(remat):
    model = nnx.eval_shape(lambda: build(name, remat))
    return [(jax.tree_util.keystr(p), v.shape) for p, v in
            jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]]
  assert paths("blocks") == paths("none") == paths("full")


def test_bad_remat_names_the_choices():
  with pytest.raises(ValueError, match=r"remat='layers'.*'none', 'blocks', 'full'"):
    build("c2d_nl_tiny", "layers")
  assert REMAT_MODES == ("none", "blocks", "full")


def tpu_gradient_temporaries(remat_blocks: bool, devices) -> int:
  """HBM temporaries of the gradient of a res3-like stage (2 blocks + non-local) on one TPU chip.

  A stage, not a whole net: XLA:TPU keeps small working sets in on-chip VMEM
  (0 HBM temporaries, e.g. for the tiny presets), and compiling a whole net
  whose activations exceed it takes minutes on 2 CPU cores.
  """
  stage = nnx.eval_shape(lambda: ResStage(
      256, 64, 256, a_kernels=[(1, 1)] * 2, b_kernels=[(3, 3)] * 2, stride=(1, 1),
      dilations=[(1, 1)] * 2, nonlocal_indices=(0,), remat_blocks=remat_blocks, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(stage)
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding), state)
  x = jax.ShapeDtypeStruct((16, 28, 28, 256), jnp.float32, sharding=sharding)

  def grads(state, x):
    return nnx.grad(lambda stage, x: jnp.mean(stage(x)), argnums=(0, 1))(
        nnx.merge(graphdef, state), x)

  return jax.jit(grads).lower(state, x).compile().memory_analysis().temp_size_in_bytes


@needs_libtpu
@pytest.mark.slow  # two TPU compiles, ~1 minute on 2 cores
def test_remat_blocks_lowers_tpu_temporaries():
  devices = aot.topology_devices(parse_slice("v5e:1x1"))
  without = tpu_gradient_temporaries(False, devices)
  with_remat = tpu_gradient_temporaries(True, devices)
  assert without > 16 * 2**20 and with_remat < 0.5 * without, (with_remat, without)
