"""Host-side post-processing of Mask / Keypoint R-CNN detections, as torchvision does it.

The jitted model returns, per image, fixed-size padded outputs in the
coordinates of the resized (and batch-padded) input. These numpy functions
turn one image's valid detections into original-image results, following
torchvision 0.29 ``models/detection`` operation for operation, in float32:

* :func:`resize_boxes`, :func:`resize_keypoints`: ``transform.py``
  ``resize_boxes`` / ``resize_keypoints`` (one ratio per axis).
* :func:`paste_masks`: ``roi_heads.py`` ``paste_masks_in_image`` (1-pixel
  padded 28x28 mask, box expanded by (M + 2) / M, resized bilinearly to the
  integer box and pasted into the image).
* :func:`heatmaps_to_keypoints`: ``roi_heads.py`` ``heatmaps_to_keypoints``
  (bicubic resize of each RoI's heatmaps to its box, argmax).

torchvision's ``GeneralizedRCNNTransform.postprocess`` order, per image::

  boxes_orig = resize_boxes(boxes, resized_size, original_size)
  masks = paste_masks(mask_probs, boxes_orig, original_size)         # soft, (D, H, W)
  keypoints, kp_scores = heatmaps_to_keypoints(heatmaps, boxes)      # resized coordinates
  keypoints = resize_keypoints(keypoints, resized_size, original_size)

`resized_size` is the image size after resizing and before batch padding
(torchvision's ``image_sizes``).

The resizes reproduce PyTorch's CPU kernels of ``F.interpolate``
(``aten/src/ATen/native/cpu/UpSampleKernel.cpp``, ``UpSample.h``): source
indices, weights and the order of the float32 operations. PyTorch's x86-64
wheels run these kernels compiled for AVX2 / AVX-512 with fused multiply-adds
(its CPU capability, ``torch.backends.cpu.get_cpu_capability()``), and the
compiler fuses some of the kernels' multiply-adds: the source coordinate
scale * (i + 0.5) - 0.5, the weighted sums (v0 w0 + v1 w1 + ... as
fma(v0, w0, v1 w1), then fma(vj, wj, sum)) and the first one or two
multiply-adds of the cubic coefficients. Those are fused here too (measured
against PyTorch 2.14 with both capabilities), so results equal torchvision's
there bit for bit; under ``ATEN_CPU_CAPABILITY=default`` PyTorch rounds
each operation separately and differs in the last bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Cubic convolution coefficient of PyTorch's bicubic interpolation (UpSample.h
# get_cubic_upsample_coefficients; OpenCV's value).
CUBIC_A = np.float32(-0.75)
# UpSampleKernel.cpp _use_vectorized_kernel_cond_2d: float bilinear resizes whose
# output height + width is at most this use cpu_upsample_linear_channels_last,
# which sums the four corners with combined weights instead of row by row.
_SMALL_BILINEAR_OUTPUT = 128
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)


def _check_size(name: str, size: Sequence[int]) -> tuple[int, int]:
  if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
    raise ValueError(f"{name} must be (height, width), two positive integers, got {size!r}")
  return int(size[0]), int(size[1])


def _check_boxes(name: str, boxes: np.ndarray) -> np.ndarray:
  boxes = np.asarray(boxes, np.float32)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"{name} must be (D, 4) boxes (x1, y1, x2, y2), got shape {boxes.shape}")
  return boxes


def _ratios(from_size: Sequence[int], to_size: Sequence[int]) -> tuple[np.float32, np.float32]:
  """(height, width) ratios to / from, divided in float32 as transform.py does with tensors."""
  from_size = _check_size("from_size", from_size)
  to_size = _check_size("to_size", to_size)
  ratio_h, ratio_w = (np.float32(t) / np.float32(f) for t, f in zip(to_size, from_size))
  return ratio_h, ratio_w


def resize_boxes(boxes: np.ndarray, from_size: Sequence[int], to_size: Sequence[int]
                 ) -> np.ndarray:
  """(D, 4) boxes (x1, y1, x2, y2) in an image of `from_size` -> (D, 4) float32 in `to_size`.

  torchvision transform.py ``resize_boxes``: x times to_w / from_w, y times
  to_h / from_h (sizes are (height, width)).
  """
  boxes = _check_boxes("boxes", boxes)
  ratio_h, ratio_w = _ratios(from_size, to_size)
  return boxes * np.asarray([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)


def resize_keypoints(keypoints: np.ndarray, from_size: Sequence[int], to_size: Sequence[int]
                     ) -> np.ndarray:
  """(D, K, 3) keypoints (x, y, v) in an image of `from_size` -> (D, K, 3) float32 in `to_size`.

  torchvision transform.py ``resize_keypoints``: x and y scaled as in
  :func:`resize_boxes`, v unchanged.
  """
  keypoints = np.array(keypoints, np.float32)
  if keypoints.ndim != 3 or keypoints.shape[2] != 3:
    raise ValueError(f"keypoints must be (D, K, 3) (x, y, v), got shape {keypoints.shape}")
  ratio_h, ratio_w = _ratios(from_size, to_size)
  keypoints[..., 0] *= ratio_w
  keypoints[..., 1] *= ratio_h
  return keypoints


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
  """float32 fused multiply-add a * b + c, rounded once.

  The product of two float32 values is exact in float64. TwoSum gives the
  float64 sum s and its exact error e; where e != 0, s is replaced by the one
  of it and its neighbour towards e whose last bit is odd (round to odd),
  which rounds to float32 as the exact sum does (no double rounding).
  """
  product = np.asarray(a, np.float64) * np.asarray(b, np.float64)
  c = np.asarray(c, np.float64)
  total = product + c
  virtual = total - c
  error = (product - virtual) + (c - (total - virtual))
  even = (total.view(np.int64) & 1) == 0
  total = np.where((error != 0) & even, np.nextafter(total, np.copysign(np.inf, error)), total)
  return total.astype(np.float32)


def _source_index(in_size: int, out_size: int) -> np.ndarray:
  """(out_size,) float32 source coordinate of each output index, align_corners=False.

  UpSample.h ``area_pixel_compute_scale`` (in / out, in float32, as sizes
  are given rather than scale factors) and ``area_pixel_compute_source_index``:
  scale * (i + 0.5) - 0.5, a fused multiply-add in the x86-64 kernels.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  return _fma(scale, np.arange(out_size, dtype=np.float32) + _HALF, -_HALF)


def _linear_taps(in_size: int, out_size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Bilinear taps (index0, index1, lambda0, lambda1), each (out_size,).

  UpSample.h ``compute_source_index_and_lambda``: a copy when the sizes
  agree; otherwise the source coordinate clamped at 0 (linear modes), index0
  = floor (at most in - 1), lambda1 = its fraction clamped to [0, 1],
  index1 = index0 + 1 except at the last row.
  """
  if in_size == out_size:
    index = np.arange(out_size)
    return index, index, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
  real = np.maximum(_source_index(in_size, out_size), np.float32(0))
  index0 = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
  lambda1 = np.clip(real - index0.astype(np.float32), np.float32(0), _ONE)
  index1 = index0 + (index0 < in_size - 1)
  return index0, index1, _ONE - lambda1, lambda1


def _cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Bicubic taps: indices (out_size, 4) and float32 weights (out_size, 4).

  UpSampleKernel.cpp ``HelperInterpCubic::compute_indices_weights``: the
  source coordinate is not clamped, index = floor (at most in - 1), t = its
  fraction clamped to [0, 1], taps index - 1 .. index + 2 clamped to the
  input (border replication), weights UpSample.h
  ``get_cubic_upsample_coefficients`` with A = -0.75:
  ``cubic_convolution2(t + 1), cubic_convolution1(t), cubic_convolution1(1 - t),
  cubic_convolution2(2 - t)``.
  """
  real = _source_index(in_size, out_size)
  index = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
  t = np.clip(real - index.astype(np.float32), np.float32(0), _ONE)
  a = CUBIC_A

  def near(x):  # cubic_convolution1, |x| <= 1: ((A + 2) x - (A + 3)) x x + 1
    return _fma(a + np.float32(2), x, -(a + np.float32(3))) * x * x + _ONE

  def far(x):  # cubic_convolution2, 1 <= |x| <= 2: ((A x - 5 A) x + 8 A) x - 4 A
    inner = _fma(_fma(a, x, -(np.float32(5) * a)), x, np.float32(8) * a)
    return inner * x - np.float32(4) * a

  weights = np.stack([far(t + _ONE), near(t), near(_ONE - t), far((_ONE - t) + _ONE)], axis=1)
  taps = np.clip(index[:, None] + np.arange(-1, 3), 0, in_size - 1)
  return taps, weights


def _dot(values: Sequence[np.ndarray], weights: Sequence[np.ndarray]) -> np.ndarray:
  """v0 w0 + v1 w1 + ... as the x86-64 kernels round it: fma(v0, w0, v1 w1), then fma(vj, wj, .)."""
  total = _fma(values[0], weights[0], values[1] * weights[1])
  for value, weight in zip(values[2:], weights[2:]):
    total = _fma(value, weight, total)
  return total


def resize_bilinear(image: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
  """(..., h, w) float32 -> (..., out_height, out_width), as F.interpolate bilinear.

  ``align_corners=False``, sizes given (not scale factors).

  PyTorch's CPU float kernel (UpSampleKernel.cpp
  ``upsample_bilinear2d_kernel_impl_float``) for inputs of at most 3
  channels: outputs with height + width <= 128 go through
  ``cpu_upsample_linear_channels_last``, v00 w00 + v01 w01 + v10 w10 + v11 w11
  with the corner weights w_ij = lambda_h_i lambda_w_j; larger ones through
  the generic kernel (``Interpolate`` with 2 taps), (v00 lw0 + v01 lw1) lh0 +
  (v10 lw0 + v11 lw1) lh1.
  """
  image = np.asarray(image, np.float32)
  y0, y1, h0, h1 = _linear_taps(image.shape[-2], out_height)
  x0, x1, w0, w1 = _linear_taps(image.shape[-1], out_width)
  h0, h1 = h0[:, None], h1[:, None]
  if out_height + out_width <= _SMALL_BILINEAR_OUTPUT:
    top, bottom = image[..., y0, :], image[..., y1, :]
    return _dot([top[..., x0], top[..., x1], bottom[..., x0], bottom[..., x1]],
                [h0 * w0, h0 * w1, h1 * w0, h1 * w1])
  rows = _dot([image[..., x0], image[..., x1]], [w0, w1])
  return _dot([rows[..., y0, :], rows[..., y1, :]], [h0, h1])


def resize_bicubic(image: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
  """(..., h, w) float32 -> (..., out_height, out_width), as F.interpolate bicubic.

  ``align_corners=False``, sizes given (not scale factors).

  PyTorch's CPU float kernel (``upsample_generic_Nd_kernel_impl`` with
  ``HelperInterpCubic``): for each output pixel the four taps of each of four
  rows are summed along the width first, then the rows along the height;
  computing all rows' width sums first gives the same float32 values.
  """
  image = np.asarray(image, np.float32)
  y_taps, y_weights = _cubic_taps(image.shape[-2], out_height)
  x_taps, x_weights = _cubic_taps(image.shape[-1], out_width)
  rows = _dot([image[..., x_taps[:, j]] for j in range(4)], [x_weights[:, j] for j in range(4)])
  return _dot([rows[..., y_taps[:, j], :] for j in range(4)],
              [y_weights[:, j, None] for j in range(4)])


def _expanded_integer_boxes(boxes: np.ndarray, mask_size: int, padding: int) -> np.ndarray:
  """(D, 4) int64: roi_heads.py ``expand_boxes`` by (M + 2 padding) / M, then ``.to(int64)``.

  The expansion is float32 (the scale, a Python float, multiplies a float32
  tensor); the cast truncates towards zero, as a C cast does.
  """
  scale = np.float32(float(mask_size + 2 * padding) / mask_size)
  w_half = (boxes[:, 2] - boxes[:, 0]) * _HALF * scale
  h_half = (boxes[:, 3] - boxes[:, 1]) * _HALF * scale
  x_c = (boxes[:, 2] + boxes[:, 0]) * _HALF
  y_c = (boxes[:, 3] + boxes[:, 1]) * _HALF
  expanded = np.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)
  return np.trunc(expanded).astype(np.int64)


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_size: Sequence[int],
                padding: int = 1) -> np.ndarray:
  """Masks of the box heads -> (D, H, W) float32 soft masks of the whole image.

  torchvision roi_heads.py ``paste_masks_in_image``: each (M, M) mask is
  zero-padded by `padding`, its box expanded by (M + 2 padding) / M and cut to
  integers (x1, y1, x2, y2), the padded mask resized (bilinear,
  align_corners=False) to (y2 - y1 + 1, x2 - x1 + 1) (at least 1x1) and
  pasted at (x1, y1), clipped to the image; the rest of the image is 0.
  Binarise with ``> 0.5`` for COCO (torchvision references coco_eval.py).

  Args:
    masks: (D, M, M) mask probabilities of each detection's class.
    boxes: (D, 4) boxes (x1, y1, x2, y2) in the image's pixels.
    image_size: (H, W) of the image pasted into.
    padding: pixels of zeros around each mask (torchvision's 1).

  Returns:
    (D, H, W) float32. A box entirely outside the image pastes nothing (where
    torchvision's Python slicing with a negative end fails or wraps around).
  """
  height, width = _check_size("image_size", image_size)
  masks = np.asarray(masks, np.float32)
  boxes = _check_boxes("boxes", boxes)
  if masks.ndim != 3 or masks.shape[1] != masks.shape[2] or len(masks) != len(boxes):
    raise ValueError(f"masks must be (D, M, M) with D = {len(boxes)} boxes, got shape "
                     f"{masks.shape}")
  if int(padding) != padding or padding < 0:
    raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
  padded = np.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
  int_boxes = _expanded_integer_boxes(boxes, masks.shape[-1], padding)
  pasted = np.zeros((len(masks), height, width), np.float32)
  for mask, image_mask, (bx1, by1, bx2, by2) in zip(padded, pasted, int_boxes):
    x0, x1 = max(bx1, 0), min(bx2 + 1, width)
    y0, y1 = max(by1, 0), min(by2 + 1, height)
    if x1 <= x0 or y1 <= y0:
      continue
    resized = resize_bilinear(mask, max(by2 - by1 + 1, 1), max(bx2 - bx1 + 1, 1))
    image_mask[y0:y1, x0:x1] = resized[y0 - by1:y1 - by1, x0 - bx1:x1 - bx1]
  return pasted


def _bicubic_argmax(maps: np.ndarray, out_height: int, out_width: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """First maximum (row-major) of each of :func:`resize_bicubic`'s (K, out_height, out_width) maps.

  Returns the flat positions (K,) and the float32 values there, equal to
  ``resize_bicubic(maps, ...)``'s, without fusing every pixel's
  multiply-adds as PyTorch does (in numpy that is several times slower than
  the kernel): the resize is first done with separately rounded float32
  products and sums, which differ from the fused ones by a few roundings of
  sum |w v| <= max sum |w_y| * max sum |w_x| * max |maps|. Every pixel within
  twice a generous bound of that below the approximate maximum is a
  candidate (so the exact maxima are among them), and only the candidates
  are computed as :func:`resize_bicubic` does.

  Args:
    maps: (K, S, S) float32, finite.
  """
  y_taps, y_weights = _cubic_taps(maps.shape[-2], out_height)
  x_taps, x_weights = _cubic_taps(maps.shape[-1], out_width)
  rows = sum(maps[..., x_taps[:, i]] * x_weights[:, i] for i in range(4))
  approx = sum(rows[..., y_taps[:, j], :] * y_weights[:, j, None] for j in range(4))
  approx = approx.reshape(len(maps), -1)
  weight_sums = np.abs(y_weights).sum(axis=1).max() * np.abs(x_weights).sum(axis=1).max()
  tolerance = 64 * np.finfo(np.float32).eps * weight_sums * np.abs(maps).max(axis=(1, 2))
  positions = np.zeros(len(maps), np.int64)
  values = np.zeros(len(maps), np.float32)
  for k, (scores, tol) in enumerate(zip(approx, tolerance)):
    candidates = np.flatnonzero(scores >= scores.max() - 2 * tol)
    row, col = np.divmod(candidates, out_width)
    row_sums = [_dot([maps[k, y_taps[row, j], x_taps[col, i]] for i in range(4)],
                     [x_weights[col, i] for i in range(4)]) for j in range(4)]
    exact = _dot(row_sums, [y_weights[row, j] for j in range(4)])
    best = np.argmax(exact)  # the first of equal maxima, as candidates are increasing
    positions[k], values[k] = candidates[best], exact[best]
  return positions, values


def heatmaps_to_keypoints(heatmaps: np.ndarray, boxes: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
  """Keypoint heatmap logits -> keypoints and their scores.

  torchvision roi_heads.py ``heatmaps_to_keypoints`` (Detectron's
  ``keypoint_utils.heatmaps_to_keypoints``): per RoI, w = max(x2 - x1, 1),
  h likewise; each keypoint's map is resized (bicubic, align_corners=False)
  to (ceil(h), ceil(w)); the first maximum (row-major) at (row, col) gives
  x = (col + 0.5) * (w / ceil(w)) + x1, y = (row + 0.5) * (h / ceil(h)) + y1
  (Heckbert's continuous coordinate c = d + 0.5) and the score is the
  resized map's value there (torchvision indexes ``roi_map``, the resized
  map).

  Args:
    heatmaps: (D, S, S, K) finite logits (S = 56), channels last.
    boxes: (D, 4) the detections' boxes (x1, y1, x2, y2) in the coordinates
      the keypoints are wanted in (the model input's).

  Returns:
    keypoints (D, K, 3) float32 (x, y, 1) and scores (D, K) float32.
  """
  heatmaps = np.asarray(heatmaps, np.float32)
  boxes = _check_boxes("boxes", boxes)
  if heatmaps.ndim != 4 or len(heatmaps) != len(boxes):
    raise ValueError(f"heatmaps must be (D, S, S, K) with D = {len(boxes)} boxes, got shape "
                     f"{heatmaps.shape}")
  if not np.isfinite(heatmaps).all():
    raise ValueError("heatmaps must be finite logits; they hold NaN or infinite values")
  num_keypoints = heatmaps.shape[-1]
  widths = np.maximum(boxes[:, 2] - boxes[:, 0], _ONE)
  heights = np.maximum(boxes[:, 3] - boxes[:, 1], _ONE)
  keypoints = np.ones((len(boxes), num_keypoints, 3), np.float32)
  scores = np.zeros((len(boxes), num_keypoints), np.float32)
  for i, maps in enumerate(np.moveaxis(heatmaps, -1, 1)):
    map_width, map_height = int(np.ceil(widths[i])), int(np.ceil(heights[i]))
    position, scores[i] = _bicubic_argmax(maps, map_height, map_width)
    row, col = np.divmod(position, map_width)
    width_correction = widths[i] / np.float32(map_width)
    height_correction = heights[i] / np.float32(map_height)
    keypoints[i, :, 0] = (col.astype(np.float32) + _HALF) * width_correction + boxes[i, 0]
    keypoints[i, :, 1] = (row.astype(np.float32) + _HALF) * height_correction + boxes[i, 1]
  return keypoints, scores


def to_image_pixels(boxes: np.ndarray, masks: np.ndarray | None,
                    keypoint_heatmaps: np.ndarray | None, input_size: Sequence[int],
                    image_size: Sequence[int]
                    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
  """One image's detections from the model input's pixels to the image's (torchvision's
  ``GeneralizedRCNNTransform.postprocess`` then ``paste_masks_in_image``).

  Args:
    boxes: (N, 4) in the resized input's pixels (before padding), `input_size` (h, w).
    masks: (N, M, M) mask probabilities of the predicted class, or None.
    keypoint_heatmaps: (N, S, S, K) heatmap logits, or None.
    image_size: (H, W) of the original image.

  Returns:
    boxes (N, 4) resized, masks (N, H, W) float32 probabilities pasted with the
    resized boxes (or None), keypoints (N, K, 3) (x, y, 1) decoded in the input's
    pixels and then resized (or None).
  """
  image_boxes = resize_boxes(boxes, input_size, image_size)
  pasted = None if masks is None else paste_masks(masks, image_boxes, image_size)
  keypoints = None
  if keypoint_heatmaps is not None:
    points, _ = heatmaps_to_keypoints(keypoint_heatmaps, boxes)
    keypoints = resize_keypoints(points, input_size, image_size)
  return image_boxes, pasted, keypoints
