"""Detector figures: detections drawn where they are, attention captured through detect().

Tiny detectors with random weights (their non-local blocks' projections made
larger so that the attention is peaked rather than uniform) are saved as the
classifier tests save theirs and drawn end to end on the synthetic
``shapes_detection`` sets. The captured attention is checked against
softmax(theta(x) . phi(maxpool(x)) / sqrt(d)) computed in numpy from each
block's own kernels and its input, sown by the block during a separate run
of ``detect``; the drawing against known pixels of a rendered canvas.
"""

import logging

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx
from PIL import Image

from configs import coco
from nonlocal_jax import checkpoints, train, visualize, visualize_detection
from nonlocal_jax.data.coco_detection import COCO_KEYPOINT_NAMES
from nonlocal_jax.data.detection_features import DetectionMetadata
from nonlocal_jax.nonlocal_block import NonLocalBlock
from nonlocal_jax.preprocessing import detection, modalities
from tests.test_detection_data import COCO_SKELETON
from tests.test_detection_data import synthetic  # noqa: F401 (fixture: shapes_small, figures_small)

TRUNK_NL = ((), (), (0,), ())  # one block after res4's (only) block, the paper's placement


def detector_config(data_dir: str, variant: str, model: str | None = None, **kwargs):
  """configs/coco.py:`variant` on its small data set, with model arguments `kwargs`."""
  config = coco.get_config(variant)
  config.dataset, config.data_dir = f"shapes_detection/{variant}_small", data_dir
  if model:
    config.model.name = model
  config.model.kwargs.update(kwargs)
  return config


def save_detector(config, path: str, seed: int = 0) -> nnx.Module:
  """The config's model with random weights, its non-local projections enlarged, saved at `path`."""
  model = train.build_model(config, nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for _, block in nnx.iter_graph(model):
    if isinstance(block, NonLocalBlock):
      for linear, std in ((block.theta, 0.3), (block.phi, 0.3), (block.out, 0.05)):
        linear.kernel.set_value(jnp.asarray(rng.normal(0, std, linear.kernel.shape), jnp.float32))
  checkpoints.save_weights(model, path)
  return model


def reference_weights(block: NonLocalBlock, x: np.ndarray) -> np.ndarray:
  """(B, H, W, C) -> (B, H, W, H / 2, W / 2): softmax_j(theta_i . phi_j / sqrt(d)) in float64.

  The embedded Gaussian of the paper (eq. 3) with the official 1/sqrt(d)
  scale, keys max-pooled 2x2 before phi, from the block's own kernels.
  """
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  pooled = x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
  project = lambda linear, v: (v @ np.asarray(linear.kernel[...], np.float64)
                               + np.asarray(linear.bias[...], np.float64))
  theta, phi = project(block.theta, x), project(block.phi, pooled)
  logits = np.einsum("bhwd,bpqd->bhwpq", theta, phi) / np.sqrt(theta.shape[-1])
  weights = np.exp(logits - logits.max(axis=(3, 4), keepdims=True))
  return weights / weights.sum(axis=(3, 4), keepdims=True)


@pytest.fixture(scope="module")
def shapes_weights(synthetic, tmp_path_factory):  # noqa: F811
  """(config, weights path) of maskrcnn_nl_tiny on shapes_small."""
  config = detector_config(synthetic, "shapes", "maskrcnn_nl_tiny", nonlocal_blocks=TRUNK_NL)
  path = str(tmp_path_factory.mktemp("w") / "maskrcnn_nl_tiny")
  save_detector(config, path)
  return config, path


def test_every_modality_has_a_figure():
  assert set(visualize.FIGURES) == set(modalities.MODALITIES)
  assert visualize.FIGURES["detection"].method == "detect"


def test_coco_person_skeleton_joins_the_limbs():
  edges = {frozenset((COCO_KEYPOINT_NAMES[a], COCO_KEYPOINT_NAMES[b]))
           for a, b in visualize_detection.coco_person_skeleton()}
  assert len(edges) == 19
  assert {"left_shoulder", "left_elbow"} in edges and {"right_knee", "right_ankle"} in edges
  assert {"left_hip", "right_hip"} in edges and {"nose", "left_eye"} in edges
  assert {"nose", "left_ankle"} not in edges and {"left_wrist", "right_wrist"} not in edges
  # The same list as written out in the COCO test folder's JSON.
  assert [list(e) for e in visualize_detection.COCO_PERSON_SKELETON] == COCO_SKELETON


def test_metadata_stand_in_without_the_data_set(tmp_path):
  config = coco.get_config("keypointrcnn_r50_nl5")
  config.manual_dir, config.data_dir = str(tmp_path / "no_coco"), str(tmp_path / "tfds")
  metadata = visualize_detection.detection_metadata(config)
  assert metadata.class_names == ("class 1",)
  assert metadata.keypoint_names == COCO_KEYPOINT_NAMES
  assert metadata.skeleton == visualize_detection.coco_person_skeleton()


def render(image: np.ndarray, detections, metadata) -> np.ndarray:
  """draw_detections on an Agg canvas of exactly the image's pixels: (H, W, 3) uint8."""
  import matplotlib.pyplot as plt
  height, width = image.shape[:2]
  fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
  ax = fig.add_axes((0, 0, 1, 1))
  visualize_detection.draw_detections(ax, image, detections, metadata)
  ax.set_axis_off()
  fig.canvas.draw()
  pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return pixels


def test_draw_detections_puts_box_mask_and_skeleton_on_their_pixels():
  image = np.zeros((100, 120, 3), np.uint8)
  mask = np.zeros((1, 100, 120), bool)
  mask[0, 50:71, 40:61] = True
  keypoints = np.array([[[30.0, 80.0, 1.0], [70.0, 80.0, 1.0]]], np.float32)
  detections = visualize_detection.Detections(
      boxes=np.array([[20.0, 30.0, 80.0, 90.0]], np.float32), scores=np.array([0.9], np.float32),
      labels=np.array([1]), masks=mask, keypoints=keypoints)
  metadata = DetectionMetadata.create(("thing",), (1,), ("a", "b"), ((0, 1),))
  pixels = render(image, detections, metadata).astype(np.int32)
  assert pixels.shape == (100, 120, 3)
  colour = np.round(np.array(visualize_detection.COLOURS[0]) * 255)

  def closest(region):  # distance of the region's pixel nearest to the colour
    return np.abs(region.reshape(-1, 3) - colour).max(axis=1).min()

  assert closest(pixels[60, 18:23]) < 40  # left edge x = 20
  assert closest(pixels[88:93, 50]) < 40  # bottom edge y = 90
  assert closest(pixels[78:83, 45:55]) < 40  # the skeleton's a-b line at y = 80
  # Inside the mask: the colour over black at the mask's opacity.
  np.testing.assert_allclose(pixels[55:66, 45:56].reshape(-1, 3).mean(0),
                             visualize_detection.MASK_ALPHA * colour, atol=6)
  assert pixels[40, 70].max() == 0  # inside the box, off the mask
  assert pixels[5, 110].max() == 0 and pixels[95, 5].max() == 0  # far away


@pytest.mark.slow  # two compilations of detect (~35 s on 2 cores)
def test_keypoint_detector_attention_is_captured_through_detect(synthetic, tmp_path,  # noqa: F811
                                                                 monkeypatch):
  config = detector_config(synthetic, "figures", nonlocal_blocks=TRUNK_NL)  # keypointrcnn_tiny
  weights = str(tmp_path / "keypointrcnn")
  model = save_detector(config, weights)
  output = tmp_path / "figures.png"
  maps = visualize.visualize(config, weights, str(output), score_threshold=0.3)
  assert output.stat().st_size > 10_000
  roi_blocks = [f"keypoint_head.nonlocal_blocks.{i}" for i in (1, 3, 5, 7)]
  assert list(maps) == ["backbone.stages.2.nonlocal_blocks.0", *roi_blocks]
  # res4 of the 128x128 padded input is 8x8 (stride 16), keys pooled to 4x4; each of the
  # 20 RoIs (box_detections_per_img) attends within its 14x14 grid, keys 7x7.
  assert maps["backbone.stages.2.nonlocal_blocks.0"].shape == (1, 8, 8, 4, 4)
  assert all(maps[name].shape == (20, 14, 14, 7, 7) for name in roi_blocks)
  for weights_ in maps.values():
    np.testing.assert_allclose(weights_.sum(axis=(-2, -1)), 1, atol=1e-5)

  # Each block's input, sown by the block in a run of detect on the same image.
  call = NonLocalBlock.__call__

  def sowing_call(self, x):
    self.sow(nnx.Intermediate, "block_input", x)
    return call(self, x)

  monkeypatch.setattr(NonLocalBlock, "__call__", sowing_call)
  example = tfds.data_source(config.dataset, data_dir=synthetic)["validation"][0]
  images, targets = detection.eval_example(example, config.input)
  run = nnx.jit(nnx.capture(lambda m, x, s: m.detect(x, s), nnx.Intermediate))
  _, sown = run(nnx.view(model, capture_attention=True), jnp.asarray(images[None]),
                jnp.asarray(targets["image_size"][None]))
  inputs = {".".join(str(p) for p in path[:-1]): np.asarray(value.get_value()[0])
            for path, value in nnx.to_flat_state(sown) if path[-1] == "block_input"}
  blocks = {".".join(str(p) for p in path): m for path, m in nnx.iter_graph(model)
            if isinstance(m, NonLocalBlock)}
  assert sorted(inputs) == sorted(blocks) == sorted(maps)
  for name, block in blocks.items():
    expected = reference_weights(block, inputs[name])
    assert expected.max() > 0.2  # peaked, not uniform: the check below can tell them apart
    np.testing.assert_allclose(maps[name], expected, atol=2e-5, err_msg=name)


def test_mask_detector_figure_with_a_query(shapes_weights, tmp_path):
  config, weights = shapes_weights
  output = tmp_path / "shapes.png"
  maps = visualize.visualize(config, weights, str(output), source="dataset:2", queries=[(10, 20)],
                             score_threshold=0.0)
  assert list(maps) == ["backbone.stages.2.nonlocal_blocks.0"]
  assert maps["backbone.stages.2.nonlocal_blocks.0"].shape == (1, 8, 8, 4, 4)
  image = np.asarray(Image.open(output))
  assert image.shape[1] > 500 and image.std() > 10


def test_detector_without_nonlocal_blocks_draws_a_photo(synthetic, tmp_path, caplog):  # noqa: F811
  config = detector_config(synthetic, "shapes")  # maskrcnn_tiny
  weights = str(tmp_path / "maskrcnn_tiny")
  save_detector(config, weights)
  Image.fromarray(np.random.default_rng(2).integers(0, 255, (90, 110, 3), np.uint8)).save(
      tmp_path / "photo.jpg")
  with caplog.at_level(logging.INFO):
    maps = visualize.visualize(config, weights, str(tmp_path / "d.png"),
                               source=str(tmp_path / "photo.jpg"), score_threshold=0.0)
  assert maps == {}
  assert "MaskRCNN has no non-local blocks" in caplog.text
  assert (tmp_path / "d.png").stat().st_size > 1000


def test_detector_bad_inputs(shapes_weights, tmp_path):
  config, weights = shapes_weights
  output = str(tmp_path / "a.png")
  for threshold in (1.5, -0.1):
    with pytest.raises(ValueError, match=rf"--score_threshold={threshold} is outside \[0, 1\]"):
      visualize.visualize(config, weights, output, score_threshold=threshold)
  # Validation image 0 of shapes_small is 96 or 128 pixels a side.
  with pytest.raises(ValueError, match=r"query \(500, 20\) is outside the input: --query takes "
                                       r"y,x with 0 <= y < (96|128), 0 <= x < (96|128)"):
    visualize.visualize(config, weights, output, queries=[(500, 20)])
  with pytest.raises(ValueError, match=r"query \(1, 2, 3\) is outside"):
    visualize.visualize(config, weights, output, queries=[(1, 2, 3)])
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="expected an image file"):
    visualize.visualize(config, weights, output, source=str(tmp_path / "notes.txt"))
  with pytest.raises(ValueError, match=r"--block \['trunk'\] not found"):
    visualize.visualize(config, weights, output, blocks=["trunk"])
