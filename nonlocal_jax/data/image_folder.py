"""Own images in class folders as a TFDS builder: ``<root_dir>/<split>/<class name>/*.jpg``.

Unlike ``tfds.ImageFolder`` it is prepared into a data dir, so it supports
per-process sub-splits (``tfds.split_for_jax_process``) and split sizes.
Only the folders ``train``, ``val``, ``validation`` and ``test`` become
splits (others are ignored with a warning); the class names are the sorted
class folders of train, and val / test may not have others; an empty class
folder is an error. Every image is decoded once while preparing, as training
will decode it: an unreadable one fails the build naming it, or is skipped
and listed with ``skip_bad_files=True``. Use one data_dir per data set of
your own.
"""

from __future__ import annotations

import re

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from nonlocal_jax.data.user_files import ClassFolderBuilder, UnreadableFileError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def _op_message(error: tf.errors.OpError) -> str:
  """A TF op error's message without the op and device decoration."""
  message = re.sub(r"\{\{[^}]*\}\}\s*", "", error.message)
  return re.sub(r"\s*\[Op:\w+\]$", "", message).strip()


def read_image(path: str) -> bytes | np.ndarray:
  """The file's bytes once they decode to an RGB image as training decodes them.

  An animated (or single-frame) GIF becomes its first frame as an array,
  which TFDS stores as PNG: training's decoder expects one image per file.
  Raises UnreadableFileError for anything that does not decode.
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    image = tf.image.decode_image(data, channels=3, expand_animations=True)
  except tf.errors.OpError as e:
    raise UnreadableFileError(f"not a readable image ({_op_message(e)})") from e
  if image.shape.rank == 4:
    return image[0].numpy()
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise UnreadableFileError(f"an image of no pixels ({image.shape[0]} x {image.shape[1]})")
  return data


class ImageClassFolder(ClassFolderBuilder):
  """Images in ``<root_dir>/<split>/<class name>/`` (see the module docstring)."""

  EXTENSIONS = IMAGE_EXTENSIONS
  RECURSIVE = False
  WHAT = "image"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": self._class_label(),
            "image_id": tfds.features.Text(),
        }))

  def _read(self, path: str) -> dict:
    return {"image": read_image(path)}

  def _example_id(self, label: str, relative: str) -> tuple[str, dict]:
    key = f"{label}/{relative}"
    return key, {"image_id": key}
