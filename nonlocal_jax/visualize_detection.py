"""A detector's detections and what its non-local blocks attend to (Wang et al., section 6).

    python -m nonlocal_jax.visualize --config configs/coco.py:shapes --workdir DIR --output det.png
    python -m nonlocal_jax.visualize --config configs/coco.py:figures --weights CKPT \
        --input photo.jpg --output det.png

The figure's first panel is the image (``--input``: an image file, or
``dataset:N`` for example N of the config's evaluation split) with the
detections scoring at least ``--score_threshold``: boxes, 'class score'
labels (the data set's class names), instance masks as translucent overlays
and keypoints joined by the data set's skeleton. Then one panel per
non-local block:

* trunk blocks (``nonlocal_blocks``; the paper's one before the last res4
  block) attend over the whole feature map of the padded input. For a query
  pixel (``--query y,x`` in image pixels, repeatable; default the centre of
  the top-scoring detection) the panel is its weights over the key cells of
  the block's subsampled map, shown on the image pixels each cell covers,
  with the query (cyan x);
* RoI head blocks (``keypoint_nonlocal_after``; the paper's 4 in the keypoint
  head) attend inside one RoI's 14x14 RoIAlign grid. For the top-scoring
  detection, the panel is the weights of the grid's centre cell (cyan x) over
  the RoI's key cells, drawn over its box.

Everything is drawn in the pixels of the image as stored / read: the model
sees it as the detection modality's evaluation does (resized to
``test_min_size`` / ``max_size``, normalised, padded to ``pad_size``:
:mod:`nonlocal_jax.preprocessing.detection`), and its outputs are mapped back
as torchvision's ``GeneralizedRCNNTransform.postprocess`` does
(:mod:`nonlocal_jax.detection.postprocess`: masks pasted and thresholded at
0.5, keypoints decoded from the heatmaps). The entry of
``nonlocal_jax.visualize.FIGURES`` for ``config.modality='detection'``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from nonlocal_jax import input_pipeline  # noqa: E402
from nonlocal_jax.data.coco_detection import COCO_KEYPOINT_NAMES  # noqa: E402
from nonlocal_jax.data.detection_features import DetectionMetadata  # noqa: E402
from nonlocal_jax.detection import postprocess  # noqa: E402
from nonlocal_jax.preprocessing import detection  # noqa: E402

if TYPE_CHECKING:
  from nonlocal_jax.visualize import Options

# COCO's person skeleton as published in person_keypoints_{train,val}2017.json (the person
# category's 'skeleton'): 1-based numbers of COCO_KEYPOINT_NAMES. Our stick figures' skeleton
# is nonlocal_jax.data.shapes_detection.SKELETON, stored in their data set's metadata.
COCO_PERSON_SKELETON = ((16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13),
                        (6, 7), (6, 8), (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4),
                        (3, 5), (4, 6), (5, 7))
# Mask probabilities above this are the object (torchvision references/detection/coco_eval.py).
MASK_THRESHOLD = 0.5
MASK_ALPHA = 0.45
# Detection i is drawn in COLOURS[i % len(COLOURS)] (matplotlib's tab10, RGB in [0, 1]).
COLOURS = tuple(tuple(float(c) for c in colour) for colour in plt.get_cmap("tab10").colors)
HEAT_MAP = "inferno"
QUERY_STYLE = dict(marker="x", color="cyan", markersize=9, markeredgewidth=2, linestyle="none")


@dataclasses.dataclass(frozen=True)
class DetectorImage:
  """The input as the figure draws it.

  Attributes:
    image: (H, W, 3) uint8, the image as stored or read.
    input_size: (h, w) of the image resized for the model, before padding.
    padded_size: (pad_h, pad_w) of the model input.
    metadata: the data set's class and keypoint names and skeleton.
  """

  image: np.ndarray
  input_size: tuple[int, int]
  padded_size: tuple[int, int]
  metadata: DetectionMetadata


@dataclasses.dataclass(frozen=True)
class Detections:
  """Detections of one image in its pixels, by decreasing score (N of them).

  Attributes:
    boxes: (N, 4) float32 (x1, y1, x2, y2).
    scores: (N,) float32.
    labels: (N,) int, 1..K-1 (0 is the background).
    masks: (N, H, W) bool, or None without a mask head.
    keypoints: (N, K, 3) float32 (x, y, 1), or None without a keypoint head.
  """

  boxes: np.ndarray
  scores: np.ndarray
  labels: np.ndarray
  masks: np.ndarray | None = None
  keypoints: np.ndarray | None = None


def coco_person_skeleton() -> tuple[tuple[int, int], ...]:
  """:data:`COCO_PERSON_SKELETON` 0-indexed, as :class:`DetectionMetadata` holds skeletons."""
  return tuple((a - 1, b - 1) for a, b in COCO_PERSON_SKELETON)


def detection_metadata(config: ml_collections.ConfigDict) -> DetectionMetadata:
  """The class and keypoint names of ``config.dataset``, as the detection task reads them.

  Without the data set's metadata (COCO weights converted from torchvision and
  a photo, without the COCO annotations at hand) a stand-in: classes named by
  label number, and for 17 keypoints COCO's person keypoints and skeleton
  (torchvision's Keypoint R-CNN), other keypoints numbered without a skeleton.
  """
  try:
    return DetectionMetadata.from_info(input_pipeline.create_builder(config).info)
  except (ValueError, OSError) as e:
    logging.warning("no class names for %s (%s): classes are drawn by label number",
                    config.dataset, e)
  labels = range(1, config.num_classes)
  num_keypoints = int(config.input.num_keypoints)
  if num_keypoints == len(COCO_KEYPOINT_NAMES):
    keypoints, skeleton = COCO_KEYPOINT_NAMES, coco_person_skeleton()
  else:
    keypoints, skeleton = [f"keypoint {k}" for k in range(num_keypoints)], ()
  return DetectionMetadata.create([f"class {i}" for i in labels], labels, keypoints, skeleton)


def _without_objects(image: np.ndarray, num_keypoints: int) -> dict:
  """An image file as a stored example with no objects (see detection_features)."""
  objects = {name: [] for name in ("bbox", "label", "category_id", "is_crowd", "area", "mask")}
  if num_keypoints:
    objects["keypoints"] = np.zeros((0, num_keypoints, 3), np.float32)
  return {"image": image, "image_id": 0, "objects": objects}


def from_example(example: dict, config: ml_collections.ConfigDict
                 ) -> tuple[tuple[np.ndarray, np.ndarray], DetectorImage, dict[str, int]]:
  """A stored example as evaluation feeds it to ``MaskRCNN.detect``.

  Returns:
    ((images (1, pad_h, pad_w, 3) float32, image_sizes (1, 2) int32), the
    image to draw, {'y': H, 'x': W}: the pixels queries are given in).
  """
  inputs, targets = detection.eval_example(example, config.input)
  image = np.asarray(example["image"])
  display = DetectorImage(image=image, input_size=tuple(int(s) for s in targets["image_size"]),
                          padded_size=inputs.shape[:2], metadata=detection_metadata(config))
  return ((inputs[None], targets["image_size"][None]), display,
          {"y": image.shape[0], "x": image.shape[1]})


def from_file(source: str, config: ml_collections.ConfigDict
              ) -> tuple[tuple[np.ndarray, np.ndarray], DetectorImage, dict[str, int]]:
  """An image file (any format PIL reads) as :func:`from_example` gives a stored one."""
  try:
    image = np.asarray(Image.open(source).convert("RGB"))
  except UnidentifiedImageError as e:
    raise ValueError(f"--input {source!r}: expected an image file (jpg, png, ... as PIL reads "
                     "them) or dataset:N") from e
  return from_example(_without_objects(image, int(config.input.num_keypoints)), config)


def image_detections(outputs: dict[str, np.ndarray], input_size: tuple[int, int],
                     image_size: tuple[int, int], score_threshold: float) -> Detections:
  """The valid detections of ``MaskRCNN.detect``'s first image scoring >= `score_threshold`.

  Mapped to the image's pixels as DetectionTask does for COCO results
  (torchvision's postprocess): boxes resized, masks pasted with the resized
  boxes and thresholded, keypoints decoded in the model input's pixels, then
  resized.

  Args:
    outputs: ``detect``'s outputs as numpy, batch first.
    input_size: (h, w) of the resized image the model saw (before padding).
    image_size: (H, W) of the image drawn.
  """
  keep = outputs["valid"][0] & (outputs["scores"][0] >= score_threshold)
  image_boxes, masks, keypoints = postprocess.to_image_pixels(
      outputs["boxes"][0][keep], outputs["masks"][0][keep] if "masks" in outputs else None,
      outputs["keypoint_heatmaps"][0][keep] if "keypoint_heatmaps" in outputs else None,
      input_size, image_size)
  if masks is not None:
    masks = masks > MASK_THRESHOLD
  return Detections(boxes=image_boxes, scores=outputs["scores"][0][keep],
                    labels=outputs["labels"][0][keep], masks=masks, keypoints=keypoints)


def _show(ax: Axes, image: np.ndarray) -> None:
  """The image with data coordinates = continuous pixel coordinates (pixel (i, j) covers
  [j, j + 1) x [i, i + 1), as boxes and keypoints are given)."""
  height, width = image.shape[:2]
  ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])


def draw_detections(ax: Axes, image: np.ndarray, detections: Detections,
                    metadata: DetectionMetadata) -> None:
  """`image` (H, W, 3) with `detections`: masks, boxes, 'class score' labels, keypoints.

  Detection i is drawn in ``COLOURS[i % len(COLOURS)]``; masks are overlaid
  with opacity :data:`MASK_ALPHA` (a higher-scoring mask on top), keypoints
  are joined by ``metadata.skeleton``.
  """
  _show(ax, image)
  colours = [COLOURS[i % len(COLOURS)] for i in range(len(detections.scores))]
  if detections.masks is not None and len(detections.masks):
    overlay = np.zeros((*image.shape[:2], 4), np.float32)
    for mask, colour in reversed(list(zip(detections.masks, colours))):
      overlay[mask] = (*colour, MASK_ALPHA)
    ax.imshow(overlay, extent=(0, image.shape[1], image.shape[0], 0), interpolation="nearest")
  for i, ((x1, y1, x2, y2), score, label) in enumerate(zip(detections.boxes, detections.scores,
                                                           detections.labels)):
    ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colours[i],
                               linewidth=1.5))
    ax.text(x1, y1, f"{metadata.class_names[label - 1]} {score:.2f}", color="white", fontsize=6,
            va="bottom", clip_on=True,
            bbox=dict(facecolor=colours[i], alpha=0.8, pad=1, edgecolor="none"))
  if detections.keypoints is not None:
    for points, colour in zip(detections.keypoints, colours):
      for a, b in metadata.skeleton:
        ax.plot(points[[a, b], 0], points[[a, b], 1], color=colour, linewidth=1.2)
      ax.scatter(points[:, 0], points[:, 1], s=8, color=colour, edgecolors="white",
                 linewidths=0.4, zorder=3)


def _cells(positions: np.ndarray, extent: int, grid: int) -> np.ndarray:
  """Cell of each position along one axis of `extent` pixels cut into `grid` equal cells."""
  return np.minimum((np.asarray(positions, np.float64) * grid / extent).astype(int), grid - 1)


def draw_image_attention(ax: Axes, display: DetectorImage, weights: np.ndarray,
                         query: tuple[int, int]) -> None:
  """A trunk block's attention of the query pixel (y, x) over the image.

  Args:
    weights: (qh, qw, kh, kw) one image's weights: query cells of the padded
      input's feature map by the key cells of the block's subsampled map.
    query: (y, x) in the image's pixels.
  """
  image = display.image
  (qh, qw), (kh, kw) = weights.shape[:2], weights.shape[2:]
  (height, width), (pad_h, pad_w) = image.shape[:2], display.padded_size
  scale_y, scale_x = (s / n for s, n in zip(display.input_size, (height, width)))
  row = weights[_cells((query[0] + 0.5) * scale_y, pad_h, qh),
                _cells((query[1] + 0.5) * scale_x, pad_w, qw)]
  # The key cell holding each image pixel's centre in the model input.
  rows = _cells((np.arange(height) + 0.5) * scale_y, pad_h, kh)
  cols = _cells((np.arange(width) + 0.5) * scale_x, pad_w, kw)
  _show(ax, image)
  ax.imshow(row[rows[:, None], cols[None, :]], extent=(0, width, height, 0), cmap=HEAT_MAP,
            vmin=0, alpha=0.6, interpolation="nearest")
  ax.plot(query[1] + 0.5, query[0] + 0.5, **QUERY_STYLE)


def draw_roi_attention(ax: Axes, image: np.ndarray, weights: np.ndarray,
                       box: np.ndarray) -> None:
  """An RoI head block's attention of the RoI grid's centre cell, over the RoI's `box`.

  Args:
    weights: (gh, gw, kh, kw) one RoI's weights: its RoIAlign grid (14x14) by
      the block's subsampled key grid.
    box: (x1, y1, x2, y2) the RoI in the image's pixels (the grid spans it).
  """
  (gh, gw), (x1, y1, x2, y2) = weights.shape[:2], box
  height, width = image.shape[:2]
  _show(ax, image)
  ax.imshow(weights[gh // 2, gw // 2], extent=(x1, x2, y2, y1), cmap=HEAT_MAP, vmin=0,
            alpha=0.7, interpolation="nearest")
  ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white",
                             linewidth=1))
  ax.plot(x1 + (gw // 2 + 0.5) / gw * (x2 - x1), y1 + (gh // 2 + 0.5) / gh * (y2 - y1),
          **QUERY_STYLE)
  margin = 0.5 * max(x2 - x1, y2 - y1)  # zoom on the box, some context around it
  ax.set_xlim(max(x1 - margin, 0), min(x2 + margin, width))
  ax.set_ylim(min(y2 + margin, height), max(y1 - margin, 0))


def draw_figure(display: DetectorImage, outputs: dict[str, np.ndarray],
                maps: dict[str, np.ndarray], options: Options) -> plt.Figure:
  """The detections, then the attention of every block in `maps` (see the module docstring).

  Args:
    display: the image (:func:`from_example`).
    outputs: ``MaskRCNN.detect``'s outputs as numpy, one image.
    maps: {block path: weights}, (1, qh, qw, kh, kw) for trunk blocks
      (under ``backbone``), (D, 14, 14, kh, kw) for RoI head blocks (RoI i is
      detection slot i).
    options: queries ((y, x) in image pixels) and score_threshold.
  """
  image = display.image
  size = image.shape[:2]
  shown = image_detections(outputs, display.input_size, size, options.score_threshold)
  # The top-scoring detection (0 or 1 box): slot 0 when valid (valid slots come first, by
  # score). Its RoI is the first of the RoI head blocks' maps.
  first = outputs["boxes"][0][:1]
  top = postprocess.resize_boxes(first[outputs["valid"][0][:1]], display.input_size, size)
  trunk = [name for name in maps if name.split(".")[0] == "backbone"]
  heads = [name for name in maps if name not in trunk]
  if heads and not len(top):
    logging.info("no detection: the RoI head blocks %s have no RoI to draw", heads)
    heads = []
  if options.queries:
    queries = list(options.queries)
  elif len(top):
    queries = [(int((top[0, 1] + top[0, 3]) / 2), int((top[0, 0] + top[0, 2]) / 2))]
  else:
    queries = [(size[0] // 2, size[1] // 2)]
  panels = 1 + len(trunk) * len(queries) + len(heads)
  columns = min(panels, 3)
  rows = -(-panels // columns)
  panel_width = 3.6
  fig, grid = plt.subplots(rows, columns, squeeze=False, layout="constrained", figsize=(
      panel_width * columns, (panel_width * size[0] / size[1] + 0.5) * rows + 0.3))
  axes = iter(grid.ravel())
  ax = next(axes)
  draw_detections(ax, image, shown, display.metadata)
  count = len(shown.scores)
  ax.set_title(f"{count} detection{'s' * (count != 1)} with score >= {options.score_threshold}",
               fontsize=8)
  for name in trunk:
    weights = maps[name][0]
    for query in queries:
      ax = next(axes)
      draw_image_attention(ax, display, weights, query)
      ax.set_title(f"{name}\nquery (y, x) = {tuple(query)}, keys "
                   f"{weights.shape[2]}x{weights.shape[3]}", fontsize=7)
  for name in heads:
    weights = maps[name][0]
    ax = next(axes)
    draw_roi_attention(ax, image, weights, top[0])
    ax.set_title(f"{name}\ntop detection, RoI centre cell of {weights.shape[0]}x"
                 f"{weights.shape[1]}", fontsize=7)
  for ax in axes:  # the grid's unused panels
    ax.set_axis_off()
  fig.suptitle("attention weights of the query (cyan x), from 0 (dark) to its largest (bright)"
               if maps else "no non-local blocks: the detections alone", fontsize=9)
  return fig
