"""Detection inputs and targets in numpy: torchvision's Mask R-CNN / Keypoint R-CNN transforms.

One stored example (:mod:`nonlocal_jax.data.detection_features`) becomes
``(inputs, targets)`` in the order torchvision applies its steps:

1. ``ConvertCocoPolysToMask`` (torchvision ``references/detection/coco_utils.py``):
   boxes clamped to the image, masks decoded at the stored size.
2. Training only, ``RandomHorizontalFlip(0.5)``
   (``references/detection/transforms.py``), on the stored image: boxes
   ``x -> W - x`` with x1 and x2 swapped, masks flipped, keypoints mirrored
   and permuted left <-> right (``_flip_coco_person_keypoints``, with the data
   set's permutation instead of COCO's hard-coded one), keypoints with
   v = 0 set to (0, 0, 0).
3. ``GeneralizedRCNNTransform`` (torchvision ``models/detection/transform.py``):
   RGB in [0, 1] normalised with ``mean`` / ``std``, then resized by
   ``scale = min(min_size / short side, max_size / long side)`` (Python
   floats) to ``floor(H * scale) x floor(W * scale)``; ``min_size`` drawn
   uniformly from ``train_min_sizes`` in training (``torch_choice``),
   ``test_min_size`` in evaluation. The image is resized bilinearly
   (``F.interpolate``, align_corners=False, no antialiasing) by our own numpy
   code with ATen's float32 taps and roundings (PIL's bilinear filter
   antialiases when shrinking, which torch does not), masks with torch's
   nearest rule, boxes and keypoints scaled per axis by new / old size
   (``resize_boxes``, ``resize_keypoints``, float32 ratios).
4. ``batch_images``: zero padding at the bottom / right, after the
   normalisation. torchvision pads each batch to its largest image rounded
   up to 32; we pad every image to the fixed ``pad_size`` so that batches
   have static shapes. The pixels are the same, the amount of padding is
   not: features near the bottom / right border and the anchor grid match
   torchvision's only when ``pad_size`` is the size torchvision would pad to.

Settings (``config.input``, :func:`default_config`): ``train_min_sizes``,
``max_size``, ``test_min_size``, ``pad_size`` (H, W), ``max_objects`` M
(objects past the first M stored are dropped), ``masks`` (emit masks),
``mask_patch_size`` P (0: full-resolution 'masks'; P > 0: 'mask_patches'),
``num_keypoints`` K (0: none), ``keypoint_flip`` (K,) the flip permutation,
``flip`` (random flips in training), ``mean`` / ``std``. The modality
functions only see ``(example, rng, settings)``, so the data set's flip
permutation (``DetectionMetadata.keypoint_flip``) travels in the settings:
``default_config(metadata)`` copies it (and K) from the data set's metadata.

Targets (numpy, M = ``max_objects``, padded with zeros / False):

* 'image_size' (2,) int32: (height, width) after resizing, before padding.
* 'original_size' (2,) int32: the stored (height, width).
* 'image_id' () int64.
* 'boxes' (M, 4) float32: (x1, y1, x2, y2) in resized pixels.
* 'labels' (M,) int32: stored label + 1 (0 is background and padding).
* 'valid' (M,) bool: a real object whose resized box has x2 > x1 and y2 > y1
  (the boxes ``ConvertCocoPolysToMask`` keeps; torchvision also drops crowd
  objects there, which stay here with ``is_crowd`` for the model to ignore).
* 'is_crowd' (M,) bool.
* 'masks' (M, pad_h, pad_w) uint8 0/1, only when ``masks`` and ``mask_patch_size`` is 0
  (at COCO's pad_size and M = 100: 180 MB per image).
* 'mask_patches' (M, P, P) float32, only when ``masks`` and P = ``mask_patch_size`` > 0,
  instead of 'masks': each object's resized mask area-averaged over a P x P
  grid of equal cells covering exactly its box, i.e. the fraction of each
  cell the mask covers (:func:`mask_patches`), 4 P^2 M bytes per image. The
  model turns them into its mask targets
  (:func:`nonlocal_jax.detection.losses.mask_targets_from_patches`), as the
  TPU Mask R-CNN reference crops masks to their boxes in its input pipeline
  (tensorflow/tpu ``models/official/mask_rcnn/preprocess_ops.py`` ``crop_gt_masks``).
  float32, not uint8: exact area fractions (a uint8 quantisation would add
  up to 1/510 per cell) at a size that no longer matters.
* 'keypoints' (M, K, 3) float32 (x, y, v) in resized pixels, only when K > 0.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np

from nonlocal_jax.data.detection_features import (DetectionMetadata, decode_masks,
                                                  objects_as_arrays)

# torchvision's GeneralizedRCNNTransform defaults (ImageNet statistics of RGB in [0, 1]).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def default_config(metadata: DetectionMetadata | None = None) -> ml_collections.ConfigDict:
  """torchvision Mask R-CNN settings; with `metadata`, also its keypoints (K and flip permutation).

  Keypoint R-CNN trains with ``train_min_sizes=(640, 672, 704, 736, 768, 800)``
  and no masks. ``pad_size`` (1344, 1344) is ``max_size`` 1333 rounded up to
  a multiple of 32 (torchvision's ``size_divisible``), square so that
  portrait and landscape images both fit.
  """
  num_keypoints = metadata.num_keypoints if metadata is not None else 0
  keypoint_flip = tuple(metadata.keypoint_flip) if metadata is not None else ()
  return ml_collections.ConfigDict(dict(
      train_min_sizes=(800,), max_size=1333, test_min_size=800, pad_size=(1344, 1344),
      max_objects=100, masks=True, mask_patch_size=0, num_keypoints=num_keypoints,
      keypoint_flip=keypoint_flip, flip=True, mean=MEAN, std=STD))


def resized_size(height: int, width: int, min_size: float, max_size: float) -> tuple[int, int]:
  """(h, w) of an H x W image after GeneralizedRCNNTransform's resize: floor(H * scale), ..."""
  scale = min(float(min_size) / min(height, width), float(max_size) / max(height, width))
  return int(math.floor(height * scale)), int(math.floor(width * scale))


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """torch's bilinear taps along one axis (align_corners=False): (out,) i0, i1 and weight of i1.

  As ATen's ``area_pixel_compute_source_index``: source
  ``max(in / out * (dst + 0.5) - 0.5, 0)``, ``i1 = min(i0 + 1, in - 1)``, with
  the float32 scale and one rounding to float32 after the multiply-add (the
  fused multiply-add ATen's compiled CPU kernel does; exact in float64).
  """
  scale = np.float64(np.float32(in_size) / np.float32(out_size))
  source = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
  source = np.maximum(source, np.float32(0))
  low = source.astype(np.int64)
  weight = np.clip(source - low.astype(np.float32), 0, 1).astype(np.float32)
  return low, np.minimum(low + 1, in_size - 1), weight


def _lerp(low: np.ndarray, high: np.ndarray, weight: np.ndarray) -> np.ndarray:
  """float32 ``low * (1 - weight) + high * weight`` rounded as ATen's CPU kernel does.

  The kernel's multiply-adds are fused: fma(low, 1 - w, high * w). The
  product of two float32 is exact in float64, so one rounding remains (two
  in the rare sums float64 cannot hold exactly).
  """
  return (low.astype(np.float64) * (np.float32(1) - weight) + high * weight).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(H, W, C) float32 -> (h, w, C) float32 as torch's bilinear ``F.interpolate`` on CPU.

  align_corners=False, no antialiasing; width first, then height, with
  ATen's taps and roundings (bit-equal to torch 2.14 on x86 CPUs in the tests).
  """
  rows0, rows1, row_weight = _linear_taps(image.shape[0], size[0])
  cols0, cols1, col_weight = _linear_taps(image.shape[1], size[1])
  along_width = _lerp(image[:, cols0], image[:, cols1], col_weight[None, :, None])
  return _lerp(along_width[rows0], along_width[rows1], row_weight[:, None, None])


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
  """torch's nearest source index (ATen ``nearest_idx``): min(floor(dst * (in / out)), in - 1).

  Computed in float32, as ATen does.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64),
                    in_size - 1)


def resize_nearest(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(N, H, W) -> (N, h, w) as ``F.interpolate``'s default mode 'nearest'."""
  rows = _nearest_index(masks.shape[1], size[0])
  cols = _nearest_index(masks.shape[2], size[1])
  return masks[:, rows[:, None], cols[None, :]]


def _cell_overlaps(start: float, end: float, source: np.ndarray,
                   cells: int) -> tuple[np.ndarray, slice]:
  """One axis of a box's cells, on the stored mask: (cells, n) weights and the n stored pixels.

  The box side [start, end) (resized pixels) is cut into `cells` equal cells;
  resized pixel r covers [r, r + 1) and copies stored pixel ``source[r]``
  (:func:`_nearest_index`). Entry (k, j) is the part of cell k that the
  resized pixels copying stored pixel s0 + j cover, so a row sums to 1 (less
  where the box leaves the image). All zeros for an empty box.
  """
  first = min(max(math.floor(start), 0), len(source))
  stop = min(max(math.ceil(end), first), len(source))
  if end <= start or stop == first:
    return np.zeros((cells, 0)), slice(0, 0)
  edges = start + (end - start) * np.arange(cells + 1) / cells
  pixels = np.arange(first, stop)
  overlap = np.maximum(
      np.minimum(edges[1:, None], pixels + 1) - np.maximum(edges[:-1, None], pixels), 0)
  # `source` is non-decreasing: sum each run of resized pixels copying one stored pixel.
  copied = source[first:stop]
  runs = np.flatnonzero(np.diff(copied, prepend=-1))
  weights = np.zeros((cells, copied[-1] + 1 - copied[0]))
  weights[:, copied[runs] - copied[0]] = np.add.reduceat(overlap, runs, axis=1)
  return weights * (cells / (end - start)), slice(copied[0], copied[-1] + 1)


def mask_patches(masks: np.ndarray, boxes: np.ndarray, size: tuple[int, int],
                 patch_size: int) -> np.ndarray:
  """(N, H, W) stored masks resized to `size` by :func:`resize_nearest`, on their boxes' cells.

  `boxes` (N, 4) float (x1, y1, x2, y2) in resized pixels. Returns (N, P, P)
  float32, P = `patch_size`: entry (k, l) is the fraction of cell (k, l) of
  the box's P x P grid of equal cells that the resized mask covers (pixel
  (r, c) covering [c, c + 1) x [r, r + 1)). Area averages, not point
  samples: the patch keeps the mask's area in every cell, which the mask
  targets integrate over (RoIAlign's samples average the mask over unit
  windows; see :func:`nonlocal_jax.detection.losses.mask_targets_from_patches`);
  point samples (e.g. bilinear at the cells' centres) alias once a cell holds
  several pixels. Computed as A_y . stored crop . A_x^T with the per-axis
  weights of :func:`_cell_overlaps`, which fold the nearest resize in: no
  resized mask is made.
  """
  rows = _nearest_index(masks.shape[1], size[0])
  cols = _nearest_index(masks.shape[2], size[1])
  patches = np.zeros((len(masks), patch_size, patch_size), np.float32)
  for mask, box, patch in zip(masks, np.asarray(boxes, np.float64), patches):
    across_rows, row_span = _cell_overlaps(box[1], box[3], rows, patch_size)
    across_cols, col_span = _cell_overlaps(box[0], box[2], cols, patch_size)
    patch[:] = across_rows @ mask[row_span, col_span].astype(np.float64) @ across_cols.T
  return patches


def _mask_patch_size(settings: ml_collections.ConfigDict) -> int:
  """``settings.mask_patch_size``, checked: an int >= 0."""
  value = settings.mask_patch_size
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
    raise ValueError(f"config.input.mask_patch_size={value!r} must be an int >= 0: 0 for "
                     "full-resolution 'masks' targets, P > 0 for (M, P, P) 'mask_patches' "
                     "on the objects' boxes")
  return int(value)


def normalize(image: np.ndarray, settings: ml_collections.ConfigDict) -> np.ndarray:
  """(H, W, 3) uint8 -> float32 ``(image / 255 - mean) / std`` (ToDtype, then normalize)."""
  pixels = image.astype(np.float32) / np.float32(255)
  return ((pixels - np.float32(settings.mean)) / np.float32(settings.std)).astype(np.float32)


def to_display(inputs: np.ndarray, settings: ml_collections.ConfigDict) -> np.ndarray:
  """Undoes :func:`normalize`: (1, pad_h, pad_w, 3) uint8, padding included (the mean colour)."""
  pixels = (inputs * np.array(settings.std) + np.array(settings.mean)) * 255
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)[None]


def _stored_objects(example: dict, settings: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The example's first ``max_objects`` objects as arrays (keypoints only when K > 0)."""
  objects = dict(example["objects"])
  num_keypoints = int(settings.num_keypoints)
  if num_keypoints:
    if "keypoints" not in objects:
      raise ValueError(f"config.input.num_keypoints={num_keypoints} but this data set's objects "
                       "have no keypoints; set it to 0")
    stored = np.asarray(objects["keypoints"], np.float32)
    if stored.size and stored.shape[1:] != (num_keypoints, 3):
      raise ValueError(f"config.input.num_keypoints={num_keypoints} but the objects have "
                       f"keypoints of shape {stored.shape[1:]}; set it to {stored.shape[1]}")
  else:
    objects.pop("keypoints", None)  # a keypoint data set read without keypoints
  arrays = objects_as_arrays(objects, num_keypoints)
  return {name: values[:settings.max_objects] for name, values in arrays.items()}


def _check_keypoint_flip(settings: ml_collections.ConfigDict) -> np.ndarray:
  flip = np.asarray(settings.keypoint_flip, np.int64)
  if sorted(flip.tolist()) != list(range(settings.num_keypoints)):
    raise ValueError(f"config.input.keypoint_flip={tuple(settings.keypoint_flip)} is not a "
                     f"permutation of the {settings.num_keypoints} keypoints; set it from the "
                     "data set (detection.default_config(DetectionMetadata), or "
                     "DetectionMetadata.keypoint_flip)")
  return flip


def _flip(image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None,
          keypoints: np.ndarray | None, keypoint_flip: np.ndarray | None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
  """torchvision's RandomHorizontalFlip of the stored image and its objects.

  image (H, W, 3), boxes (N, 4), masks (N, H, W) or None, keypoints
  (N, K, 3) or None; `keypoint_flip` (K,): keypoint k comes from
  ``keypoint_flip[k]`` (its mirror image).
  """
  width = image.shape[1]
  boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
  if masks is not None:
    masks = masks[:, :, ::-1]
  if keypoints is not None:  # _flip_coco_person_keypoints
    keypoints = keypoints[:, keypoint_flip].copy()
    keypoints[..., 0] = width - keypoints[..., 0]
    keypoints[keypoints[..., 2] == 0] = 0
  return image[:, ::-1], boxes.astype(np.float32), masks, keypoints


def transform(example: dict, settings: ml_collections.ConfigDict, min_size: float,
              flip: bool, masks: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """An example at `min_size`, flipped or not: ((pad_h, pad_w, 3) float32, targets).

  See the module docstring for the steps and the targets; ``masks=False``
  leaves out the masks (and mask patches) even when ``settings.masks``
  (evaluation scores against the stored ground truth, and a COCO image's
  masks take ~180 MB padded).
  """
  patch_size = _mask_patch_size(settings)
  image = np.asarray(example["image"])
  height, width = image.shape[:2]
  objects = _stored_objects(example, settings)
  count = len(objects["label"])
  # ConvertCocoPolysToMask: boxes clamped to the image.
  boxes = np.clip(objects["bbox"], 0, np.float32([width, height, width, height]))
  masks = decode_masks(objects["mask"], height, width) if settings.masks and masks else None
  keypoints = objects.get("keypoints")
  if flip:
    flip_order = _check_keypoint_flip(settings) if keypoints is not None else None
    image, boxes, masks, keypoints = _flip(image, boxes, masks, keypoints, flip_order)

  size = resized_size(height, width, min_size, settings.max_size)
  pad_h, pad_w = settings.pad_size
  if size[0] > pad_h or size[1] > pad_w:
    raise ValueError(f"an image of {height} x {width} resized to {size[0]} x {size[1]} does not "
                     f"fit config.input.pad_size={tuple(settings.pad_size)}; it must hold "
                     f"max_size={settings.max_size} on both sides (rounded up to 32)")
  inputs = np.zeros((pad_h, pad_w, 3), np.float32)
  inputs[:size[0], :size[1]] = resize_bilinear(normalize(image, settings), size)
  # resize_boxes / resize_keypoints: float32 new / old size per axis.
  ratio_h = np.float32(size[0]) / np.float32(height)
  ratio_w = np.float32(size[1]) / np.float32(width)
  boxes = (boxes * np.float32([ratio_w, ratio_h, ratio_w, ratio_h])).astype(np.float32)

  num = settings.max_objects
  targets = {
      "image_size": np.asarray(size, np.int32),
      "original_size": np.asarray((height, width), np.int32),
      "image_id": np.int64(example["image_id"]),
      "boxes": np.zeros((num, 4), np.float32),
      "labels": np.zeros(num, np.int32),
      "valid": np.zeros(num, np.bool_),
      "is_crowd": np.zeros(num, np.bool_),
  }
  targets["boxes"][:count] = boxes
  targets["labels"][:count] = objects["label"] + 1
  targets["valid"][:count] = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  targets["is_crowd"][:count] = objects["is_crowd"]
  if masks is not None and patch_size:
    targets["mask_patches"] = np.zeros((num, patch_size, patch_size), np.float32)
    targets["mask_patches"][:count] = mask_patches(masks, boxes, size, patch_size)
  elif masks is not None:
    targets["masks"] = np.zeros((num, pad_h, pad_w), np.uint8)
    targets["masks"][:count, :size[0], :size[1]] = resize_nearest(masks, size)
  if settings.num_keypoints:
    targets["keypoints"] = np.zeros((num, settings.num_keypoints, 3), np.float32)
    targets["keypoints"][:count] = keypoints * np.float32([ratio_w, ratio_h, 1])
  return inputs, targets


def train_example(example: dict, rng: np.random.Generator,
                  settings: ml_collections.ConfigDict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Augmented: min_size uniform over ``train_min_sizes``, then a flip with probability 0.5."""
  sizes = tuple(settings.train_min_sizes)
  min_size = sizes[int(rng.integers(len(sizes)))]
  flip = bool(settings.flip) and rng.random() < 0.5
  return transform(example, settings, min_size, flip)


def eval_example(example: dict,
                 settings: ml_collections.ConfigDict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Deterministic: at ``test_min_size``, not flipped."""
  return transform(example, settings, settings.test_min_size, flip=False, masks=False)


def input_shape(settings: ml_collections.ConfigDict, stored_shape: tuple, train: bool) -> tuple:
  """(pad_h, pad_w, 3): every image is padded to ``pad_size``."""
  del stored_shape, train  # images of any size, the same padding in training and evaluation
  pad_h, pad_w = settings.pad_size
  return (pad_h, pad_w, 3)


def num_eval_views(settings: ml_collections.ConfigDict) -> int:
  del settings
  return 1


def target_spec(settings: ml_collections.ConfigDict,
                train: bool) -> dict[str, tuple[tuple[int, ...], type]]:
  """{name: (shape, dtype)} of one example's targets (the batch adds a leading axis).

  Masks (or mask patches) only in training (see :func:`transform`).
  """
  patch_size = _mask_patch_size(settings)
  num, (pad_h, pad_w) = settings.max_objects, settings.pad_size
  spec = {"image_size": ((2,), np.int32), "original_size": ((2,), np.int32),
          "image_id": ((), np.int64), "boxes": ((num, 4), np.float32),
          "labels": ((num,), np.int32), "valid": ((num,), np.bool_),
          "is_crowd": ((num,), np.bool_)}
  if settings.masks and train and patch_size:
    spec["mask_patches"] = ((num, patch_size, patch_size), np.float32)
  elif settings.masks and train:
    spec["masks"] = ((num, pad_h, pad_w), np.uint8)
  if settings.num_keypoints:
    spec["keypoints"] = ((num, settings.num_keypoints, 3), np.float32)
  return spec
