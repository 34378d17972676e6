"""Synthetic detection data: overlapping shapes, or stick figures with keypoints, generated offline.

Each image is 96 or 128 pixels high and 96 or 128 wide (drawn per image, so
the input pipeline's resizing and flips see both orientations), a smooth
random colour field with pixel noise as background, and objects painted in
order in distinct bright colours: a later object occludes the earlier ones.
Masks are what is visible of each object, boxes are tight around them, and an
object with less than :data:`MIN_VISIBLE_FRACTION` of its pixels (or fewer
than :data:`MIN_VISIBLE_PIXELS`) left visible is not an object of the image
(its pixels stay painted). Nothing covers the last object, so every image
has at least one.

Configs (the features are :mod:`nonlocal_jax.data.detection_features`'s):

* ``shapes``: 1-4 objects of 3 classes, square (rotated), disk and
  triangle (equilateral, rotated), 12-48 px across (side or diameter); most
  are placed near an earlier one so that they overlap.
* ``figures``: 1-3 stick figures (class ``figure``) with thick limbs, upright
  within +-20 degrees, arms and legs bent at random, 40-72 px tall, some
  reaching past the border. 7 keypoints (:data:`KEYPOINT_NAMES`); ``left_*``
  is the figure's left, which faces the viewer, so it is on the image's
  right (as in COCO). Visibility as in COCO: 2 visible, 1 covered by a later
  figure, 0 outside the image (x = y = 0).
* ``shapes_small`` / ``figures_small``: the first examples of each split of
  the above, for tests.

Splits ``train`` (2000 images) and ``validation`` (300). Example i of a split
is drawn from its own generator seeded with (SEED, scene, split, i), so the
data are the same on every build and a small config is a prefix of the full
one. Category ids are 1..K (COCO's ids start at 1), labels 0..K-1.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from nonlocal_jax.data.detection_features import (METADATA_KEY, DetectionMetadata,
                                                  detection_features, encode_mask)

SHAPE_NAMES = ("square", "disk", "triangle")
KEYPOINT_NAMES = ("head", "left_hand", "right_hand", "left_hip", "right_hip", "left_foot",
                  "right_foot")
# 0-indexed edges between keypoints, for drawing: head to hands and hips, hips, hips to feet.
SKELETON = ((0, 1), (0, 2), (0, 3), (0, 4), (3, 4), (3, 5), (4, 6))
IMAGE_SIDES = (96, 128)
SHAPE_SIZES = (12, 48)  # side of a square or triangle, diameter of a disk, in pixels
FIGURE_HEIGHTS = (40, 72)
MAX_SHAPES = 4
MAX_FIGURES = 3
MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_PIXELS = 30
SCENES = ("shapes", "figures")
SPLITS = ("train", "validation")


def pixel_centres(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """(H, 1) y and (1, W) x of the pixel centres (pixel (i, j) covers [j, j + 1) x [i, i + 1))."""
  return (np.arange(height, dtype=np.float32)[:, None] + 0.5,
          np.arange(width, dtype=np.float32)[None, :] + 0.5)


def shape_mask(shape: str, centre: np.ndarray, size: float, angle: float, height: int,
               width: int) -> np.ndarray:
  """(H, W) bool mask of a square (side `size`), disk (diameter) or triangle (side), rotated."""
  y, x = pixel_centres(height, width)
  dx, dy = x - centre[0], y - centre[1]
  if shape == "disk":
    return dx * dx + dy * dy <= (size / 2) ** 2
  if shape == "square":
    cos, sin = np.cos(angle), np.sin(angle)
    return (np.abs(cos * dx + sin * dy) <= size / 2) & (np.abs(-sin * dx + cos * dy) <= size / 2)
  # Equilateral triangle: inside the three edges' half-planes, each at the inradius.
  inside = np.ones((height, width), bool)
  for k in range(3):
    normal = angle + np.pi / 3 + 2 * np.pi * k / 3
    inside &= np.cos(normal) * dx + np.sin(normal) * dy <= size / (2 * np.sqrt(3))
  return inside


def circumradius(shape: str, size: float) -> float:
  """Distance from the centre to the farthest point of a shape of `size`."""
  return {"disk": size / 2, "square": size / np.sqrt(2), "triangle": size / np.sqrt(3)}[shape]


def capsules_mask(segments: np.ndarray, radius: float, height: int, width: int) -> np.ndarray:
  """(H, W) bool: pixel centres within `radius` of any of the (S, 2, 2) segments [(x, y), (x, y)].

  Only the window around the segments is computed.
  """
  mask = np.zeros((height, width), bool)
  segments = np.asarray(segments, np.float32)
  x0, y0 = np.maximum(np.floor(segments.reshape(-1, 2).min(0) - radius), 0).astype(int)
  x1 = int(min(np.ceil(segments[..., 0].max() + radius), width))
  y1 = int(min(np.ceil(segments[..., 1].max() + radius), height))
  if x0 >= x1 or y0 >= y1:
    return mask
  y, x = pixel_centres(y1 - y0, x1 - x0)
  start = segments[:, 0] - np.array([x0, y0], np.float32)
  along = segments[:, 1] - segments[:, 0]
  px = x[None] - start[:, 0, None, None]  # (S, 1, w)
  py = y[None] - start[:, 1, None, None]  # (S, h, 1)
  dx, dy = along[:, 0, None, None], along[:, 1, None, None]
  t = np.clip((px * dx + py * dy) / np.maximum(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
  mask[y0:y1, x0:x1] = ((px - t * dx) ** 2 + (py - t * dy) ** 2 <= radius * radius).any(axis=0)
  return mask


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """(H, W, 3) float32 dark colour field: a random 4x4 grid interpolated bilinearly."""
  grid = rng.uniform(20, 110, size=(4, 4, 3)).astype(np.float32)
  # Linear interpolation weights of each row / column between the 4 grid points.
  rows = np.maximum(1 - np.abs(np.linspace(0, 3, height)[:, None] - np.arange(4)), 0)
  cols = np.maximum(1 - np.abs(np.linspace(0, 3, width)[:, None] - np.arange(4)), 0)
  along_rows = (rows.astype(np.float32) @ grid.reshape(4, 12)).reshape(height, 4, 3)
  return cols.astype(np.float32) @ along_rows  # (W, 4) @ (H, 4, 3) -> (H, W, 3)


def distinct_colours(rng: np.random.Generator, count: int) -> np.ndarray:
  """(count, 3) bright colours (a channel >= 150) that differ pairwise by >= 80 in some channel."""
  while True:
    colours = rng.uniform(0, 255, size=(count, 3))
    bright = colours.max(axis=1) >= 150
    apart = np.abs(colours[:, None] - colours[None]).max(-1) + 255 * np.eye(count) >= 80
    if bright.all() and apart.all():
      return colours


def tight_box(mask: np.ndarray) -> list[float]:
  """(x1, y1, x2, y2) of the smallest box holding every pixel of a non-empty (H, W) mask."""
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def paint(rng: np.random.Generator, masks: list[np.ndarray]) -> np.ndarray:
  """(H, W, 3) uint8: background, then each mask in order in its colour, then pixel noise."""
  image = background(rng, *masks[0].shape)
  for mask, colour in zip(masks, distinct_colours(rng, len(masks))):
    image[mask] = colour
  image += 8 * rng.standard_normal(image.shape, dtype=np.float32)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def visible_parts(masks: list[np.ndarray]) -> tuple[list[int], list[np.ndarray]]:
  """Indices and visible masks of the objects that stay objects once later ones occlude them."""
  kept, visible = [], []
  covered = np.zeros_like(masks[0])
  for index in reversed(range(len(masks))):
    part = masks[index] & ~covered
    area = int(part.sum())
    if area >= MIN_VISIBLE_PIXELS and area >= MIN_VISIBLE_FRACTION * masks[index].sum():
      kept.append(index)
      visible.append(part)
    covered |= masks[index]
  return kept[::-1], visible[::-1]


def objects_feature(labels: list[int], visible: list[np.ndarray]) -> dict[str, np.ndarray | list]:
  """The ``objects`` feature (without keypoints) of visible masks and their labels."""
  return {
      "bbox": np.asarray([tight_box(m) for m in visible], np.float32).reshape(-1, 4),
      "label": np.asarray(labels, np.int64),
      "category_id": np.asarray(labels, np.int64) + 1,
      "is_crowd": np.zeros(len(labels), np.bool_),
      "area": np.asarray([m.sum() for m in visible], np.float32),
      "mask": [encode_mask(m) for m in visible],
  }


def near(rng: np.random.Generator, previous: list[np.ndarray], spread: float, low: np.ndarray,
         high: np.ndarray) -> np.ndarray:
  """A point (x, y) in [low, high], 60 % of the time within +-`spread` of a random earlier one."""
  if previous and rng.random() < 0.6:
    anchor = previous[rng.integers(len(previous))]
    return np.clip(anchor + rng.uniform(-spread, spread, size=2), low, high)
  return rng.uniform(low, high)


def make_shapes(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, dict]:
  """An image (H, W, 3) uint8 of 1-4 overlapping shapes and its ``objects`` feature."""
  masks, labels, centres = [], [], []
  for _ in range(rng.integers(1, MAX_SHAPES + 1)):
    label = int(rng.integers(len(SHAPE_NAMES)))
    size = rng.uniform(*SHAPE_SIZES)
    reach = circumradius(SHAPE_NAMES[label], size)
    low, high = np.array([reach, reach]), np.array([width - reach, height - reach])
    centre = near(rng, centres, 0.6 * (size + SHAPE_SIZES[1]) / 2, low, high)
    masks.append(shape_mask(SHAPE_NAMES[label], centre, size, rng.uniform(0, 2 * np.pi),
                            height, width))
    labels.append(label)
    centres.append(centre)
  kept, visible = visible_parts(masks)
  return paint(rng, masks), objects_feature([labels[i] for i in kept], visible)


def direction(angle: float, tilt: float) -> np.ndarray:
  """Unit (x, y) vector `angle` from straight down towards +x, the figure tilted by `tilt`."""
  return np.array([np.sin(angle + tilt), np.cos(angle + tilt)])


def stick_figure(rng: np.random.Generator, pelvis: np.ndarray, height: int,
                 width: int) -> tuple[np.ndarray, np.ndarray]:
  """(H, W) bool mask and (7, 2) keypoints (x, y) of a figure standing on `pelvis`."""
  size = rng.uniform(*FIGURE_HEIGHTS)
  tilt = rng.uniform(-np.pi / 9, np.pi / 9)
  up = -direction(0.0, tilt)
  across = np.array([-up[1], up[0]])  # towards the figure's left (the image's right)
  neck = pelvis + 0.34 * size * up
  head = pelvis + 0.47 * size * up
  segments, ends = [[head, neck], [neck, pelvis]], {}
  for side, sign in (("left", 1.0), ("right", -1.0)):
    shoulder = neck + sign * 0.07 * size * across
    hip = pelvis + sign * 0.08 * size * across
    upper = rng.uniform(np.pi / 9, 5 * np.pi / 6)
    lower = np.clip(upper + rng.uniform(-0.4 * np.pi, 0.4 * np.pi), np.pi / 36, 35 * np.pi / 36)
    elbow = shoulder + 0.17 * size * direction(sign * upper, tilt)
    hand = elbow + 0.16 * size * direction(sign * lower, tilt)
    thigh = rng.uniform(0.0, np.pi / 5)
    shin = np.clip(thigh + rng.uniform(-np.pi / 5, np.pi / 5), -np.pi / 18, np.pi / 3)
    knee = hip + 0.24 * size * direction(sign * thigh, tilt)
    foot = knee + 0.23 * size * direction(sign * shin, tilt)
    segments += [[neck, shoulder], [shoulder, elbow], [elbow, hand], [pelvis, hip], [hip, knee],
                 [knee, foot]]
    ends.update({f"{side}_hand": hand, f"{side}_hip": hip, f"{side}_foot": foot})
  mask = capsules_mask(np.asarray(segments), max(2.0, size / 20), height, width)
  mask |= capsules_mask(np.asarray([[head, head]]), 0.09 * size, height, width)
  keypoints = np.asarray([head] + [ends[name] for name in KEYPOINT_NAMES[1:]])
  return mask, keypoints


def keypoint_visibility(keypoints: np.ndarray, covering: np.ndarray) -> np.ndarray:
  """(K, 3) float32 COCO (x, y, v): 0 outside the image (x = y = 0), 1 under `covering`, else 2."""
  height, width = covering.shape
  x, y = keypoints[:, 0], keypoints[:, 1]
  inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
  rows = np.clip(y, 0, height - 1).astype(int)
  cols = np.clip(x, 0, width - 1).astype(int)
  v = np.where(inside, np.where(covering[rows, cols], 1, 2), 0)
  return np.where(inside[:, None], np.stack([x, y, v], -1), 0).astype(np.float32)


def make_figures(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, dict]:
  """An image (H, W, 3) uint8 of 1-3 overlapping stick figures and its ``objects`` feature."""
  masks, keypoints, pelvises = [], [], []
  low, high = np.array([0.1 * width, 0.35 * height]), np.array([0.9 * width, 0.75 * height])
  for _ in range(rng.integers(1, MAX_FIGURES + 1)):
    pelvis = near(rng, pelvises, 0.3 * FIGURE_HEIGHTS[1], low, high)
    mask, points = stick_figure(rng, pelvis, height, width)
    masks.append(mask)
    keypoints.append(points)
    pelvises.append(pelvis)
  kept, visible = visible_parts(masks)
  objects = objects_feature([0] * len(kept), visible)
  labelled = []
  for index in kept:
    covering = np.zeros_like(masks[0])
    for later in masks[index + 1:]:
      covering |= later
    labelled.append(keypoint_visibility(keypoints[index], covering))
  objects["keypoints"] = np.asarray(labelled, np.float32).reshape(-1, len(KEYPOINT_NAMES), 3)
  return paint(rng, masks), objects


def png_bytes(image: np.ndarray) -> bytes:
  """(H, W, 3) uint8 as PNG, fast: PIL at zlib level 1 (TFDS would use TensorFlow, 2x slower)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


class ShapesDetectionConfig(tfds.core.BuilderConfig):
  """What a config draws (``scene``: 'shapes' or 'figures') and its split sizes."""

  def __init__(self, *, scene: str, train_size: int, validation_size: int, **kwargs):
    super().__init__(**kwargs)
    self.scene = scene
    self.split_sizes = {"train": train_size, "validation": validation_size}


class ShapesDetection(tfds.core.GeneratorBasedBuilder):
  """Synthetic overlapping shapes / stick figures with masks and keypoints (see the module doc)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ShapesDetectionConfig(name="shapes", scene="shapes", train_size=2000, validation_size=300,
                            description="Squares, disks and triangles: 2000 train, 300 "
                                        "validation images."),
      ShapesDetectionConfig(name="figures", scene="figures", train_size=2000,
                            validation_size=300,
                            description="Stick figures with 7 keypoints: 2000 train, 300 "
                                        "validation images."),
      ShapesDetectionConfig(name="shapes_small", scene="shapes", train_size=48,
                            validation_size=16,
                            description="The first 48 train and 16 validation images of "
                                        "shapes, for tests."),
      ShapesDetectionConfig(name="figures_small", scene="figures", train_size=48,
                            validation_size=16,
                            description="The first 48 train and 16 validation images of "
                                        "figures, for tests."),
  ]
  SEED = 171107971  # the paper's arXiv number, 1711.07971

  def metadata(self) -> DetectionMetadata:
    """Class names and ids, and the keypoints of ``figures``."""
    if self.builder_config.scene == "shapes":
      return DetectionMetadata.create(SHAPE_NAMES, range(1, len(SHAPE_NAMES) + 1))
    return DetectionMetadata.create(("figure",), (1,), KEYPOINT_NAMES, SKELETON)

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = self.metadata()
    return self.dataset_info_from_configs(
        description=__doc__,
        features=detection_features(metadata.class_names, metadata.num_keypoints, "png"),
        metadata=tfds.core.MetadataDict({METADATA_KEY: metadata.as_dict()}))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    sizes = self.builder_config.split_sizes
    return {name: self._generate_examples(name, n) for name, n in sizes.items()}

  def _generate_examples(self, split: str, num_examples: int):
    scene = self.builder_config.scene
    make = make_shapes if scene == "shapes" else make_figures
    for index in range(num_examples):
      rng = np.random.default_rng([self.SEED, SCENES.index(scene), SPLITS.index(split), index])
      height, width = (int(side) for side in rng.choice(IMAGE_SIDES, size=2))
      image, objects = make(rng, height, width)
      yield index, {"image": png_bytes(image), "image_id": index, "objects": objects}
