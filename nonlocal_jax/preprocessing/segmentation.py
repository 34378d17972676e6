"""Semantic-segmentation augmentation in numpy / PIL (mmsegmentation's recipe).

Training: resize keeping the aspect ratio so the image fits ``img_scale``
(long, short) times a random ratio in ``ratio_range``; random ``crop_size``
crop; random horizontal flip; pad to the crop size (image 0, label
``ignore_label``); normalise with mean (123.675, 116.28, 103.53) and std
(58.395, 57.12, 57.375) on 0-255 RGB.

Evaluation: the same keep-ratio resize at ratio 1 (labels resized with
nearest neighbour), padded to ``eval_pad_size`` with ignored labels so
images of different sizes batch together. mmseg scores the logits resized
back to the original label size; we score at the resized scale, which is
the same for Cityscapes (2048x1024 in, 2048x1024 scale).
"""

from __future__ import annotations

import ml_collections
import numpy as np
from PIL import Image

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def _rescale(image: np.ndarray, label: np.ndarray, img_scale, ratio: float):
  """Keep-ratio resize so that the long side <= long*ratio and the short side <= short*ratio."""
  h, w = image.shape[:2]
  long_side, short_side = float(max(img_scale)), float(min(img_scale))
  factor = ratio * min(long_side / max(h, w), short_side / min(h, w))
  size = (max(int(round(w * factor)), 1), max(int(round(h * factor)), 1))  # PIL: (w, h)
  if size != (w, h):
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize(size, Image.NEAREST))
  return image, label.astype(np.int32)


def _pad(image: np.ndarray, label: np.ndarray, size, ignore_label: int):
  pad_h, pad_w = max(size[0] - image.shape[0], 0), max(size[1] - image.shape[1], 0)
  image = np.pad(image, [(0, pad_h), (0, pad_w), (0, 0)])
  label = np.pad(label, [(0, pad_h), (0, pad_w)], constant_values=ignore_label)
  return image, label


def normalize(image: np.ndarray) -> np.ndarray:
  return ((image.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)


def to_display(inputs: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """Undoes :func:`normalize`: (1, H, W, 3) uint8 (one frame)."""
  del config
  pixels = inputs * np.array(STD) + np.array(MEAN)
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)[None]


def train_pair(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
               config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """(H, W, 3) uint8 image and (H, W) int label -> (crop_h, crop_w, 3) float32, (crop_h, crop_w) int32."""
  ratio = float(rng.uniform(*config.ratio_range))
  image, label = _rescale(np.asarray(image), np.asarray(label), config.img_scale, ratio)
  crop_h, crop_w = config.crop_size
  image, label = _pad(image, label, (crop_h, crop_w), config.ignore_label)
  y = int(rng.integers(0, image.shape[0] - crop_h + 1))
  x = int(rng.integers(0, image.shape[1] - crop_w + 1))
  image, label = image[y:y + crop_h, x:x + crop_w], label[y:y + crop_h, x:x + crop_w]
  if rng.random() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  return normalize(image), np.ascontiguousarray(label)


def eval_pair(image: np.ndarray, label: np.ndarray,
              config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """Resized at ratio 1 and padded to eval_pad_size (ignored labels in the padding)."""
  image, label = _rescale(np.asarray(image), np.asarray(label), config.img_scale, 1.0)
  image, label = _pad(image, label, config.eval_pad_size, config.ignore_label)
  h, w = config.eval_pad_size
  return normalize(image[:h, :w]), label[:h, :w]


def input_shape(config: ml_collections.ConfigDict, stored_shape: tuple, train: bool) -> tuple:
  """(H, W, 3) of one image: the training crop or the evaluation padding size."""
  del stored_shape  # every size is fixed by the config
  height, width = config.crop_size if train else config.eval_pad_size
  return (height, width, 3)


def default_config() -> ml_collections.ConfigDict:
  """Cityscapes 512x1024 settings."""
  return ml_collections.ConfigDict(dict(
      img_scale=(2048, 1024), ratio_range=(0.5, 2.0), crop_size=(512, 1024), ignore_label=255,
      eval_pad_size=(1024, 2048), eval_mode="whole", eval_crop_size=(512, 1024),
      eval_stride=(341, 682)))
