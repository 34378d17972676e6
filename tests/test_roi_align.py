"""RoIAlign, FPN level assignment and multi-scale RoIAlign against torchvision.ops.

References are torchvision.ops.roi_align (its C++ CPU kernel), LevelMapper and
MultiScaleRoIAlign on the same random inputs in NCHW layout. Exact semantics
(sample positions, border rules, clamps) are checked in float64, where any
rounding difference is ~1e-15; float32 runs are checked to ~1e-5 of the
feature scale: XLA on CPU rounds the sample coordinates slightly differently
(it fuses multiply-adds and its float32 division can be 1 ulp off), and an
ulp of a coordinate times a feature slope of ~1 per pixel is ~1e-5 for maps
a few tens of pixels wide.
"""

from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from nonlocal_jax.detection.roi_align import level_of_boxes, multiscale_roi_align, roi_align

F32_TOL = {"rtol": 1e-5, "atol": 2e-5}  # features ~ N(0, 1)
F64_TOL = {"rtol": 1e-10, "atol": 1e-10}


def to_nchw(features: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(features.transpose(0, 3, 1, 2)))


def torch_roi_align(features, boxes, batch_index, output_size, spatial_scale, sampling_ratio,
                    aligned) -> np.ndarray:
  """torchvision.ops.roi_align on (N, H, W, C) features -> (R, out_h, out_w, C)."""
  rois = torch.cat([torch.from_numpy(batch_index.astype(boxes.dtype))[:, None],
                    torch.from_numpy(boxes)], dim=1)
  pooled = torchvision.ops.roi_align(to_nchw(features), rois, output_size, spatial_scale,
                                     sampling_ratio, aligned)
  return pooled.permute(0, 2, 3, 1).numpy()


def random_boxes(rng: np.random.Generator, num: int, height: int, width: int,
                 spatial_scale: float) -> np.ndarray:
  """(num, 4) image-space boxes over an H x W map: inside, straddling or outside it, tiny,
  empty and inverted."""
  extent = np.array([width, height]) / spatial_scale
  start = rng.uniform(-0.4, 1.2, (num, 2)) * extent
  size = np.exp(rng.uniform(np.log(0.02), np.log(1.5), (num, 2))) * extent
  boxes = np.concatenate([start, start + size], axis=1)
  special = [
      [0.2, 0.3, 0.2, 0.3],  # empty, a point
      [0.5, 0.1, 0.5 + 1e-3, 0.9],  # 1e-3 wide
      [0.7, 0.6, 0.3, 0.2],  # inverted
      [1.5, 1.2, 2.5, 2.0],  # wholly beyond the bottom right
      [-1.5, -1.0, -0.3, -0.2],  # wholly beyond the top left
      [-0.13, -0.11, 1.07, 1.09],  # the whole map and a margin
  ]
  boxes[:len(special)] = np.array(special) * np.tile(extent, 2)
  return boxes


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("output_size, sampling_ratio, spatial_scale", [
    (7, 2, 0.25), ((5, 3), 1, 1.0), (14, 3, 0.125), ((2, 4), 4, 0.3)])
def test_roi_align_matches_torchvision_float64(aligned, output_size, sampling_ratio,
                                              spatial_scale):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(3, 11, 15, 4))
  boxes = random_boxes(rng, 40, 11, 15, spatial_scale)
  batch_index = rng.integers(0, 3, len(boxes))
  expected = torch_roi_align(features, boxes, batch_index, output_size, spatial_scale,
                             sampling_ratio, aligned)
  with jax.enable_x64(True):
    pool = jax.jit(lambda f, b, i: roi_align(f, b, i, output_size, spatial_scale,
                                             sampling_ratio, aligned))
    pooled = pool(jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(batch_index))
  assert pooled.dtype == jnp.float64
  assert pooled.shape == expected.shape
  np.testing.assert_allclose(np.asarray(pooled), expected, **F64_TOL)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_matches_torchvision_float32(aligned):
  rng = np.random.default_rng(1)
  features = rng.normal(size=(2, 25, 34, 8)).astype(np.float32)
  boxes = random_boxes(rng, 200, 25, 34, 0.25).astype(np.float32)
  batch_index = rng.integers(0, 2, len(boxes))
  expected = torch_roi_align(features, boxes, batch_index, (7, 6), 0.25, 2, aligned)
  pooled = jax.jit(lambda f, b, i: roi_align(f, b, i, (7, 6), 0.25, 2, aligned))(
      jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(batch_index))
  assert pooled.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(pooled), expected, **F32_TOL)


def test_roi_align_border_rules():
  """Samples at y = -1 or y = H are read (clamped to rows 0 and H - 1); beyond them they are 0.

  Box coordinates are dyadic, so every sample position is exact.
  """
  height, width = 4, 6
  features = np.arange(height * width, dtype=np.float64).reshape(1, height, width, 1) + 1
  # aligned=False, 1x1 output, 1 sample: the sample is the centre of a 1 x 1 box.
  centres = np.array([[2.5, height], [2.5, height + 0.125], [2.5, -1.0], [2.5, -1.125],
                      [width, 1.5], [width + 0.125, 1.5], [-1.0, 1.5], [-1.25, 1.5],
                      [2.5, height - 0.75], [-0.5, -0.5]])
  boxes = np.concatenate([centres - 0.5, centres + 0.5], axis=1)
  row = lambda y: features[0, y, :, 0]
  expected = [
      (row(3)[2] + row(3)[3]) / 2, 0, (row(0)[2] + row(0)[3]) / 2, 0,
      (features[0, 1, 5, 0] + features[0, 2, 5, 0]) / 2, 0,
      (features[0, 1, 0, 0] + features[0, 2, 0, 0]) / 2, 0,
      (row(3)[2] + row(3)[3]) / 2, features[0, 0, 0, 0]]
  reference = torch_roi_align(features, boxes, np.zeros(len(boxes), int), 1, 1.0, 1, False)
  np.testing.assert_allclose(reference[:, 0, 0, 0], expected)
  with jax.enable_x64(True):
    pooled = jax.jit(lambda f, b, i: roi_align(f, b, i, 1, 1.0, 1))(
        jnp.asarray(features), jnp.asarray(boxes), jnp.zeros(len(boxes), jnp.int32))
  np.testing.assert_allclose(np.asarray(pooled)[:, 0, 0, 0], expected)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_gradient_matches_torch_autograd(aligned):
  rng = np.random.default_rng(2)
  features = rng.normal(size=(2, 12, 9, 3))
  boxes = random_boxes(rng, 30, 12, 9, 0.5)
  batch_index = rng.integers(0, 2, len(boxes))
  cotangent = rng.normal(size=(len(boxes), 4, 5, 3))
  torch_features = to_nchw(features).requires_grad_()
  rois = torch.cat([torch.from_numpy(batch_index.astype(np.float64))[:, None],
                    torch.from_numpy(boxes)], dim=1)
  pooled = torchvision.ops.roi_align(torch_features, rois, (4, 5), 0.5, 2, aligned)
  pooled.backward(to_nchw(cotangent))
  expected = torch_features.grad.permute(0, 2, 3, 1).numpy()
  loss = lambda f, b: jnp.sum(roi_align(f, b, jnp.asarray(batch_index), (4, 5), 0.5, 2, aligned)
                              * cotangent)
  with jax.enable_x64(True):
    grad_features, grad_boxes = jax.jit(jax.grad(loss, argnums=(0, 1)))(
        jnp.asarray(features), jnp.asarray(boxes))
  np.testing.assert_allclose(np.asarray(grad_features), expected, **F64_TOL)
  np.testing.assert_array_equal(np.asarray(grad_boxes), 0)  # torchvision: no box gradient


def test_roi_align_memory_is_bounded():
  """Mask-head sizes (1000 boxes, 14 x 14, g = 2, C = 256, 2 x 200 x 336 maps): neither pass
  holds the (1000, 14, 14, 16, 256) gathered corners (3.2 GB), only ~one output (200 MB)."""
  features = jax.ShapeDtypeStruct((2, 200, 336, 256), jnp.float32)
  boxes = jax.ShapeDtypeStruct((1000, 4), jnp.float32)
  batch_index = jax.ShapeDtypeStruct((1000,), jnp.int32)
  pool = lambda f, b, i: roi_align(f, b, i, 14, 0.25, 2)
  output_bytes = 1000 * 14 * 14 * 256 * 4
  forward = jax.jit(pool).lower(features, boxes, batch_index).compile().memory_analysis()
  backward = jax.jit(jax.grad(lambda f, b, i: jnp.sum(pool(f, b, i)))).lower(
      features, boxes, batch_index).compile().memory_analysis()
  assert forward.temp_size_in_bytes < 0.25 * output_bytes
  assert backward.temp_size_in_bytes < 1.5 * output_bytes


@pytest.mark.parametrize("kwargs", [
    {}, {"canonical_scale": 256, "canonical_level": 3, "min_level": 1, "max_level": 6}])
def test_level_of_boxes_matches_level_mapper(kwargs):
  rng = np.random.default_rng(3)
  canonical_scale = kwargs.get("canonical_scale", 224)
  size = np.exp(rng.uniform(np.log(4), np.log(2000), (500, 2)))
  start = rng.uniform(-50, 500, size.shape)
  random = np.concatenate([start, start + size], axis=1).astype(np.float32)
  # Squares at the origin with sqrt(area) at the level boundaries canonical_scale * 2^k, one
  # float32 ulp below them (where eps matters) and 1e-5 off them; and empty boxes.
  edges = (canonical_scale * 2.0 ** np.arange(-5, 4)).astype(np.float32)
  edges = np.concatenate([edges, np.nextafter(edges, np.float32(0)), edges * np.float32(1 - 1e-5),
                          edges * np.float32(1 + 1e-5)])
  squares = np.stack([0 * edges, 0 * edges, edges, edges], axis=1)
  boxes = np.concatenate([random, squares, [[3, 4, 3, 9], [1, 2, 8, 2]]]).astype(np.float32)
  mapper = torchvision.ops.poolers.LevelMapper(
      kwargs.get("min_level", 2), kwargs.get("max_level", 5), canonical_scale,
      kwargs.get("canonical_level", 4))
  expected = mapper([torch.from_numpy(boxes)]).numpy() + kwargs.get("min_level", 2)
  levels = jax.jit(lambda b: level_of_boxes(b, **kwargs))(jnp.asarray(boxes))
  assert levels.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(levels), expected)
  assert len(np.unique(expected)) > 3


def test_level_of_boxes_batched_and_inverted():
  boxes = jnp.array([[[0, 0, 224, 224], [0, 0, 1000, 1000]], [[10, 10, 5, 20], [0, 0, 0, 0]]],
                    jnp.float32)
  np.testing.assert_array_equal(np.asarray(jax.jit(level_of_boxes)(boxes)), [[4, 5], [2, 2]])


def pyramid(rng: np.random.Generator, batch: int, height: int, width: int, channels: int,
            strides, dtype) -> list[np.ndarray]:
  return [rng.normal(size=(batch, height // s, width // s, channels)).astype(dtype)
          for s in strides]


def padded_boxes(rng: np.random.Generator, batch: int, num: int, height: int, width: int,
                 dtype) -> tuple[np.ndarray, np.ndarray]:
  """(B, R, 4) boxes of every FPN level, some straddling the image, and a (B, R) validity mask;
  padding boxes are NaN (they must not leak into the output or the gradient)."""
  start = rng.uniform(-0.2, 1.0, (batch, num, 2)) * [width, height]
  size = np.exp(rng.uniform(np.log(2), np.log(1000), (batch, num, 2)))
  boxes = np.concatenate([start, start + size], axis=-1).astype(dtype)
  valid = rng.uniform(size=(batch, num)) < 0.7
  valid[1, :] = False
  valid[1, :3] = True
  boxes[~valid] = np.nan
  return boxes, valid


def torch_multiscale(features, strides, boxes, valid, output_size, sampling_ratio, image_size):
  """torchvision.ops.MultiScaleRoIAlign on the valid boxes -> (B, R, out_h, out_w, C)."""
  pooler = torchvision.ops.MultiScaleRoIAlign([str(k) for k in range(len(features))],
                                             output_size, sampling_ratio)
  maps = OrderedDict((str(k), to_nchw(f)) for k, f in enumerate(features))
  maps["pool"] = to_nchw(features[-1][:, ::2, ::2])  # FPN's extra level, not pooled from
  pooled = pooler(maps, [torch.from_numpy(b[v]) for b, v in zip(boxes, valid)],
                  [image_size] * len(boxes))
  assert pooler.scales == [1 / s for s in strides]  # the scales torchvision infers
  return pooled.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_multiscale_roi_align_matches_torchvision(dtype):
  rng = np.random.default_rng(4)
  strides, (height, width) = (4, 8, 16, 32), (128, 192)
  features = pyramid(rng, 2, height, width, 5, strides, dtype)
  boxes, valid = padded_boxes(rng, 2, 60, height, width, dtype)
  expected = torch_multiscale(features, strides, boxes, valid, (7, 5), 2, (height, width))
  with jax.enable_x64(dtype == np.float64):
    pool = jax.jit(lambda f, b, v: multiscale_roi_align(f, strides, b, v, (7, 5), 2))
    pooled = np.asarray(pool([jnp.asarray(f) for f in features], jnp.asarray(boxes),
                             jnp.asarray(valid)))
  assert pooled.shape == (2, 60, 7, 5, 5) and pooled.dtype == dtype
  np.testing.assert_allclose(pooled[valid], expected,
                             **(F64_TOL if dtype == np.float64 else F32_TOL))
  np.testing.assert_array_equal(pooled[~valid], 0)
  levels = jax.jit(level_of_boxes)(jnp.asarray(boxes[valid]))
  assert set(np.asarray(levels).tolist()) == {2, 3, 4, 5}


def test_multiscale_roi_align_gradient_matches_torch_autograd():
  rng = np.random.default_rng(5)
  strides, (height, width) = (4, 8, 16, 32), (96, 64)
  features = pyramid(rng, 2, height, width, 3, strides, np.float64)
  boxes, valid = padded_boxes(rng, 2, 30, height, width, np.float64)
  cotangent = rng.normal(size=(2, 30, 3, 3, 3))
  torch_features = [to_nchw(f).requires_grad_() for f in features]
  pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 3, 2)
  pooled = pooler(OrderedDict((str(k), f) for k, f in enumerate(torch_features)),
                  [torch.from_numpy(b[v]) for b, v in zip(boxes, valid)], [(height, width)] * 2)
  pooled.backward(to_nchw(cotangent[valid]))
  expected = [f.grad.permute(0, 2, 3, 1).numpy() for f in torch_features]
  loss = lambda f: jnp.sum(multiscale_roi_align(f, strides, jnp.asarray(boxes),
                                                jnp.asarray(valid), 3, 2) * cotangent)
  with jax.enable_x64(True):
    grads = jax.jit(jax.grad(loss))([jnp.asarray(f) for f in features])
  for grad, reference in zip(grads, expected):
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(np.asarray(grad), reference, **F64_TOL)


def test_multiscale_roi_align_single_level_is_roi_align():
  rng = np.random.default_rng(6)
  features = rng.normal(size=(2, 8, 10, 3)).astype(np.float32)
  boxes, valid = padded_boxes(rng, 2, 10, 128, 160, np.float32)
  pooled = jax.jit(lambda f, b, v: multiscale_roi_align([f], (16,), b, v, 4, 2))(
      jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(valid))
  expected = torch_multiscale([features], (16,), boxes, valid, 4, 2, (128, 160))
  np.testing.assert_allclose(np.asarray(pooled)[valid], expected, **F32_TOL)


def test_roi_align_rejects_bad_arguments():
  features, boxes, index = jnp.zeros((2, 8, 8, 3)), jnp.zeros((5, 4)), jnp.zeros(5, jnp.int32)
  for ratio in (0, -1):
    with pytest.raises(ValueError, match=f"sampling_ratio must be a positive int, got {ratio}.*"
                                         f"adaptive"):
      roi_align(features, boxes, index, 7, 0.25, ratio)
  with pytest.raises(ValueError, match="sampling_ratio must be a positive int, got 2.0"):
    roi_align(features, boxes, index, 7, 0.25, 2.0)
  for size in (0, (7,), (7, 7, 7), (7, 2.5)):
    with pytest.raises(ValueError, match="output_size must be a positive int or a pair"):
      roi_align(features, boxes, index, size, 0.25, 2)
  with pytest.raises(ValueError, match=r"features must be \(N, H, W, C\), got shape \(8, 8, 3\)"):
    roi_align(features[0], boxes, index, 7, 0.25, 2)
  with pytest.raises(ValueError, match=r"boxes must be \(R, 4\).*got shape \(5, 5\)"):
    roi_align(features, jnp.zeros((5, 5)), index, 7, 0.25, 2)
  with pytest.raises(ValueError, match=r"box_batch_index must be \(R,\) = \(5,\), got shape"):
    roi_align(features, boxes, index[:4], 7, 0.25, 2)
  for scale in (0, -0.25, float("inf")):
    with pytest.raises(ValueError, match="spatial_scale must be a positive finite number"):
      roi_align(features, boxes, index, 7, scale, 2)


def test_level_of_boxes_rejects_bad_arguments():
  with pytest.raises(ValueError, match=r"boxes must be \(\.\.\., 4\).*got shape \(3, 5\)"):
    level_of_boxes(jnp.zeros((3, 5)))
  with pytest.raises(ValueError, match="min_level <= max_level, got 5 and 2"):
    level_of_boxes(jnp.zeros((3, 4)), min_level=5, max_level=2)


def test_multiscale_roi_align_rejects_bad_arguments():
  maps = [jnp.zeros((2, 64 // s, 96 // s, 3)) for s in (4, 8, 16, 32)]
  boxes, valid = jnp.zeros((2, 5, 4)), jnp.ones((2, 5), bool)
  call = lambda maps=maps, strides=(4, 8, 16, 32), boxes=boxes, valid=valid, ratio=2: (
      multiscale_roi_align(maps, strides, boxes, valid, 7, ratio))
  with pytest.raises(ValueError, match="need one stride per feature map, got 3 strides for 4"):
    call(strides=(4, 8, 16))
  with pytest.raises(ValueError, match="need one stride per feature map, got 0 strides for 0"):
    call(maps=[], strides=())
  with pytest.raises(ValueError, match=r"strides must be powers of two, got \(4, 8, 12, 32\)"):
    call(strides=(4, 8, 12, 32))
  with pytest.raises(ValueError, match=r"strides must double.*got \(4, 8, 32, 64\)"):
    call(strides=(4, 8, 32, 64))
  with pytest.raises(ValueError, match="map 1 of shape .* stride 16 is 2 times stride 8"):
    call(maps=maps[::-1], strides=(8, 16, 32, 64))
  for bad_map in (jnp.zeros((2, 2, 3, 4)), jnp.zeros((1, 2, 3, 3)), jnp.zeros((2, 3, 3))):
    with pytest.raises(ValueError, match=r"\(B, H_l, W_l, C\) maps with a common B and C"):
      call(maps=maps[:3] + [bad_map])
    with pytest.raises(ValueError, match=r"\(B, H_l, W_l, C\) maps with a common B and C"):
      call(maps=[bad_map] + maps[1:])
  with pytest.raises(ValueError, match=r"boxes must be \(B, R, 4\) with B = 2, got shape \(5, 4\)"):
    call(boxes=boxes[0])
  with pytest.raises(ValueError, match=r"valid must be \(B, R\) = \(2, 5\), got shape \(2, 4\)"):
    call(valid=valid[:, :4])
  with pytest.raises(ValueError, match="sampling_ratio must be a positive int, got 0.*adaptive"):
    call(ratio=0)
