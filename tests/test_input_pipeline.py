"""Decoding, clip sampling, augmentation, builders and batching against known content."""

import csv

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from configs import default as default_config
from nonlocal_jax import input_pipeline
from nonlocal_jax.data import video_decode
from nonlocal_jax.data.long_range_video import make_clip
from nonlocal_jax.data.video_files import Charades, Kinetics
from nonlocal_jax.preprocessing import segmentation as seg_ops
from nonlocal_jax.preprocessing import video as video_ops


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
  example = ({"video": tf.constant(video_decode.encode_video(frames)), "num_frames": 40,
              "fps": tf.constant(25.0)} if encoded else {"video": tf.constant(frames)})
  settings = video_settings(num_frames=4, frame_stride=3)
  clips = [video_ops.train_clip(example, tf.constant([0, s], tf.int64), settings)
           for s in (1, 1, 2, 3, 4)]
  levels = [np.round(frame_levels(c.numpy() * video_ops.STD * 255 + video_ops.MEAN * 255))
            for c in clips]
  for lv in levels:
    assert np.all(np.diff(lv) == 3) and lv[0] >= 0 and lv[-1] <= 39
  np.testing.assert_array_equal(levels[0], levels[1])  # same seed, same clip
  assert len({tuple(lv) for lv in levels}) > 1  # other seeds move the clip


def test_train_clip_scale_crop_flip_shapes():
  example = {"video": tf.constant(grey_video(20, (36, 64)))}
  settings = video_settings(num_frames=8, frame_stride=2, train_scale=(40, 48), crop_size=32,
                            flip=True)
  clip = video_ops.train_clip(example, tf.constant([0, 0], tf.int64), settings)
  assert clip.shape == (8, 32, 32, 3)


def test_eval_views_cover_clips_and_three_crops():
  # Horizontal ramp: pixel value = column, so a crop's first column tells its offset.
  frames = np.tile(np.arange(64, dtype=np.uint8)[None, None, :, None], (30, 32, 1, 3))
  frames[..., 1] = np.arange(30, dtype=np.uint8)[:, None, None] * 5  # green = frame index * 5
  settings = video_settings(num_frames=4, frame_stride=2, test_clips=3, test_crops=3,
                            test_scale=32, test_crop_size=32)
  views = video_ops.eval_views({"video": tf.constant(frames)}, settings).numpy()
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
    img, lab = seg_ops.train_pair(tf.constant(image), tf.constant(labels), tf.constant([0, s],
                                  tf.int64), settings)
    img, lab = img.numpy(), lab.numpy()
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
  img, lab = seg_ops.eval_pair(tf.zeros((48, 64, 3), tf.uint8), tf.ones((48, 64), tf.int64),
                               settings)
  assert img.shape == (56, 72, 3)
  assert np.all(lab.numpy()[:48, :64] == 1) and np.all(lab.numpy()[48:] == 255)


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
  want = [int(ex["label"]) for ex in builder.as_dataset(split="test").as_numpy_iterator()]
  np.testing.assert_array_equal(labels, want)


def test_train_iterator_resumes_at_the_same_batch(small_config):
  builder = input_pipeline.get_builder(small_config)
  fresh = input_pipeline.train_iterator(builder, small_config)
  batches = [next(fresh) for _ in range(20)]  # crosses an epoch boundary (256 / 16 = 16)
  resumed = input_pipeline.train_iterator(builder, small_config, start_step=17)
  for want in batches[17:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    np.testing.assert_array_equal(got["label"], want["label"])


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
  builder = Kinetics(root_dir=str(root), data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare()
  train = list(builder.as_dataset(split="train").as_numpy_iterator())
  names = builder.info.features["label"].names
  assert names == ["abseiling", "zumba"]
  got = sorted((ex["video_id"].decode(), names[ex["label"]], int(ex["num_frames"])) for ex in train)
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
  builder = Charades(root_dir=str(root), data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare()
  labels = {ex["video_id"].decode(): ex["label"]
            for ex in builder.as_dataset(split="train").as_numpy_iterator()}
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
