"""One table of what each input modality does; the input pipeline and the figures read only this.

A :class:`Modality` maps a stored example (a dict of numpy values from a
TFDS data source) to ``(inputs, label)``: augmented in training (random
draws from the given ``numpy.random.Generator``), deterministic in
evaluation. ``settings`` is ``config.input``. The label is one int32 array
(a class, multi-hot classes or a segmentation map), or for detection a dict
of target arrays (:attr:`Modality.label_spec` gives their shapes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections
import numpy as np

from nonlocal_jax.preprocessing import detection, image, segmentation, video

Settings = ml_collections.ConfigDict
# One example's label: an array, or a dict of arrays (detection targets).
Label = np.ndarray | dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Modality:
  """How one modality's examples become model inputs."""
  # The feature holding the inputs (its stored shape feeds input_shape).
  stored_key: Callable[[Settings], str]
  # (settings, stored shape, train) -> shape of one example's inputs.
  input_shape: Callable[[Settings, tuple, bool], tuple]
  # (example, rng, settings) -> (inputs, label), augmented.
  train: Callable[[dict, np.random.Generator, Settings], tuple[np.ndarray, Label]]
  # (example, settings) -> (inputs, label); video inputs with V > 1 views are (V, ...).
  eval: Callable[[dict, Settings], tuple[np.ndarray, Label]]
  # settings -> views per eval example (1: no views axis).
  num_eval_views: Callable[[Settings], int]
  # (one view's inputs, settings) -> (T, H, W, 3) uint8 for display (images: T = 1).
  to_display: Callable[[np.ndarray, Settings], np.ndarray]
  # True: the label is a map of the input's (H, W); False: the stored label feature's shape.
  dense_label: bool = False
  # None: the label is one int32 array (shape: see dense_label). Else (settings, train) -> {name:
  # (shape, dtype)} of one example's label, a dict of arrays the modality returns as they are.
  label_spec: Callable[[Settings, bool], dict[str, tuple[tuple[int, ...], type]]] | None = None


def _class_label(example: dict) -> np.ndarray:
  return np.asarray(example["label"], np.int32)


def _video_train(example, rng, settings):
  return video.train_clip(example, rng, settings), _class_label(example)


def _video_eval(example, settings):
  views = video.eval_views(example, settings)
  return (views[0] if video.num_views(settings) == 1 else views), _class_label(example)


def _image_train(example, rng, settings):
  return image.train_image(example[settings.image_key], rng, settings), _class_label(example)


def _image_eval(example, settings):
  return image.eval_image(example[settings.image_key], settings), _class_label(example)


def _segmentation_label(example: dict) -> np.ndarray:
  return np.asarray(example["label"])[..., 0]


def _segmentation_train(example, rng, settings):
  return segmentation.train_pair(example["image"], _segmentation_label(example), rng, settings)


def _segmentation_eval(example, settings):
  return segmentation.eval_pair(example["image"], _segmentation_label(example), settings)


MODALITIES: dict[str, Modality] = {
    "video": Modality(
        stored_key=lambda settings: "video", input_shape=video.input_shape, train=_video_train,
        eval=_video_eval, num_eval_views=video.num_views, to_display=video.to_display),
    "image": Modality(
        stored_key=lambda settings: settings.image_key, input_shape=image.input_shape,
        train=_image_train, eval=_image_eval, num_eval_views=lambda settings: 1,
        to_display=image.to_display),
    "segmentation": Modality(
        stored_key=lambda settings: "image", input_shape=segmentation.input_shape,
        train=_segmentation_train, eval=_segmentation_eval, num_eval_views=lambda settings: 1,
        to_display=segmentation.to_display, dense_label=True),
    "detection": Modality(
        stored_key=lambda settings: "image", input_shape=detection.input_shape,
        train=detection.train_example, eval=detection.eval_example,
        num_eval_views=detection.num_eval_views, to_display=detection.to_display,
        label_spec=detection.target_spec),
}


def get(name: str) -> Modality:
  """The modality called `name`; a ValueError lists the known ones."""
  if name not in MODALITIES:
    raise ValueError(f"config.modality={name!r} is not one of {tuple(MODALITIES)}")
  return MODALITIES[name]
