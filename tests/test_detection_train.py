"""Training a detector end to end: configs/coco.py:shapes on the small generated set."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import coco
from nonlocal_jax import checkpoints, input_pipeline, train
from nonlocal_jax.data.shapes_detection import ShapesDetection
from nonlocal_jax.plot import read_scalars
from tests.test_train import to_numpy


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("tfds"))
  ShapesDetection(config="shapes_small", data_dir=path).download_and_prepare(
      file_format="array_record")
  return path


def shapes_config(data_dir: str, **overrides):
  config = coco.get_config("shapes")
  config.dataset = "shapes_detection/shapes_small"
  config.data_dir = data_dir
  config.update(overrides)
  return config


@pytest.mark.slow
def test_detector_step_on_8_devices_equals_1_device(shapes_dir):
  config = shapes_config(shapes_dir)
  builder = input_pipeline.get_builder(config)
  batch = next(input_pipeline.train_iterator(builder, config))
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    steps = train.create_steps(config, train.create_mesh(devices))
    state = train.init_state(config, steps)
    new_state, metrics = steps.train_step(state,
                                          input_pipeline.to_global(batch, steps.data_sharding))
    results.append((to_numpy(new_state), metrics.compute()))
  (state1, m1), (state8, m8) = results
  for name in ("loss", "loss_objectness", "loss_classifier", "loss_mask"):
    np.testing.assert_allclose(m1[name], m8[name], rtol=1e-4, err_msg=name)
  leaves8 = dict(jax.tree_util.tree_leaves_with_path(state8))
  checked = 0
  for path, a in jax.tree_util.tree_leaves_with_path(state1):
    if a.dtype.kind == "f":
      np.testing.assert_allclose(a, leaves8[path], rtol=1e-3, atol=1e-5,
                                 err_msg=jax.tree_util.keystr(path))
      checked += 1
  assert checked > 50


@pytest.mark.slow
def test_short_run_lowers_the_loss_and_reports_coco_metrics(shapes_dir, tmp_path):
  config = shapes_config(shapes_dir, num_train_steps=60, warmup_steps=10, log_every_steps=10,
                         checkpoint_every_steps=60)
  final = train.train_and_evaluate(config, str(tmp_path))
  losses = [loss for _, loss in read_scalars(str(tmp_path))["train_loss"]]
  assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
  for name in ("eval_box_AP", "eval_box_AP50", "eval_mask_AP", "eval_detections_per_image"):
    assert name in final and np.isfinite(final[name]), name
  assert 0 < final["eval_box_AP50"] <= 1
  # Frozen parameters (config.frozen_params: the folded norms) kept their initial values.
  weights = checkpoints.load_weights(str(tmp_path))
  scales = [v for p, v in weights.items() if "norm" in p and p[-1] == "scale"]
  assert scales and all(np.all(v == 1) for v in scales)
  fresh = checkpoints.weights_of(train.build_model(config, nnx.Rngs(config.seed)))
  stem = ("backbone", "stem", "conv", "kernel")
  assert weights[stem].shape == fresh[stem].shape and not np.allclose(weights[stem], fresh[stem])
