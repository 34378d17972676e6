"""Image classification augmentation in tf.data.

``style='imagenet'``: training takes an Inception-style random-resized crop
(area 8%-100%, aspect 3/4-4/3) resized to ``crop_size`` and a random flip;
evaluation resizes the short side to ``resize_size`` and takes the centre
``crop_size`` square. ``style='cifar'``: training pads by 4, takes a random
``crop_size`` crop and a random flip; evaluation uses the image as is. Both
normalise with the ImageNet (or CIFAR) channel mean / std.
"""

import ml_collections
import tensorflow as tf

STATS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def normalize(image: tf.Tensor, style: str) -> tf.Tensor:
  mean, std = STATS[style]
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def train_image(image: tf.Tensor, seed: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """(H, W, 3) uint8 -> augmented (crop, crop, 3) float32."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  size = config.crop_size
  if config.style == "cifar":
    padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]], mode="REFLECT")
    image = tf.image.stateless_random_crop(padded, [size, size, tf.shape(image)[-1]], seeds[0])
    image = tf.ensure_shape(image, [size, size, None])
  else:
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seeds[0],
        area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop_size)
    image = tf.image.resize(image, [size, size], method="bilinear")
  image = tf.image.stateless_random_flip_left_right(image, seeds[1])
  return normalize(image, config.style)


def eval_image(image: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """(H, W, 3) uint8 -> (crop, crop, 3) float32 (centre crop of the resized image)."""
  if config.style == "imagenet":
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    new_size = tf.cast(tf.round(shape * config.resize_size / tf.reduce_min(shape)), tf.int32)
    image = tf.image.resize(image, new_size, method="bilinear")
    offset = (tf.shape(image)[:2] - config.crop_size) // 2
    image = image[offset[0]:offset[0] + config.crop_size, offset[1]:offset[1] + config.crop_size]
    image = tf.ensure_shape(image, [config.crop_size, config.crop_size, None])
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
  return ml_collections.ConfigDict(dict(style="imagenet", crop_size=224, resize_size=256, image_key="image"))
