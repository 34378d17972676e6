"""Video clip sampling and augmentation in tf.data (the official Kinetics recipe).

Training: a clip of ``num_frames`` frames ``frame_stride`` apart at a random
start; only those frames are decoded; the short side is scaled to a random
size in ``train_scale``; a random ``crop_size`` square crop; a random
horizontal flip; normalisation with mean 0.45 / std 0.225 on [0, 1] RGB.

Evaluation: ``test_clips`` clips evenly spaced in time x ``test_crops``
squares of ``test_crop_size`` along the long side (1 crop: the centre) at
short side ``test_scale``; the views are stacked on a new axis
(V, T, S, S, 3) and their predictions averaged per video in the eval step.

Examples either hold decoded frames (``video`` uint8 (F, H, W, 3): TFDS
``Video`` features, our synthetic set) or an encoded file (``video`` string
with ``num_frames`` and ``fps``: our Kinetics / Charades / video-folder
builders), decoded with PyAV.
"""

import ml_collections
import tensorflow as tf

from nonlocal_jax.data import video_decode

MEAN, STD = 0.45, 0.225


def clip_indices(num_frames: tf.Tensor, length: int, stride: int, start: tf.Tensor) -> tf.Tensor:
  """Frame numbers start, start + stride, ... (length of them), clamped to the video."""
  indices = tf.cast(start, tf.int32) + tf.range(length, dtype=tf.int32) * stride
  return tf.minimum(indices, tf.maximum(tf.cast(num_frames, tf.int32) - 1, 0))


def _max_start(num_frames: tf.Tensor, length: int, stride: int) -> tf.Tensor:
  return tf.maximum(tf.cast(num_frames, tf.int32) - ((length - 1) * stride + 1), 0)


def _decode(example: dict, indices: tf.Tensor) -> tf.Tensor:
  """Frames `indices` of the example as (T, H, W, 3) uint8."""
  video = example["video"]
  if video.dtype == tf.string:
    frames = tf.numpy_function(
        lambda data, idx, fps: video_decode.decode_frames(data, idx, float(fps)),
        [video, indices, example["fps"]], tf.uint8, stateful=False)
    return tf.ensure_shape(frames, [indices.shape[0], None, None, 3])
  return tf.gather(video, indices)


def _num_frames(example: dict) -> tf.Tensor:
  if example["video"].dtype == tf.string:
    return example["num_frames"]
  return tf.shape(example["video"])[0]


def scale_short_side(frames: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """Bilinear resize of (T, H, W, C) so that min(H, W) == size."""
  shape = tf.cast(tf.shape(frames)[1:3], tf.float32)
  factor = tf.cast(size, tf.float32) / tf.reduce_min(shape)
  new_size = tf.cast(tf.round(shape * factor), tf.int32)
  return tf.image.resize(frames, new_size, method="bilinear")


def normalize(frames: tf.Tensor) -> tf.Tensor:
  return (tf.cast(frames, tf.float32) / 255.0 - MEAN) / STD


def _length(config: ml_collections.ConfigDict, example: dict) -> int:
  return config.num_frames or int(example["video"].shape[0])


def train_clip(example: dict, seed: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """One augmented training clip (T, crop, crop, 3) float32 (no crop: full frames)."""
  seeds = tf.random.experimental.stateless_split(seed, 5)
  length, stride = _length(config, example), config.frame_stride
  num_frames = _num_frames(example)
  start = tf.random.stateless_uniform([], seeds[0], 0, _max_start(num_frames, length, stride) + 1,
                                      dtype=tf.int32)
  frames = _decode(example, clip_indices(num_frames, length, stride, start))
  if config.train_scale:
    low, high = config.train_scale
    size = tf.random.stateless_uniform([], seeds[1], low, high + 1, dtype=tf.int32)
    frames = scale_short_side(frames, size)
  if config.crop_size:
    shape = tf.shape(frames)
    crop = config.crop_size
    y = tf.random.stateless_uniform([], seeds[2], 0, shape[1] - crop + 1, dtype=tf.int32)
    x = tf.random.stateless_uniform([], seeds[3], 0, shape[2] - crop + 1, dtype=tf.int32)
    frames = tf.ensure_shape(frames[:, y:y + crop, x:x + crop], [length, crop, crop, None])
  if config.flip:
    flip = tf.random.stateless_uniform([], seeds[4]) < 0.5
    frames = tf.cond(flip, lambda: tf.reverse(frames, axis=[2]), lambda: frames)
  return normalize(frames)


def _crops(frames: tf.Tensor, size: int, num_crops: int) -> list[tf.Tensor]:
  """`num_crops` squares along the long side (first, centre, last for 3; centre for 1)."""
  shape = tf.shape(frames)
  h, w = shape[1], shape[2]
  crops = []
  for k in range(num_crops):
    fraction = 0.5 if num_crops == 1 else k / (num_crops - 1)
    along_h = tf.cast(tf.cast(h - size, tf.float32) * fraction, tf.int32)
    along_w = tf.cast(tf.cast(w - size, tf.float32) * fraction, tf.int32)
    y = tf.where(h > w, along_h, (h - size) // 2)
    x = tf.where(h > w, (w - size) // 2, along_w)
    crops.append(tf.ensure_shape(frames[:, y:y + size, x:x + size],
                                 [frames.shape[0], size, size, None]))
  return crops


def eval_views(example: dict, config: ml_collections.ConfigDict) -> tf.Tensor:
  """All test views (V, T, S, S, 3) float32, V = test_clips * test_crops."""
  length, stride = _length(config, example), config.frame_stride
  num_frames = _num_frames(example)
  max_start = _max_start(num_frames, length, stride)
  views = []
  for k in range(config.test_clips):
    fraction = 0.5 if config.test_clips == 1 else k / (config.test_clips - 1)
    start = tf.cast(tf.round(tf.cast(max_start, tf.float32) * fraction), tf.int32)
    frames = _decode(example, clip_indices(num_frames, length, stride, start))
    if config.test_scale:
      frames = scale_short_side(frames, config.test_scale)
    if config.test_crop_size:
      views.extend(_crops(frames, config.test_crop_size, config.test_crops))
    else:
      views.append(frames)
  return normalize(tf.stack(views))


def num_views(config: ml_collections.ConfigDict) -> int:
  """Views per example in evaluation (1: no views axis)."""
  return config.test_clips * (config.test_crops if config.test_crop_size else 1)


def input_shape(config: ml_collections.ConfigDict, stored_shape: tuple, train: bool) -> tuple:
  """Shape of one example's inputs: (T, S, S, 3) in training, (V, T, S, S, 3) for V > 1 eval views.

  `stored_shape` is the data set's decoded video shape (F, H, W, 3), with
  None for sizes that vary per example (encoded files); the sizes the config
  fixes take precedence. A size that is neither fixed nor stored is an error
  naming the field to set.
  """
  frames, height, width = (tuple(stored_shape) + (None,) * 3)[:3]
  crop, scale = (config.crop_size, config.train_scale) if train else (config.test_crop_size,
                                                                      config.test_scale)
  if crop:
    height = width = crop
  elif scale:  # the short side is rescaled: the long side depends on each video
    height = width = None
  shape = (config.num_frames or frames, height, width, 3)
  if not all(shape):
    field = "crop_size" if train else "test_crop_size"
    raise ValueError(f"config.input.num_frames and config.input.{field} must be set for this data "
                     f"set: its videos have no fixed size (stored {stored_shape}, clip {shape})")
  return shape if train or num_views(config) == 1 else (num_views(config), *shape)


def default_config() -> ml_collections.ConfigDict:
  """Clip / augmentation settings (overridden by experiment configs)."""
  return ml_collections.ConfigDict(dict(
      num_frames=0,  # 0: every frame of the stored clip
      frame_stride=1,
      train_scale=(),  # () or (min, max) short side
      crop_size=0,
      flip=False,
      test_clips=1,
      test_crops=1,
      test_scale=0,
      test_crop_size=0,
  ))

