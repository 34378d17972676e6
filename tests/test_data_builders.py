"""Own-data builders accept only what they should and name every bad file.

Tiny jpg / mp4 files are generated in temporary folders; a build of two or
three of them takes about a second.
"""

import csv
import io
import logging
import os

import av
import numpy as np
import pytest
from PIL import Image

from nonlocal_jax.data import video_decode
from nonlocal_jax.data.clip_lengths import check_clip_lengths, frames_needed, stored_frame_counts
from nonlocal_jax.data.image_folder import ImageClassFolder
from nonlocal_jax.data.segmentation_files import Ade20k, Cityscapes19, Voc12Aug
from nonlocal_jax.data.user_files import BadFileError
from nonlocal_jax.data.video_files import Charades, Kinetics, VideoClassFolder


def write_image(path, size=(12, 16), fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  array = np.random.default_rng(len(path)).integers(0, 255, (*size, 3), np.uint8)
  Image.fromarray(array).save(path, format=fmt)


def video_bytes(num_frames=6, size=(16, 16)):
  frames = np.random.default_rng(num_frames).integers(0, 255, (num_frames, *size, 3), np.uint8)
  return video_decode.encode_video(frames)


def write_video(path, data=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(video_bytes() if data is None else data)


def write_text(path, text="not an image, just text\n"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def image_tree(root, splits=("train", "test"), classes=("cats", "dogs")):
  for split in splits:
    for name in classes:
      write_image(os.path.join(root, split, name, f"{split}_{name}.jpg"))


def build(cls, root, tmp_path, **kwargs):
  builder = cls(root_dir=str(root), data_dir=str(tmp_path / "tfds"), **kwargs)
  builder.download_and_prepare()
  return builder


def warnings_text(caplog):
  return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_every_file_builder_accepts_skip_bad_files(tmp_path):
  for cls in (Kinetics, Charades, VideoClassFolder, ImageClassFolder, Cityscapes19, Ade20k,
              Voc12Aug):
    builder = cls(data_dir=str(tmp_path / "tfds"), skip_bad_files=True)
    assert builder.skip_bad_files


def test_stray_folder_is_ignored_with_a_warning(tmp_path, caplog):
  root = tmp_path / "files"
  image_tree(root)
  write_image(str(root / "videos" / "x" / "a.jpg"))  # a folder beside the splits
  caplog.set_level(logging.WARNING)
  builder = build(ImageClassFolder, root, tmp_path)
  assert set(builder.info.splits) == {"train", "test"}
  assert builder.info.splits["train"].num_examples == 2
  assert builder.info.features["label"].names == ["cats", "dogs"]
  assert "'videos'" in warnings_text(caplog)


def test_video_folder_with_stray_videos_folder_builds(tmp_path):
  root = tmp_path / "files"
  for split in ("train", "val"):
    for name in ("a", "b"):
      write_video(str(root / split / name / f"{split}.mp4"))
  write_video(str(root / "videos" / "loose.mp4"))
  builder = build(VideoClassFolder, root, tmp_path)
  assert set(builder.info.splits) == {"train", "val"}
  example = next(builder.as_dataset(split="val").as_numpy_iterator())
  assert example["num_frames"] == 6 and example["video_id"] == b"val"
  # Frame counts are kept with the prepared data, for the clip-length check.
  reloaded = VideoClassFolder(root_dir=str(root), data_dir=str(tmp_path / "tfds"))
  counts = stored_frame_counts(reloaded.info.metadata, "train[:50%]")
  assert counts == {"a/train.mp4": 6, "b/train.mp4": 6}
  assert stored_frame_counts(reloaded.info.metadata, "test") is None
  with pytest.raises(ValueError, match=r"a/train.mp4 \(6 frames\)"):
    check_clip_lengths(counts, frames_needed(4, 2), pad=False, split="train")


def test_no_split_folder_names_the_root_and_the_layout(tmp_path):
  root = tmp_path / "files"
  image_tree(root, splits=("training", "testing"))
  with pytest.raises(FileNotFoundError, match=r"no split folder in .*files.*training.*"
                     r"<split>/<class name>/<file> with <split> one of train, val"):
    build(ImageClassFolder, root, tmp_path)


def test_empty_class_folder_is_named(tmp_path):
  root = tmp_path / "files"
  image_tree(root)
  os.makedirs(root / "train" / "birds")
  write_text(str(root / "train" / "birds" / "notes.txt"))  # not an image: still empty
  with pytest.raises(ValueError, match=r"empty class folder.*train/birds"):
    build(ImageClassFolder, root, tmp_path)


def test_test_class_missing_in_train_is_named(tmp_path):
  root = tmp_path / "files"
  image_tree(root)
  write_image(str(root / "test" / "birds" / "b.jpg"))
  with pytest.raises(ValueError, match=r"test/birds.* no counterpart in .*train"):
    build(ImageClassFolder, root, tmp_path)


def test_images_outside_class_folders_are_named(tmp_path):
  root = tmp_path / "files"
  image_tree(root)
  write_image(str(root / "train" / "loose.jpg"))
  with pytest.raises(ValueError, match=r"directly in the split folder .*train.*loose\.jpg"):
    build(ImageClassFolder, root, tmp_path)


def test_hidden_files_and_folders_are_not_data(tmp_path):
  root = tmp_path / "files"
  image_tree(root)
  write_text(str(root / "train" / "cats" / "._train_cats.jpg"))  # macOS resource fork
  os.makedirs(root / "train" / ".ipynb_checkpoints")
  builder = build(ImageClassFolder, root, tmp_path)
  assert builder.info.splits["train"].num_examples == 2


@pytest.fixture
def bad_images(tmp_path):
  root = tmp_path / "files"
  image_tree(root)
  write_text(str(root / "train" / "cats" / "text.jpg"))
  good = io.BytesIO()
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(good, format="JPEG")
  with open(root / "test" / "dogs" / "cut.jpg", "wb") as f:
    f.write(good.getvalue()[:200])
  return root


def test_unreadable_image_fails_the_build_naming_it(bad_images, tmp_path):
  with pytest.raises(BadFileError, match=r"(?s)split 'test'.*test/dogs/cut\.jpg.*"
                     r"not a readable image.*skip_bad_files=True"):
    build(ImageClassFolder, bad_images, tmp_path)


def test_skip_bad_files_skips_counts_and_lists_images(bad_images, tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  builder = build(ImageClassFolder, bad_images, tmp_path, skip_bad_files=True)
  assert builder.info.splits["train"].num_examples == 2
  assert builder.info.splits["test"].num_examples == 2
  assert {s: [os.path.basename(p) for p, _ in bad] for s, bad in builder.bad_files.items()} == {
      "train": ["text.jpg"], "test": ["cut.jpg"]}
  log = warnings_text(caplog)
  assert "2 unreadable file(s) skipped" in log and "test: 1, train: 1" in log
  assert str(bad_images / "train" / "cats" / "text.jpg") in log
  assert str(bad_images / "test" / "dogs" / "cut.jpg") in log
  images = [ex["image"] for ex in builder.as_dataset(split="train").as_numpy_iterator()]
  assert all(image.shape == (12, 16, 3) for image in images)


def test_class_left_empty_by_skipping_is_named(tmp_path):
  root = tmp_path / "files"
  image_tree(root)
  write_text(str(root / "train" / "birds" / "text.jpg"))
  with pytest.raises(BadFileError, match=r"no readable image file in the class folder.*"
                     r"train/birds"):
    build(ImageClassFolder, root, tmp_path, skip_bad_files=True)


def test_gif_is_stored_as_one_rgb_image(tmp_path):
  root = tmp_path / "files"
  image_tree(root)
  write_image(str(root / "train" / "cats" / "anim.gif"), fmt="GIF")
  builder = build(ImageClassFolder, root, tmp_path)
  shapes = {ex["image_id"]: ex["image"].shape
            for ex in builder.as_dataset(split="train").as_numpy_iterator()}
  assert shapes[b"cats/anim.gif"] == (12, 16, 3)


def test_probe_names_what_is_wrong_with_a_video():
  data = video_bytes(10)
  with pytest.raises(video_decode.VideoReadError, match="not a readable video"):
    video_decode.probe(data[: len(data) // 2])
  with pytest.raises(video_decode.VideoReadError, match="not a readable video"):
    video_decode.probe(b"plain text")
  assert video_decode.probe(data, verify=True) == (10, 25.0)


def test_probe_verify_catches_a_file_cut_short(tmp_path):
  path = str(tmp_path / "faststart.mp4")  # header (frame count) first, so cutting keeps it
  frames = np.random.default_rng(0).integers(0, 255, (30, 32, 32, 3), np.uint8)
  with av.open(path, mode="w", options={"movflags": "faststart"}) as container:
    stream = container.add_stream("libx264", rate=25)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuv420p"
    for array in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  with open(path, "rb") as f:
    data = f.read()
  cut = data[: len(data) // 2]
  assert video_decode.probe(cut)[0] == 30  # the header alone looks fine
  with pytest.raises(video_decode.VideoReadError, match="cut short"):
    video_decode.probe(cut, verify=True)


def test_corrupt_video_in_class_folder_is_named_or_skipped(tmp_path, caplog):
  root = tmp_path / "files"
  for split in ("train", "test"):
    for name in ("a", "b"):
      write_video(str(root / split / name / "v.mp4"))
  data = video_bytes()
  write_video(str(root / "train" / "a" / "cut.mp4"), data[: len(data) // 2])
  with pytest.raises(BadFileError, match=r"(?s)split 'train'.*train/a/cut\.mp4.*"
                     r"not a readable video"):
    build(VideoClassFolder, root, tmp_path / "strict")
  caplog.set_level(logging.WARNING)
  builder = build(VideoClassFolder, root, tmp_path / "skip", skip_bad_files=True)
  assert builder.info.splits["train"].num_examples == 2
  assert [os.path.basename(p) for p, _ in builder.bad_files["train"]] == ["cut.mp4"]
  assert str(root / "train" / "a" / "cut.mp4") in warnings_text(caplog)


def kinetics_and_charades(tmp_path):
  good, data = video_bytes(), video_bytes()
  kinetics = tmp_path / "kinetics"
  os.makedirs(kinetics / "annotations")
  rows = [("zumba", "aaa", 1, 11), ("abseiling", "bbb", 0, 10)]
  for name, folder in (("train.csv", "train"), ("validate.csv", "val")):
    with open(kinetics / "annotations" / name, "w", newline="") as f:
      csv.writer(f).writerows([("label", "youtube_id", "time_start", "time_end", "split"),
                               *[(*r, "x") for r in rows]])
    write_video(str(kinetics / folder / "aaa_000001_000011.mp4"), good)
    write_video(str(kinetics / folder / "bbb.mp4"), data[: len(data) // 3])
  charades = tmp_path / "charades"
  for split in ("train", "test"):
    os.makedirs(charades, exist_ok=True)
    with open(charades / f"Charades_v1_{split}.csv", "w", newline="") as f:
      csv.writer(f).writerows([("id", "actions"), ("V1", "c001 0 1"), ("V2", "")])
  write_video(str(charades / "Charades_v1_480" / "V1.mp4"), good)
  write_text(str(charades / "Charades_v1_480" / "V2.mp4"))
  return kinetics, charades


def test_kinetics_and_charades_name_or_skip_corrupt_videos(tmp_path, caplog):
  kinetics, charades = kinetics_and_charades(tmp_path)
  with pytest.raises(BadFileError, match=r"(?s)split 'train'.*train/bbb\.mp4"):
    build(Kinetics, kinetics, tmp_path / "k_strict")
  with pytest.raises(BadFileError, match=r"(?s)split 'train'.*Charades_v1_480/V2\.mp4"):
    build(Charades, charades, tmp_path / "c_strict")
  caplog.set_level(logging.WARNING)
  builder = build(Kinetics, kinetics, tmp_path / "k_skip", skip_bad_files=True)
  assert builder.info.splits["train"].num_examples == 1
  assert {s: len(b) for s, b in builder.bad_files.items()} == {"train": 1, "validation": 1}
  assert builder.info.metadata["num_frames"]["validation"] == {"aaa_000001_000011": 6}
  builder = build(Charades, charades, tmp_path / "c_skip", skip_bad_files=True)
  assert builder.info.splits["test"].num_examples == 1
  log = warnings_text(caplog)
  assert str(kinetics / "val" / "bbb.mp4") in log
  assert str(charades / "Charades_v1_480" / "V2.mp4") in log
  assert "0 videos listed in validate.csv are missing on disk, 1 unreadable" in log


def test_clip_lengths_short_videos_named_unless_padded(caplog):
  needed = frames_needed(num_frames=8, frame_stride=8)
  assert needed == 57 and frames_needed(0, 2) == 0
  lengths = {"long": 300, "short": 40, "tiny": 1, **{f"v{i:02d}": 50 for i in range(12)}}
  with pytest.raises(ValueError, match=r"14 of the 15 videos of split 'train' are shorter than "
                     r"the 57 frames.*tiny \(1 frames\), short \(40 frames\), v00 \(50 frames\)"
                     r".* and 4 more.*config.pad_short_clips=True"):
    check_clip_lengths(lengths, needed, pad=False, split="train")
  caplog.set_level(logging.WARNING)
  short = check_clip_lengths(lengths, needed, pad=True)
  assert short[:2] == ["tiny", "short"] and len(short) == 14 and "long" not in short
  assert "tiny (1 frames)" in warnings_text(caplog)
  assert check_clip_lengths(lengths, 1, pad=False) == []
