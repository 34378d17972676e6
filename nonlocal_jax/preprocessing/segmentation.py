"""Semantic-segmentation augmentation in tf.data (mmsegmentation's recipe).

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

import ml_collections
import tensorflow as tf

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def _rescale(image: tf.Tensor, label: tf.Tensor, img_scale, ratio: tf.Tensor):
  """Keep-ratio resize so that the long side <= long*ratio and the short side <= short*ratio."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  long_side, short_side = float(max(img_scale)), float(min(img_scale))
  factor = ratio * tf.minimum(long_side / tf.reduce_max(shape), short_side / tf.reduce_min(shape))
  size = tf.cast(tf.round(shape * factor), tf.int32)
  image = tf.image.resize(image, size, method="bilinear")
  label = tf.image.resize(label[..., None], size, method="nearest")[..., 0]
  return image, label


def _pad(image: tf.Tensor, label: tf.Tensor, size, ignore_label: int):
  shape = tf.shape(image)[:2]
  pad_h, pad_w = tf.maximum(size[0] - shape[0], 0), tf.maximum(size[1] - shape[1], 0)
  image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
  label = tf.pad(label, [[0, pad_h], [0, pad_w]], constant_values=ignore_label)
  return image, label


def normalize(image: tf.Tensor) -> tf.Tensor:
  return (tf.cast(image, tf.float32) - MEAN) / STD


def train_pair(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor,
               config: ml_collections.ConfigDict) -> tuple[tf.Tensor, tf.Tensor]:
  """(H, W, 3) uint8 image and (H, W) int label -> (crop_h, crop_w, 3) float32, (crop_h, crop_w) int32."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  ratio = tf.random.stateless_uniform([], seeds[0], *config.ratio_range)
  image, label = _rescale(image, tf.cast(label, tf.int32), config.img_scale, ratio)
  crop_h, crop_w = config.crop_size
  image, label = _pad(image, label, (crop_h, crop_w), config.ignore_label)
  shape = tf.shape(image)
  y = tf.random.stateless_uniform([], seeds[1], 0, shape[0] - crop_h + 1, dtype=tf.int32)
  x = tf.random.stateless_uniform([], seeds[2], 0, shape[1] - crop_w + 1, dtype=tf.int32)
  image = tf.ensure_shape(image[y:y + crop_h, x:x + crop_w], [crop_h, crop_w, 3])
  label = tf.ensure_shape(label[y:y + crop_h, x:x + crop_w], [crop_h, crop_w])
  flip = tf.random.stateless_uniform([], seeds[3]) < 0.5
  image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
  label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label)
  return normalize(image), label


def eval_pair(image: tf.Tensor, label: tf.Tensor,
              config: ml_collections.ConfigDict) -> tuple[tf.Tensor, tf.Tensor]:
  """Resized at ratio 1 and padded to eval_pad_size (ignored labels in the padding)."""
  image, label = _rescale(image, tf.cast(label, tf.int32), config.img_scale, tf.constant(1.0))
  image, label = _pad(image, label, config.eval_pad_size, config.ignore_label)
  h, w = config.eval_pad_size
  return (tf.ensure_shape(normalize(image)[:h, :w], [h, w, 3]),
          tf.ensure_shape(label[:h, :w], [h, w]))


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
