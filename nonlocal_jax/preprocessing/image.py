"""Image classification augmentation in numpy / PIL.

``style='imagenet'``: training takes an Inception-style random-resized crop
(area ``crop_area``, 8%-100% by default, aspect 3/4-4/3, 10 attempts, else
the whole image) resized
to ``crop_size`` and a random flip; evaluation resizes the short side to
``resize_size`` and takes the centre ``crop_size`` square. ``style='cifar'``:
training pads by 4 (reflect), takes a random ``crop_size`` crop and a random
flip; evaluation uses the image as is. Both normalise with the ImageNet (or
CIFAR) channel mean / std. Random draws come from the caller's ``rng``.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np

from nonlocal_jax.preprocessing.video import resize_box, scaled_size

STATS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def normalize(image: np.ndarray, style: str) -> np.ndarray:
  mean, std = STATS[style]
  return ((image.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)).astype(
      np.float32)


def to_display(inputs: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """Undoes :func:`normalize`: (1, H, W, 3) uint8 (one frame)."""
  mean, std = STATS[config.style]
  pixels = (inputs * np.array(std) + np.array(mean)) * 255
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)[None]


def random_resized_box(shape: tuple[int, int], rng: np.random.Generator,
                       area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3),
                       attempts: int = 10) -> tuple[int, int, int, int]:
  """(y, x, h, w) of an Inception crop of an image of `shape` (the whole image if none fits)."""
  height, width = shape
  log_aspect = (math.log(aspect_range[0]), math.log(aspect_range[1]))
  for _ in range(attempts):
    area = height * width * rng.uniform(*area_range)
    aspect = math.exp(rng.uniform(*log_aspect))
    w = int(round(math.sqrt(area * aspect)))
    h = int(round(math.sqrt(area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  return 0, 0, height, width


def train_image(image: np.ndarray, rng: np.random.Generator,
                config: ml_collections.ConfigDict) -> np.ndarray:
  """(H, W, 3) uint8 -> augmented (crop, crop, 3) float32."""
  image = np.asarray(image)
  size = config.crop_size
  if config.style == "cifar":
    padded = np.pad(image, [(4, 4), (4, 4), (0, 0)], mode="reflect")
    y = int(rng.integers(0, padded.shape[0] - size + 1))
    x = int(rng.integers(0, padded.shape[1] - size + 1))
    image = padded[y:y + size, x:x + size]
  else:
    y, x, h, w = random_resized_box(image.shape[:2], rng, area_range=tuple(config.crop_area))
    image = resize_box(image[None], (size, size), (x, y, x + w, y + h))[0]
  if rng.random() < 0.5:
    image = image[:, ::-1]
  return normalize(image, config.style)


def eval_image(image: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """(H, W, 3) uint8 -> (crop, crop, 3) float32 (centre crop of the resized image)."""
  image = np.asarray(image)
  if config.style == "imagenet":
    h, w = image.shape[:2]
    new_h, new_w = scaled_size((h, w), config.resize_size)
    crop = config.crop_size
    y, x = (new_h - crop) // 2, (new_w - crop) // 2
    sy, sx = h / new_h, w / new_w
    image = resize_box(image[None], (crop, crop),
                       (x * sx, y * sy, (x + crop) * sx, (y + crop) * sy))[0]
  return normalize(image, config.style)


def input_shape(config: ml_collections.ConfigDict, stored_shape: tuple, train: bool) -> tuple:
  """(S, S, 3) of one example; CIFAR-style evaluation keeps the stored (H, W, 3) as it is."""
  if train or config.style == "imagenet":
    return (config.crop_size, config.crop_size, 3)
  if None in tuple(stored_shape):
    raise ValueError(f"config.input.style='cifar' evaluates images as they are stored, but this "
                     f"data set's images have no fixed size (stored {tuple(stored_shape)}); use "
                     "style='imagenet' (resize + centre crop)")
  return tuple(stored_shape)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(style="imagenet", crop_size=224, resize_size=256,
                                        crop_area=(0.08, 1.0), image_key="image"))
