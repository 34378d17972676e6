"""TFDS builders over segmentation data as users download it: Cityscapes, ADE20K, VOC12aug.

Examples are ``{'image': (H, W, 3) uint8, 'label': (H, W, 1) uint8,
'image_id': str}``; labels are train ids with 255 = ignore (Cityscapes ids
mapped to the 19 train ids, ADE20K's 0 = "other" ignored and 1..150 shifted
to 0..149, VOC's 255 border kept). Layouts (``root_dir`` = config.manual_dir):

* Cityscapes: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
  ``gtFine/{train,val}/<city>/*_gtFine_labelIds.png``.
* ADE20K: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
  ``ADEChallengeData2016/annotations/{training,validation}/*.png``.
* VOC12aug (VOC2012 + SBD, mmseg layout): ``VOC2012/JPEGImages/*.jpg``,
  ``VOC2012/SegmentationClassAug/*.png`` and
  ``VOC2012/ImageSets/Segmentation/{train_aug,val}.txt``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from nonlocal_jax.data.user_files import UserFilesBuilder

IGNORE = 255

# Cityscapes label id -> train id (the 19 evaluated classes); everything else ignored.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                        23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _lookup_table(mapping: dict[int, int]) -> np.ndarray:
  table = np.full(256, IGNORE, np.uint8)
  for source, target in mapping.items():
    table[source] = target
  return table


class _SegmentationBuilder(UserFilesBuilder, skip_registration=True):
  """Base: images and label maps from `root_dir`, labels remapped by `_remap`."""

  NUM_CLASSES = 0

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.Image(shape=(None, None, 1)),
            "image_id": tfds.features.Text(),
        }))

  def _pairs(self, split: str) -> list[tuple[str, str, str]]:
    """(image id, image path, label path) of a split."""
    raise NotImplementedError

  def _remap(self, label: np.ndarray) -> np.ndarray:
    return label

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self.SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    pairs = self._pairs(split)
    if not pairs:
      raise FileNotFoundError(f"{self.name}: no images for split {split!r} under {self._root()}")
    for image_id, image_path, label_path in pairs:
      label = np.asarray(Image.open(label_path))
      if label.ndim == 3:
        label = label[..., 0]
      yield image_id, {"image": image_path, "label": self._remap(label)[..., None].astype(np.uint8),
                       "image_id": image_id}


class Cityscapes19(_SegmentationBuilder):
  """Cityscapes fine annotations, 19 classes (see the module docstring for the layout)."""

  SPLITS = ("train", "validation")
  NUM_CLASSES = 19
  _TABLE = _lookup_table(CITYSCAPES_TRAIN_IDS)

  def _pairs(self, split):
    folder = {"train": "train", "validation": "val"}[split]
    images = sorted(glob.glob(os.path.join(self._root(), "leftImg8bit", folder, "*",
                                           "*_leftImg8bit.png")))
    pairs = []
    for path in images:
      image_id = os.path.basename(path)[:-len("_leftImg8bit.png")]
      city = os.path.basename(os.path.dirname(path))
      label = os.path.join(self._root(), "gtFine", folder, city, f"{image_id}_gtFine_labelIds.png")
      pairs.append((image_id, path, label))
    return pairs

  def _remap(self, label):
    return self._TABLE[label]


class Ade20k(_SegmentationBuilder):
  """ADE20K SceneParsing (ADEChallengeData2016), 150 classes, 0 = other is ignored."""

  SPLITS = ("train", "validation")
  NUM_CLASSES = 150
  _TABLE = _lookup_table({i: i - 1 for i in range(1, 151)})

  def _pairs(self, split):
    folder = {"train": "training", "validation": "validation"}[split]
    root = os.path.join(self._root(), "ADEChallengeData2016")
    images = sorted(glob.glob(os.path.join(root, "images", folder, "*.jpg")))
    return [(os.path.basename(p)[:-4], p,
             os.path.join(root, "annotations", folder, os.path.basename(p)[:-4] + ".png"))
            for p in images]

  def _remap(self, label):
    return self._TABLE[label]


class Voc12Aug(_SegmentationBuilder):
  """PASCAL VOC 2012 + SBD augmented training set (10,582 images), 21 classes."""

  SPLITS = ("train", "validation")
  NUM_CLASSES = 21

  def _pairs(self, split):
    root = os.path.join(self._root(), "VOC2012")
    list_file = {"train": "train_aug.txt", "validation": "val.txt"}[split]
    list_path = os.path.join(root, "ImageSets", "Segmentation", list_file)
    if not os.path.exists(list_path):
      raise FileNotFoundError(f"{self.name}: split list {list_path!r} not found")
    with open(list_path) as f:
      ids = [line.split()[0] for line in f if line.strip()]
    return [(i, os.path.join(root, "JPEGImages", f"{i}.jpg"),
             os.path.join(root, "SegmentationClassAug", f"{i}.png")) for i in ids]
