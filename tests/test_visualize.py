"""Attention figures, training-curve plots and the example notebook."""

import os

import nbformat
import numpy as np
import pytest
from flax import nnx
from nbclient import NotebookClient
from PIL import Image

from configs import default as default_config
from configs import imagenet as imagenet_config
from nonlocal_jax import checkpoints, visualize
from nonlocal_jax.data import video_decode
from nonlocal_jax.models import create_model
from nonlocal_jax.plot import plot_curves, read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_top_keys_reads_the_query_row_and_maps_cells_to_pixels():
  weights = np.zeros((4, 2, 2, 2, 1, 1))  # query grid (4, 2, 2), key grid (2, 1, 1)
  weights[3, 1, 0, 0, 0, 0] = 0.25
  weights[3, 1, 0, 1, 0, 0] = 0.75
  keys = visualize.top_keys(weights, query=(7, 20, 3), pixels=(8, 32, 32), top_k=2)
  assert keys[0] == ([(4.0, 8.0), (0.0, 32.0), (0.0, 32.0)], 0.75)
  assert keys[1] == ([(0.0, 4.0), (0.0, 32.0), (0.0, 32.0)], 0.25)


def test_salient_queries_find_the_odd_pixels():
  frames = np.zeros((3, 20, 20, 3), np.uint8)
  frames[1, 5, 7] = 255
  frames[2, 15, 2] = 200
  assert visualize.salient_queries(frames, 2) == [(1, 5, 7), (2, 15, 2)]


@pytest.fixture(scope="module")
def video_weights(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("w") / "c2d_nl_tiny")
  checkpoints.save_weights(create_model("c2d_nl_tiny", num_classes=2, rngs=nnx.Rngs(0)), path)
  return path


def test_visualize_a_video_file(tmp_path, video_weights):
  frames = np.random.default_rng(0).integers(0, 60, (12, 40, 48, 3), np.uint8)
  frames[5, 10:16, 20:26] = (230, 40, 40)
  (tmp_path / "clip.mp4").write_bytes(video_decode.encode_video(frames))
  config = default_config.get_config()
  output = str(tmp_path / "attention.png")
  maps = visualize.visualize(config, video_weights, output, source=str(tmp_path / "clip.mp4"),
                             top_k=4)
  assert sorted(maps) == ["stages.1.nonlocal_blocks.0", "stages.2.nonlocal_blocks.0"]
  assert maps["stages.1.nonlocal_blocks.0"].shape[:4] == (1, 6, 5, 6)  # all 12 frames, T / 2
  image = np.asarray(Image.open(output))
  assert image.shape[0] > 200 and image.shape[1] > 600 and image.std() > 10


def test_visualize_an_image_file(tmp_path):
  weights = str(tmp_path / "resnet")
  config = imagenet_config.get_config("resnet_nl_tiny")
  config.num_classes = 3
  config.input.update(crop_size=64, resize_size=64)
  checkpoints.save_weights(create_model("resnet_nl_tiny", num_classes=3, rngs=nnx.Rngs(0)),
                           weights)
  Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), np.uint8)).save(
      tmp_path / "photo.png")
  maps = visualize.visualize(config, weights, str(tmp_path / "a.png"),
                             source=str(tmp_path / "photo.png"), queries=[(0, 30, 30)])
  assert maps["stages.1.nonlocal_blocks.0"].shape == (1, 8, 8, 4, 4)
  assert os.path.getsize(tmp_path / "a.png") > 1000


def test_visualize_bad_inputs(tmp_path, video_weights):
  config = default_config.get_config()
  with pytest.raises(FileNotFoundError, match="nothing.mp4"):
    visualize.visualize(config, video_weights, str(tmp_path / "a.png"),
                        source=str(tmp_path / "nothing.mp4"))
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="expected a video file"):
    visualize.visualize(config, video_weights, str(tmp_path / "a.png"),
                        source=str(tmp_path / "notes.txt"))
  clip = np.zeros((8, 32, 32, 3), np.uint8)
  (tmp_path / "c.mp4").write_bytes(video_decode.encode_video(clip))
  with pytest.raises(ValueError, match="query \\(9, 0, 0\\) is outside"):
    visualize.visualize(config, video_weights, str(tmp_path / "a.png"),
                        source=str(tmp_path / "c.mp4"), queries=[(9, 0, 0)])
  with pytest.raises(ValueError, match="--block \\['stages.9'\\] not found"):
    visualize.visualize(config, video_weights, str(tmp_path / "a.png"),
                        source=str(tmp_path / "c.mp4"), blocks=["stages.9"])


def test_plot_curves_from_event_files(tmp_path):
  from clu import metric_writers
  writer = metric_writers.create_default_writer(str(tmp_path))
  for step in range(1, 6):
    writer.write_scalars(step, {"train_loss": 1.0 / step, "eval_accuracy": step / 10})
  writer.flush()
  scalars = read_scalars(str(tmp_path))
  assert scalars["train_loss"] == [(s, pytest.approx(1.0 / s)) for s in range(1, 6)]
  assert plot_curves(scalars, str(tmp_path / "c.png")) == ["eval_accuracy", "train_loss"]
  assert os.path.getsize(tmp_path / "c.png") > 1000
  with pytest.raises(ValueError, match="tags \\['val_loss'\\] not in the workdir"):
    plot_curves(scalars, str(tmp_path / "c.png"), ["val_loss"])


def test_example_notebook_runs(tmp_path, monkeypatch):
  # The kernel runs in a scratch folder; it finds the package as after `pip install -e .`.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get(
      "PYTHONPATH")])))
  notebook = nbformat.read(os.path.join(ROOT, "examples", "nonlocal_tour.ipynb"), as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "identity at init: True" in outputs
  assert "restored identical weights: True" in outputs
  assert (tmp_path / "attention.png").exists()
