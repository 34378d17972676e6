"""TFDS builders over video files as users download them: Kinetics, Charades, own class folders.

Each example keeps the video file's bytes (decoded at training time, only the
sampled frames, by :mod:`nonlocal_jax.data.video_decode`) with its frame
count and frame rate, probed once while preparing:

    {'video': bytes, 'num_frames': int32, 'fps': float32, 'video_id': str,
     'label': int (single-label) or (num_classes,) int32 multi-hot (Charades)}

The files are read from the builder's manual dir
(``config.manual_dir`` -> ``tfds.download.DownloadConfig(manual_dir=...)``);
the layouts are in each builder's MANUAL_DOWNLOAD_INSTRUCTIONS and README.
Videos listed in an annotation file but missing on disk are skipped and
counted in the log (Kinetics always has some). Every video is probed, its
packets read and its first frame decoded while preparing: an unreadable one
fails the build naming it, or is skipped, counted and listed with
``skip_bad_files=True`` (``config.skip_bad_files``). The frame counts are
also kept in ``builder.info.metadata['num_frames'][split]`` ({name: frames},
the name being the example key) for :mod:`nonlocal_jax.data.clip_lengths`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from nonlocal_jax.data import video_decode
from nonlocal_jax.data.clip_lengths import FRAME_COUNTS
from nonlocal_jax.data.user_files import ClassFolderBuilder, UnreadableFileError, UserFilesBuilder

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def _video_features(label: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "video": tfds.features.Tensor(shape=(), dtype=np.object_),
      "num_frames": tfds.features.Scalar(dtype=np.int32),
      "fps": tfds.features.Scalar(dtype=np.float32),
      "video_id": tfds.features.Text(),
      "label": label,
  })


def _video_info(builder: UserFilesBuilder, label: tfds.features.FeatureConnector,
                description: str) -> tfds.core.DatasetInfo:
  """DatasetInfo with the video features and a metadata dict for the frame counts."""
  return builder.dataset_info_from_configs(features=_video_features(label),
                                           description=description,
                                           metadata=tfds.core.MetadataDict())


def _note_frames(builder: UserFilesBuilder, split: str, name: str, num_frames: int) -> None:
  """Records a video's frame count in ``info.metadata['num_frames'][split][name]``.

  Saved with the prepared data (metadata.json), so the clip lengths can be
  checked (:mod:`nonlocal_jax.data.clip_lengths`) without reading the videos.
  """
  counts = builder.info.metadata.setdefault(FRAME_COUNTS, {})
  counts.setdefault(split, {})[name] = int(num_frames)


def _read_video(path: str) -> dict:
  """The video features of the file at `path`; UnreadableFileError if it is no readable video."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    num_frames, fps = video_decode.probe(data, verify=True)
  except video_decode.VideoReadError as e:
    raise UnreadableFileError(str(e)) from e
  return {"video": data, "num_frames": num_frames, "fps": fps}


def _find_videos(root: str) -> dict[str, str]:
  """{file name without extension: path} for every video below `root`."""
  found = {}
  for directory, _, files in os.walk(root):
    for name in files:
      stem, ext = os.path.splitext(name)
      if ext.lower() in VIDEO_EXTENSIONS:
        found[stem] = os.path.join(directory, name)
  return found


def _require(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} not found at {path!r}; see the README's data layout")
  return path


class VideoClassFolder(ClassFolderBuilder):
  """Own videos in class folders: ``<root_dir>/<split>/<class name>/<video>.mp4``.

  Only the folders train, val, validation and test become splits (others
  are ignored with a warning); videos may be anywhere below a class folder.
  The class names are the sorted class folders of train; val / test may not
  have others, and an empty class folder is an error. Use one data_dir per
  data set of your own.
  """

  EXTENSIONS = VIDEO_EXTENSIONS
  RECURSIVE = True
  WHAT = "video"

  def _info(self) -> tfds.core.DatasetInfo:
    return _video_info(self, self._class_label(), self.__doc__)

  def _read(self, path: str) -> dict:
    return _read_video(path)

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    for key, example in super()._generate_examples(split):
      _note_frames(self, split, key, example["num_frames"])
      yield key, example

  def _example_id(self, label: str, relative: str) -> tuple[str, dict]:
    video_id = os.path.splitext(os.path.basename(relative))[0]
    return f"{label}/{relative}", {"video_id": video_id}


class Kinetics(UserFilesBuilder):
  """Kinetics-400 from its official annotation CSVs and the videos as downloaded.

  ``<root_dir>/annotations/{train,validate}.csv`` (columns label, youtube_id,
  time_start, time_end, split) and the clips anywhere below
  ``<root_dir>/{train,val}/`` (flat or in class folders), named
  ``<youtube_id>_<start:06d>_<end:06d>.mp4`` (the downloader's naming) or
  ``<youtube_id>.mp4``. Splits: train, validation.
  """

  SPLIT_FILES = {"train": ("train.csv", "train"), "validation": ("validate.csv", "val")}

  def _rows(self, csv_name: str) -> list[dict]:
    path = _require(os.path.join(self._root(), "annotations", csv_name), "Kinetics annotations")
    with open(path, newline="") as f:
      return list(csv.DictReader(f))

  def _info(self) -> tfds.core.DatasetInfo:
    if self.root_dir:
      names = sorted({row["label"] for row in self._rows("train.csv")})
      label = tfds.features.ClassLabel(names=names)
    else:
      label = tfds.features.ClassLabel(num_classes=400)
    return _video_info(self, label, self.__doc__)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager
    return {split: self._generate_examples(split, csv_name, folder)
            for split, (csv_name, folder) in self.SPLIT_FILES.items()}

  def _generate_examples(self, split: str, csv_name: str,
                         folder: str) -> Iterator[tuple[str, dict]]:
    videos = _find_videos(_require(os.path.join(self._root(), folder), "Kinetics videos"))
    missing = count = 0
    for row in self._rows(csv_name):
      clip_id = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}"
      path = videos.get(clip_id) or videos.get(row["youtube_id"])
      if path is None:
        missing += 1
        continue
      try:
        features = _read_video(path)
      except (UnreadableFileError, OSError) as e:
        self._bad_file(split, path, e)
        continue
      count += 1
      _note_frames(self, split, clip_id, features["num_frames"])
      yield clip_id, {**features, "video_id": clip_id, "label": row["label"]}
    logging.warning("Kinetics %s: %d videos listed in %s are missing on disk, %d unreadable",
                    folder, missing, csv_name, len(self.bad_files.get(split, [])))
    self._end_split(split, count)


class Charades(UserFilesBuilder):
  """Charades v1 (multi-label, 157 classes) from its official CSVs and videos.

  ``<root_dir>/Charades_v1_{train,test}.csv`` (columns id, ..., actions as
  ``c092 11.90 21.20;c147 0.00 12.60``) and the videos
  ``<root_dir>/Charades_v1_480/<id>.mp4``. The label is the video-level
  multi-hot vector of its actions. Splits: train, test (= the paper's val).
  """

  NUM_CLASSES = 157

  def _info(self) -> tfds.core.DatasetInfo:
    label = tfds.features.Tensor(shape=(self.NUM_CLASSES,), dtype=np.int32)
    return _video_info(self, label, self.__doc__)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager
    return {"train": self._generate_examples("train", "Charades_v1_train.csv"),
            "test": self._generate_examples("test", "Charades_v1_test.csv")}

  def _generate_examples(self, split: str, csv_name: str) -> Iterator[tuple[str, dict]]:
    root = self._root()
    videos = _find_videos(_require(os.path.join(root, "Charades_v1_480"), "Charades videos"))
    with open(_require(os.path.join(root, csv_name), "Charades annotations"), newline="") as f:
      rows = list(csv.DictReader(f))
    missing = count = 0
    for row in rows:
      path = videos.get(row["id"])
      if path is None:
        missing += 1
        continue
      try:
        features = _read_video(path)
      except (UnreadableFileError, OSError) as e:
        self._bad_file(split, path, e)
        continue
      label = np.zeros(self.NUM_CLASSES, np.int32)
      for action in filter(None, (row.get("actions") or "").split(";")):
        label[int(action.split()[0][1:])] = 1
      count += 1
      _note_frames(self, split, row["id"], features["num_frames"])
      yield row["id"], {**features, "video_id": row["id"], "label": label}
    logging.warning("Charades %s: %d videos missing on disk, %d unreadable", csv_name, missing,
                    len(self.bad_files.get(split, [])))
    self._end_split(split, count)
