"""Own images in class folders as a TFDS builder: ``<root_dir>/<split>/<class name>/*.jpg``.

Unlike ``tfds.ImageFolder`` it is prepared into a data dir, so it supports
per-process sub-splits (``tfds.split_for_jax_process``) and split sizes.
Every sub-folder of `root_dir` is a split; the class names are the sorted
folder names found in all splits. Use one data_dir per data set of your own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import tensorflow_datasets as tfds

from nonlocal_jax.data.user_files import UserFilesBuilder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def class_folder_splits(root: str) -> dict[str, list[str]]:
  """{split: sorted class folder names} under `root`."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"class-folder root {root!r} does not exist; expected "
                            "<root>/<split>/<class name>/<files>")
  splits = {}
  for split in sorted(os.listdir(root)):
    split_dir = os.path.join(root, split)
    if os.path.isdir(split_dir):
      splits[split] = sorted(d for d in os.listdir(split_dir)
                             if os.path.isdir(os.path.join(split_dir, d)))
  if not splits:
    raise FileNotFoundError(f"no split folders in {root!r}; expected <root>/<split>/<class>/...")
  return splits


def class_folder_label(root_dir: str | None) -> tfds.features.ClassLabel:
  """ClassLabel over every class folder name below `root_dir` (placeholder when None)."""
  if not root_dir:
    return tfds.features.ClassLabel(num_classes=1)
  names = sorted({c for classes in class_folder_splits(root_dir).values() for c in classes})
  return tfds.features.ClassLabel(names=names)


class ImageClassFolder(UserFilesBuilder):
  """Images in ``<root_dir>/<split>/<class name>/`` (see the module docstring)."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": class_folder_label(self.root_dir),
            "image_id": tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager
    return {split: self._generate_examples(os.path.join(self._root(), split))
            for split in class_folder_splits(self._root())}

  def _generate_examples(self, split_dir: str) -> Iterator[tuple[str, dict]]:
    for label in sorted(os.listdir(split_dir)):
      class_dir = os.path.join(split_dir, label)
      for name in sorted(os.listdir(class_dir)):
        if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
          key = f"{label}/{name}"
          yield key, {"image": os.path.join(class_dir, name), "label": label, "image_id": key}
