"""Video clip sampling and augmentation in numpy / PIL (the official Kinetics recipe).

Training: a clip of ``num_frames`` frames ``frame_stride`` apart at a random
start; only those frames are decoded; the short side is scaled to a random
size in ``train_scale``; a random ``crop_size`` square crop; a random
horizontal flip; normalisation with mean 0.45 / std 0.225 on [0, 1] RGB.
The scale and the crop are one bilinear resize of the crop's source box
(PIL ``resize(box=...)``): the same pixels as scaling the whole frame and
cropping, computed only where the crop is.

Evaluation: ``test_clips`` clips evenly spaced in time x ``test_crops``
squares of ``test_crop_size`` along the long side (1 crop: the centre) at
short side ``test_scale``; the views are stacked on a new axis
(V, T, S, S, 3) and their predictions averaged per video in the eval step.

Examples either hold decoded frames (``video`` uint8 (F, H, W, 3): TFDS
``Video`` features, our synthetic set) or an encoded file (``video`` bytes
with ``num_frames`` and ``fps``: our Kinetics / Charades / video-folder
builders), decoded with PyAV. Random draws come from the ``rng`` the caller
seeds (the input pipeline: seed, example index, epoch), so a clip is a pure
function of the example and the seed.
"""

from __future__ import annotations

import ml_collections
import numpy as np
from PIL import Image

from nonlocal_jax.data import video_decode

MEAN, STD = 0.45, 0.225


def clip_indices(num_frames: int, length: int, stride: int, start: int) -> np.ndarray:
  """Frame numbers start, start + stride, ... (length of them), clamped to the video."""
  indices = int(start) + np.arange(length, dtype=np.int64) * stride
  return np.minimum(indices, max(int(num_frames) - 1, 0))


def _max_start(num_frames: int, length: int, stride: int) -> int:
  return max(int(num_frames) - ((length - 1) * stride + 1), 0)


def _encoded(example: dict) -> bool:
  video = example["video"]
  return isinstance(video, (bytes, bytearray)) or (isinstance(video, np.ndarray)
                                                   and video.dtype.kind in "OSV")


def _decode(example: dict, indices: np.ndarray) -> np.ndarray:
  """Frames `indices` of the example as (T, H, W, 3) uint8 (only those are decoded)."""
  if _encoded(example):
    return video_decode.decode_frames(example["video"], indices, float(example["fps"]))
  return np.asarray(example["video"])[indices]


def _num_frames(example: dict) -> int:
  if _encoded(example):
    return int(example["num_frames"])
  return int(np.shape(example["video"])[0])


def _length(config: ml_collections.ConfigDict, example: dict) -> int:
  return config.num_frames or _num_frames(example)


def resize_box(frames: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float]
               ) -> np.ndarray:
  """Bilinear resize of the `box` (x0, y0, x1, y1) of each (H, W, C) uint8 frame to `size` (h, w)."""
  height, width = size
  if box == (0, 0, frames.shape[2], frames.shape[1]) and (height, width) == frames.shape[1:3]:
    return frames
  return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR, box=box))
                   for f in frames])


def scaled_size(shape: tuple[int, int], short_side: int) -> tuple[int, int]:
  """(h, w) with min(h, w) == short_side and the aspect ratio kept (rounded)."""
  factor = short_side / min(shape)
  return int(round(shape[0] * factor)), int(round(shape[1] * factor))


def _scale_and_crop(frames: np.ndarray, short_side: int | None, crop: int | None,
                    offset: tuple[int, int] | None) -> np.ndarray:
  """Scale so the short side is `short_side` (None: keep), then the `crop` square at `offset`."""
  h, w = frames.shape[1:3]
  new_h, new_w = scaled_size((h, w), short_side) if short_side else (h, w)
  if not crop:
    return resize_box(frames, (new_h, new_w), (0, 0, w, h))
  y, x = offset
  sy, sx = h / new_h, w / new_w
  return resize_box(frames, (crop, crop), (x * sx, y * sy, (x + crop) * sx, (y + crop) * sy))


def normalize(frames: np.ndarray) -> np.ndarray:
  return ((frames.astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


def to_display(inputs: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """Undoes :func:`normalize`: (T, H, W, 3) uint8."""
  del config
  return np.clip(np.round((inputs * STD + MEAN) * 255), 0, 255).astype(np.uint8)


def train_clip(example: dict, rng: np.random.Generator,
               config: ml_collections.ConfigDict) -> np.ndarray:
  """One augmented training clip (T, crop, crop, 3) float32 (no crop: full frames)."""
  length, stride = _length(config, example), config.frame_stride
  num_frames = _num_frames(example)
  start = int(rng.integers(0, _max_start(num_frames, length, stride) + 1))
  size = int(rng.integers(config.train_scale[0], config.train_scale[1] + 1)) \
      if config.train_scale else None
  # The frame size is known only once decoded: draw the crop position as a fraction.
  fy, fx = rng.random(2)
  flip = bool(rng.random() < 0.5)
  frames = _decode(example, clip_indices(num_frames, length, stride, start))
  crop = config.crop_size or None
  offset = None
  if crop:
    h, w = scaled_size(frames.shape[1:3], size) if size else frames.shape[1:3]
    if h < crop or w < crop:
      raise ValueError(f"crop_size={crop} is larger than the scaled frames ({h}, {w})")
    offset = (int(fy * (h - crop + 1)), int(fx * (w - crop + 1)))
  frames = _scale_and_crop(frames, size, crop, offset)
  if config.flip and flip:
    frames = frames[:, :, ::-1]
  return normalize(frames)


def _crop_offsets(shape: tuple[int, int], size: int, num_crops: int) -> list[tuple[int, int]]:
  """`num_crops` squares along the long side (first, centre, last for 3; centre for 1)."""
  h, w = shape
  offsets = []
  for k in range(num_crops):
    fraction = 0.5 if num_crops == 1 else k / (num_crops - 1)
    if h > w:
      offsets.append((int((h - size) * fraction), (w - size) // 2))
    else:
      offsets.append(((h - size) // 2, int((w - size) * fraction)))
  return offsets


def eval_views(example: dict, config: ml_collections.ConfigDict) -> np.ndarray:
  """All test views (V, T, S, S, 3) float32, V = test_clips * test_crops."""
  length, stride = _length(config, example), config.frame_stride
  num_frames = _num_frames(example)
  max_start = _max_start(num_frames, length, stride)
  starts = [int(round(max_start * (0.5 if config.test_clips == 1 else k / (config.test_clips - 1))))
            for k in range(config.test_clips)]
  indices = np.concatenate([clip_indices(num_frames, length, stride, s) for s in starts])
  decoded = _decode(example, indices)  # every clip's frames in one decoding pass
  views = []
  for k in range(config.test_clips):
    frames = decoded[k * length:(k + 1) * length]
    scale = config.test_scale or None
    if config.test_crop_size:
      shape = scaled_size(frames.shape[1:3], scale) if scale else frames.shape[1:3]
      for offset in _crop_offsets(shape, config.test_crop_size, config.test_crops):
        views.append(_scale_and_crop(frames, scale, config.test_crop_size, offset))
    else:
      views.append(_scale_and_crop(frames, scale, None, None))
  return normalize(np.stack(views))


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
