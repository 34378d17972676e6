"""Decoding, clip sampling, augmentation, builders and batching against known content."""

import csv
import os
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest

from configs import default as default_config
from nonlocal_jax import input_pipeline
from nonlocal_jax.data import video_decode
from nonlocal_jax.data.long_range_video import make_clip
from nonlocal_jax.data.video_files import Charades, Kinetics
from nonlocal_jax.preprocessing import image as image_ops
from nonlocal_jax.preprocessing import segmentation as seg_ops
from nonlocal_jax.preprocessing import video as video_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def grey_video(num_frames=40, size=(32, 48)):
  """Frame t is uniformly grey with level 5 * t: its index can be read back after compression."""
  frames = np.repeat((np.arange(num_frames) * 5).astype(np.uint8), np.prod(size) * 3)
  return frames.reshape(num_frames, *size, 3)


def frame_levels(frames):
  return np.asarray(frames, np.float32).mean(axis=(1, 2, 3)) / 5


def test_decode_only_requested_frames_with_seek():
  frames = grey_video()
  data = video_decode.encode_video(frames, fps=25)
  assert video_decode.probe(data) == (40, 25.0)
  indices = np.array([0, 7, 8, 9, 33, 39, 33, 45])
  decoded = video_decode.decode_frames(data, indices)
  assert decoded.shape == (8, 32, 48, 3)
  np.testing.assert_allclose(frame_levels(decoded), np.minimum(indices, 39), atol=0.5)


def test_decode_rejects_bad_indices():
  data = video_decode.encode_video(grey_video(10))
  with pytest.raises(ValueError, match="indices"):
    video_decode.decode_frames(data, np.array([-1, 2]))


def video_settings(**overrides):
  settings = video_ops.default_config()
  settings.update(overrides)
  return settings


@pytest.mark.parametrize("encoded", [False, True])
def test_train_clip_samples_strided_frames_deterministically(encoded):
  frames = grey_video(40)
  example = ({"video": video_decode.encode_video(frames), "num_frames": np.int32(40),
              "fps": np.float32(25.0)} if encoded else {"video": frames})
  settings = video_settings(num_frames=4, frame_stride=3)
  clips = [video_ops.train_clip(example, np.random.default_rng([0, s]), settings)
           for s in (1, 1, 2, 3, 4)]
  levels = [np.round(frame_levels(c * video_ops.STD * 255 + video_ops.MEAN * 255))
            for c in clips]
  for lv in levels:
    assert np.all(np.diff(lv) == 3) and lv[0] >= 0 and lv[-1] <= 39
  np.testing.assert_array_equal(levels[0], levels[1])  # same seed, same clip
  assert len({tuple(lv) for lv in levels}) > 1  # other seeds move the clip


def test_train_clip_scale_crop_flip_shapes():
  example = {"video": grey_video(20, (36, 64))}
  settings = video_settings(num_frames=8, frame_stride=2, train_scale=(40, 48), crop_size=32,
                            flip=True)
  clip = video_ops.train_clip(example, np.random.default_rng(0), settings)
  assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.float32


def test_train_clip_crop_and_flip_read_the_scaled_frame():
  # Horizontal ramp: column x holds 2 * x. No scaling: the crop is a window of the ramp,
  # flipped or not; the scale and crop of one resize equal the whole frame scaled then cropped.
  frames = np.tile((np.arange(64, dtype=np.uint8) * 2)[None, None, :, None], (6, 32, 1, 3))
  settings = video_settings(num_frames=2, crop_size=16, flip=True)
  flips = set()
  for s in range(16):
    clip = video_ops.train_clip({"video": frames}, np.random.default_rng(s), settings)
    raw = np.round((clip * video_ops.STD + video_ops.MEAN) * 255)[0, 0, :, 0] / 2
    step = np.diff(raw)
    assert np.all(step == step[0]) and abs(step[0]) == 1
    flips.add(step[0] < 0)
  assert flips == {True, False}
  big = np.random.default_rng(0).integers(0, 255, (1, 30, 40, 3), np.uint8)
  whole = video_ops.resize_box(big, (60, 80), (0, 0, 40, 30))
  box = video_ops._scale_and_crop(big, 60, 20, (10, 30))
  assert np.abs(box.astype(int) - whole[:, 10:30, 30:50].astype(int)).mean() < 2


def test_eval_views_cover_clips_and_three_crops():
  # Horizontal ramp: pixel value = column, so a crop's first column tells its offset.
  frames = np.tile(np.arange(64, dtype=np.uint8)[None, None, :, None], (30, 32, 1, 3))
  frames[..., 1] = np.arange(30, dtype=np.uint8)[:, None, None] * 5  # green = frame index * 5
  settings = video_settings(num_frames=4, frame_stride=2, test_clips=3, test_crops=3,
                            test_scale=32, test_crop_size=32)
  views = video_ops.eval_views({"video": frames}, settings)
  assert views.shape == (9, 4, 32, 32, 3) and video_ops.num_views(settings) == 9
  raw = np.round(views * video_ops.STD * 255 + video_ops.MEAN * 255)
  starts = raw[::3, 0, 0, 0, 1] / 5  # first frame of each clip
  np.testing.assert_array_equal(starts, [0, 12, 23])  # 0, 23 / 2 rounded, 23 = 30 - 7
  offsets = raw[:3, 0, 0, 0, 0]  # first column of crops 0, 1, 2 of clip 0
  np.testing.assert_array_equal(offsets, [0, 16, 32])


def test_segmentation_train_pair_keeps_image_and_label_aligned():
  labels = np.kron(np.arange(12).reshape(3, 4) % 5, np.ones((16, 16), np.int64))  # 48 x 64
  image = np.repeat((labels * 40)[..., None], 3, axis=-1).astype(np.uint8)
  settings = seg_ops.default_config()
  settings.update(img_scale=(64, 48), ratio_range=(0.5, 0.5), crop_size=(40, 40))
  for s in range(4):
    img, lab = seg_ops.train_pair(image, labels, np.random.default_rng([0, s]), settings)
    assert img.shape == (40, 40, 3) and lab.shape == (40, 40)
    # Rescaled by 0.5 to 24 x 32, so most of the 40 x 40 crop is padding: image 0, label 255.
    padded = lab == 255
    assert padded.sum() >= 40 * 40 - 24 * 32
    raw = img[..., 0] * seg_ops.STD[0] + seg_ops.MEAN[0]
    np.testing.assert_allclose(raw[padded], 0, atol=1e-3)
    inner = ~padded
    agree = np.abs(raw[inner] / 40 - lab[inner]) < 0.5
    assert agree.mean() > 0.9  # all but the bilinear seams between blocks


def test_segmentation_eval_pair_pads_with_ignore():
  settings = seg_ops.default_config()
  settings.update(img_scale=(64, 48), eval_pad_size=(56, 72))
  img, lab = seg_ops.eval_pair(np.zeros((48, 64, 3), np.uint8), np.ones((48, 64), np.int64),
                               settings)
  assert img.shape == (56, 72, 3) and lab.dtype == np.int32
  assert np.all(lab[:48, :64] == 1) and np.all(lab[48:] == 255)


def test_image_augmentation_shapes_and_determinism():
  image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)
  settings = image_ops.default_config()
  settings.update(crop_size=24, resize_size=32)
  a = image_ops.train_image(image, np.random.default_rng(3), settings)
  b = image_ops.train_image(image, np.random.default_rng(3), settings)
  c = image_ops.train_image(image, np.random.default_rng(4), settings)
  assert a.shape == (24, 24, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert image_ops.eval_image(image, settings).shape == (24, 24, 3)
  for s in range(20):  # Inception boxes: 8%-100% of the area, inside the image
    y, x, h, w = image_ops.random_resized_box((40, 60), np.random.default_rng(s))
    assert 0 <= y <= 40 - h and 0 <= x <= 60 - w and h * w >= 0.07 * 2400
  settings.update(style="cifar", crop_size=32)
  cifar = np.random.default_rng(1).integers(0, 255, (32, 32, 3), np.uint8)
  crops = [image_ops.train_image(cifar, np.random.default_rng(s), settings) for s in range(8)]
  assert all(c.shape == (32, 32, 3) for c in crops)
  assert image_ops.eval_image(cifar, settings).shape == (32, 32, 3)
  mean, std = image_ops.STATS["cifar"]
  restored = np.round((image_ops.eval_image(cifar, settings) * std + np.array(mean)) * 255)
  np.testing.assert_array_equal(restored, cifar)


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
  config = default_config.get_config()
  config.dataset = "long_range_video/small"
  config.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.batch_size = 16
  config.eval_batch_size = 64
  return config


def test_eval_iterator_sees_every_example_once(small_config):
  builder = input_pipeline.get_builder(small_config)
  batches = list(input_pipeline.eval_iterator(builder, small_config))
  assert len(batches) == 2 and all(b["inputs"].shape[0] == 64 for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])[mask]
  assert mask.sum() == 96
  source = input_pipeline.data_source(builder, "test")
  np.testing.assert_array_equal(labels, [int(source[i]["label"]) for i in range(96)])


def test_train_iterator_resumes_at_the_same_batch(small_config):
  builder = input_pipeline.get_builder(small_config)
  fresh = input_pipeline.train_iterator(builder, small_config)
  batches = [next(fresh) for _ in range(20)]  # crosses an epoch boundary (256 / 16 = 16)
  resumed = input_pipeline.train_iterator(builder, small_config, start_step=17)
  for want in batches[17:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    np.testing.assert_array_equal(got["label"], want["label"])
  # Each epoch is a permutation of the split: every example once per 16 batches.
  source = input_pipeline.data_source(builder, "train")
  read = input_pipeline._TrainExample(source, small_config, 0, 1)
  assert sorted(read.locate(p)[0] for p in range(256)) == list(range(256))
  assert [read.locate(p)[1] for p in (0, 255, 256)] == [0, 0, 1]
  assert [read.locate(p)[0] for p in range(256)] != [read.locate(p)[0] for p in range(256, 512)]


def test_resuming_far_ahead_is_constant_time(small_config):
  builder = input_pipeline.get_builder(small_config)
  start = time.perf_counter()
  first = next(input_pipeline.train_iterator(builder, small_config))
  at_zero = time.perf_counter() - start
  start = time.perf_counter()
  far = next(input_pipeline.train_iterator(builder, small_config, start_step=100_000))
  at_far = time.perf_counter() - start
  assert at_far < 2 * at_zero + 0.5, (at_zero, at_far)
  # The same batch as reading a fresh stream at position 100,000 by random access.
  source = input_pipeline.data_source(builder, "train")
  read = input_pipeline._TrainExample(source, small_config, 0, 1)
  for j in (0, 15):
    np.testing.assert_array_equal(far["inputs"][j], read(100_000 * 16 + j)["inputs"])
  assert not np.array_equal(far["inputs"], first["inputs"])


def test_processes_read_their_slice_of_the_same_global_batch(small_config, monkeypatch):
  builder = input_pipeline.get_builder(small_config)
  whole = next(input_pipeline.train_iterator(builder, small_config, start_step=5))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  halves = []
  for p in range(2):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    halves.append(next(input_pipeline.train_iterator(builder, small_config, start_step=5)))
  for key in ("inputs", "label"):
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
  # Eval: 96 examples over 2 processes, every one exactly once, the same number of batches.
  small_config = ml_collections.ConfigDict(small_config.to_dict())
  small_config.eval_batch_size = 20  # 10 per process: 48 examples each -> 5 batches
  labels, counts = [], []
  for p in range(2):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    batches = list(input_pipeline.eval_iterator(builder, small_config))
    counts.append(len(batches))
    labels.append(np.concatenate([b["label"][b["mask"]] for b in batches]))
  assert counts == [5, 5]
  source = input_pipeline.data_source(builder, "test")
  np.testing.assert_array_equal(np.concatenate(labels), [source[i]["label"] for i in range(96)])


def test_tfrecord_data_gives_a_clear_error(tmp_path):
  from nonlocal_jax.data.long_range_video import LongRangeVideo
  builder = LongRangeVideo(config="small", data_dir=str(tmp_path))
  builder.download_and_prepare()  # TFDS' default: TFRecord
  with pytest.raises(ValueError, match="long_range_video/small.*array_record"):
    input_pipeline.data_source(builder, "train")


HANG_SCRIPT = """
import os, sys
from nonlocal_jax import input_pipeline
from configs import video_folder


def main():
  config = video_folder.get_config("i3d_nl5_r50")
  config.data_dir, config.manual_dir = sys.argv[1], sys.argv[2]
  config.batch_size, config.eval_batch_size = 2, 2
  with config.unlocked():
    config.data_workers = 2
  builder = input_pipeline.get_builder(config)
  config.input.crop_size = 1000  # larger than the frames: the transform raises in a worker
  try:
    next(input_pipeline.train_iterator(builder, config))
  except ValueError as e:
    print("worker error reached the caller:", e, flush=True)
  config.input.crop_size = 32
  iterator = input_pipeline.train_iterator(builder, config)
  print("batch", next(iterator)["inputs"].shape, flush=True)
  raise RuntimeError("training failed while the iterator is alive")


if __name__ == "__main__":
  main()
"""


@pytest.mark.slow
def test_errors_end_the_process_promptly(tmp_path):
  from tests.test_configs import make_files
  make_files("video_class_folder", str(tmp_path / "files"))
  script = tmp_path / "fail.py"
  script.write_text(textwrap.dedent(HANG_SCRIPT))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  start = time.monotonic()
  proc = subprocess.run([sys.executable, str(script), str(tmp_path / "tfds"),
                         str(tmp_path / "files")], env=env, capture_output=True, text=True,
                        timeout=120)
  elapsed = time.monotonic() - start
  assert proc.returncode != 0, proc.stdout + proc.stderr[-3000:]
  assert "worker error reached the caller: crop_size=1000" in proc.stdout, proc.stderr[-3000:]
  assert "batch (2, 8, 32, 32, 3)" in proc.stdout, proc.stderr[-3000:]
  assert "training failed while the iterator is alive" in proc.stderr
  assert elapsed < 90, elapsed


def test_kinetics_and_charades_builders_read_annotations(tmp_path):
  clip = video_decode.encode_video(grey_video(12))
  root = tmp_path / "kinetics"
  (root / "annotations").mkdir(parents=True)
  (root / "train" / "zumba").mkdir(parents=True)
  (root / "val").mkdir()
  rows = [("zumba", "aaa", 1, 11), ("abseiling", "bbb", 0, 10), ("zumba", "missing", 0, 10)]
  for name in ("train.csv", "validate.csv"):
    with open(root / "annotations" / name, "w", newline="") as f:
      csv.writer(f).writerows([("label", "youtube_id", "time_start", "time_end", "split"),
                               *[(*r, "x") for r in rows]])
  (root / "train" / "zumba" / "aaa_000001_000011.mp4").write_bytes(clip)
  (root / "train" / "bbb.mp4").write_bytes(clip)
  (root / "val" / "aaa_000001_000011.mp4").write_bytes(clip)
  builder = Kinetics(root_dir=str(root), data_dir=str(tmp_path / "tfds"), file_format="array_record")
  builder.download_and_prepare(file_format="array_record")
  source = input_pipeline.data_source(builder, "train")
  train = [source[i] for i in range(len(source))]
  names = builder.info.features["label"].names
  assert names == ["abseiling", "zumba"]
  got = sorted((ex["video_id"].decode() if isinstance(ex["video_id"], bytes) else ex["video_id"],
                names[ex["label"]], int(ex["num_frames"])) for ex in train)
  assert got == [("aaa_000001_000011", "zumba", 12), ("bbb_000000_000010", "abseiling", 12)]
  assert builder.info.splits["validation"].num_examples == 1

  root = tmp_path / "charades"
  (root / "Charades_v1_480").mkdir(parents=True)
  for split in ("train", "test"):
    with open(root / f"Charades_v1_{split}.csv", "w", newline="") as f:
      csv.writer(f).writerows([("id", "actions"), ("V1", "c000 0.0 1.0;c156 2.0 3.0;c000 4 5"),
                               ("V2", "")])
  for vid in ("V1", "V2"):
    (root / "Charades_v1_480" / f"{vid}.mp4").write_bytes(clip)
  builder = Charades(root_dir=str(root), data_dir=str(tmp_path / "tfds"), file_format="array_record")
  builder.download_and_prepare(file_format="array_record")
  source = input_pipeline.data_source(builder, "train")
  labels = {source[i]["video_id"]: source[i]["label"] for i in range(len(source))}
  labels = {k.decode() if isinstance(k, bytes) else k: v for k, v in labels.items()}
  assert labels["V1"].sum() == 2 and labels["V1"][0] == labels["V1"][156] == 1
  assert labels["V2"].sum() == 0


def test_unknown_builder_config_and_modality_raise(small_config):
  config = ml_collections.ConfigDict(small_config.to_dict())
  config.dataset = "long_range_video/huge"
  with pytest.raises(ValueError, match="has configs \\['default', 'small'\\]"):
    input_pipeline.get_builder(config)
  config.modality = "audio"
  with pytest.raises(ValueError, match="modality='audio'"):
    input_pipeline.preprocess_fn(config, train=True)


def test_global_batches_are_sharded_over_devices(small_config):
  builder = input_pipeline.get_builder(small_config)
  batch = next(input_pipeline.train_iterator(builder, small_config))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  global_batch = input_pipeline.to_global(batch, sharding)
  assert global_batch["inputs"].shape == (16, 8, 32, 32, 3)
  assert len(global_batch["inputs"].addressable_shards) == 8
  assert global_batch["inputs"].addressable_shards[0].data.shape == (2, 8, 32, 32, 3)


def test_long_range_video_clips_have_two_marks_in_different_halves():
  rng = np.random.default_rng(0)
  for _ in range(20):
    clip, label, marks = make_clip(rng, 8, 32, 6)
    (t1, y1, x1), (t2, y2, x2) = marks
    assert t1 < 4 <= t2
    c1, c2 = clip[t1, y1, x1], clip[t2, y2, x2]
    assert (label == 1) == bool(np.all(c1 == c2))
