"""Training a detector end to end: configs/coco.py:shapes on the small generated set."""

import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import coco
from nonlocal_jax import checkpoints, input_pipeline, train
from nonlocal_jax.data.shapes_detection import ShapesDetection
from nonlocal_jax.plot import read_scalars
from tests.test_train import ROOT, run_two_processes, to_numpy


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
def test_two_process_run_lowers_the_loss_and_scores_every_eval_image(shapes_dir, tmp_path):
  """A short run of two processes: the loss falls, frozen parameters stay, and the COCO
  metrics (each process reads its own slice of the eval split) are those of the whole
  split: equal to evaluating the same checkpoint in one process."""
  overrides = dict(num_train_steps=60, warmup_steps=10, log_every_steps=10,
                   checkpoint_every_steps=60)
  finals, _ = run_two_processes(
      [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={tmp_path / 'wd'}",
       "--config=" + os.path.join(ROOT, "configs", "coco.py") + ":shapes",
       "--config.dataset=shapes_detection/shapes_small", f"--config.data_dir={shapes_dir}",
       *[f"--config.{k}={v}" for k, v in overrides.items()]], timeout=900)
  assert finals[0] == finals[1]
  assert 0 < finals[0]["eval_box_AP50"] <= 1  # trained: the comparison below is not 0 == 0
  workdir = str(tmp_path / "wd")
  losses = [loss for _, loss in read_scalars(workdir)["train_loss"]]
  assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
  # Frozen parameters (config.frozen_params: the folded norms) kept their initial values.
  config = shapes_config(shapes_dir, **overrides)
  weights = checkpoints.load_weights(workdir)
  scales = [v for p, v in weights.items() if "norm" in p and p[-1] == "scale"]
  assert scales and all(np.all(v == 1) for v in scales)
  fresh = checkpoints.weights_of(train.build_model(config, nnx.Rngs(config.seed)))
  stem = ("backbone", "stem", "conv", "kernel")
  assert weights[stem].shape == fresh[stem].shape and not np.allclose(weights[stem], fresh[stem])
  # The finished workdir evaluated again by this single process on 8 devices.
  single = train.train_and_evaluate(config, workdir)
  names = [k for k in finals[0] if k.startswith("eval_")]
  assert {"eval_box_AP", "eval_mask_AP", "eval_detections_per_image"} <= set(names)
  for name in names:
    assert single[name] == pytest.approx(finals[0][name], abs=1e-4), name
