"""The detection modality against independent computations and torchvision.

Examples come from the synthetic ``shapes_detection`` sets (and the tiny COCO
folder of :mod:`tests.test_detection_data`) built as ArrayRecord into a
temporary data dir. Resized images, boxes, masks and keypoints are compared
with torchvision's own ``GeneralizedRCNNTransform`` (torch is a test-only
reference), and with hand computations: the analytic resize scale, the
mirrored boxes, the left / right keypoint swap written out by hand, and
``decode_masks`` resized with torch's nearest interpolation; mask patches
against the full-resolution masks' areas (integral images). The pipeline's
batches are checked against ``batch_spec`` and the stored examples they come
from.
"""

import jax
import ml_collections
import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from configs import common
from nonlocal_jax import input_pipeline
from nonlocal_jax.data.detection_features import (DetectionMetadata, decode_masks, encode_mask,
                                                  objects_as_arrays)
from nonlocal_jax.data.shapes_detection import ShapesDetection
from nonlocal_jax.preprocessing import detection
from tests.test_detection_data import write_coco

# The figures' keypoints (head, left_hand, right_hand, left_hip, right_hip, left_foot,
# right_foot) after a horizontal flip: keypoint k comes from FIGURE_FLIP[k].
FIGURE_FLIP = (0, 2, 1, 4, 3, 6, 5)
SMALL = dict(train_min_sizes=(96,), max_size=128, test_min_size=96, pad_size=(128, 128),
             max_objects=8, masks=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  """A data dir with shapes_detection/shapes_small and figures_small (ArrayRecord)."""
  path = str(tmp_path_factory.mktemp("tfds"))
  for name in ("shapes_small", "figures_small"):
    ShapesDetection(config=name, data_dir=path).download_and_prepare(file_format="array_record")
  return path


def make_config(data_dir: str, dataset: str, **settings) -> ml_collections.ConfigDict:
  """A detection config of `dataset`, its keypoints from the data set's metadata."""
  config = common.base_config()
  config.dataset, config.data_dir = dataset, data_dir
  config.modality, config.eval_split = "detection", "validation"
  config.batch_size, config.eval_batch_size = 4, 6
  metadata = DetectionMetadata.from_info(input_pipeline.create_builder(config).info)
  config.input = detection.default_config(metadata)
  config.input.update({**SMALL, **settings})
  return config


def source_of(config: ml_collections.ConfigDict, split: str = "train"):
  return input_pipeline.data_source(input_pipeline.get_builder(config), split)


def analytic_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
  scale = min(min_size / min(height, width), max_size / max(height, width))
  return int(height * scale), int(width * scale)


def torch_nearest(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(N, H, W) uint8 -> (N, h, w): F.interpolate's default nearest, as torchvision resizes masks."""
  resized = torch.nn.functional.interpolate(torch.from_numpy(masks)[:, None].float(), size=size)
  return resized[:, 0].byte().numpy()


def flipped_objects(example: dict, settings: ml_collections.ConfigDict,
                    flipped: bool) -> dict[str, np.ndarray]:
  """The stored image, boxes, masks and keypoints, mirrored by hand if `flipped` (not resized)."""
  image = example["image"]
  height, width = image.shape[:2]
  objects = objects_as_arrays(example["objects"], settings.num_keypoints)
  boxes = objects["bbox"].astype(np.float64)
  masks = decode_masks(objects["mask"], height, width)
  keypoints = objects.get("keypoints", np.zeros((len(boxes), 0, 3))).astype(np.float64)
  if flipped:
    image = image[:, ::-1]
    boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    masks = masks[:, :, ::-1]
    keypoints = keypoints[:, list(FIGURE_FLIP)] if settings.num_keypoints else keypoints
    keypoints[..., 0] = width - keypoints[..., 0]
    keypoints[keypoints[..., 2] == 0] = 0
  return {"image": np.array(image), "boxes": boxes,
          "masks": np.ascontiguousarray(masks), "keypoints": keypoints,
          "labels": objects["label"] + 1}


def expected_targets(example: dict, settings: ml_collections.ConfigDict, min_size: int,
                     flipped: bool) -> dict[str, np.ndarray]:
  """Boxes, keypoints and masks (unpadded) of the stored objects, flipped and resized by hand."""
  want = flipped_objects(example, settings, flipped)
  height, width = example["image"].shape[:2]
  size = analytic_size(height, width, min_size, settings.max_size)
  sx, sy = size[1] / width, size[0] / height
  return {"image_size": size, "boxes": want["boxes"] * [sx, sy, sx, sy],
          "keypoints": want["keypoints"] * [sx, sy, 1],
          "masks": torch_nearest(want["masks"], size), "labels": want["labels"]}


def check_targets(inputs: np.ndarray, targets: dict, example: dict,
                  settings: ml_collections.ConfigDict, min_size: int, flipped: bool) -> None:
  """One example's inputs and targets against :func:`expected_targets`, padding included."""
  want = expected_targets(example, settings, min_size, flipped)
  n, (h, w) = len(want["labels"]), want["image_size"]
  np.testing.assert_array_equal(targets["image_size"], (h, w))
  np.testing.assert_array_equal(targets["original_size"], example["image"].shape[:2])
  assert targets["image_id"] == example["image_id"]
  np.testing.assert_allclose(targets["boxes"][:n], want["boxes"], rtol=1e-6, atol=1e-5)
  np.testing.assert_array_equal(targets["labels"][:n], want["labels"])
  assert targets["valid"][:n].all() and not targets["is_crowd"].any()
  if "masks" in targets:  # training targets only
    np.testing.assert_array_equal(targets["masks"][:n, :h, :w], want["masks"])
    assert not targets["masks"][n:].any()
    assert not targets["masks"][:, h:].any() and not targets["masks"][:, :, w:].any()
  if settings.num_keypoints:
    np.testing.assert_allclose(targets["keypoints"][:n], want["keypoints"], rtol=1e-6, atol=1e-5)
  # Padding: no objects past n, zeros past the image (in the normalised inputs too).
  assert not targets["valid"][n:].any() and not targets["labels"][n:].any()
  assert not targets["boxes"][n:].any()
  assert not inputs[h:].any() and not inputs[:, w:].any()
  if (h, w) == example["image"].shape[:2]:  # scale 1: the stored pixels, mirrored if flipped
    shown = detection.to_display(inputs, settings)[0, :h, :w]
    np.testing.assert_array_equal(shown, example["image"][:, ::-1] if flipped else
                                  example["image"])


@pytest.mark.parametrize("flipped", [False, True])
def test_transform_matches_torchvision(data_dir, flipped):
  """Sizes, boxes, masks, keypoints as GeneralizedRCNNTransform gives them; image to 1e-6."""
  config = make_config(data_dir, "shapes_detection/figures_small", max_size=1333,
                       pad_size=(1344, 1344))
  settings, source = config.input, source_of(config)
  for index, min_size in ((0, 800), (1, 97), (2, 333), (3, 128)):
    example = source[index]
    inputs, targets = detection.transform(example, settings, min_size, flipped)
    # What the reference's RandomHorizontalFlip hands the model, mirrored by hand.
    want = flipped_objects(example, settings, flipped)
    target = {"boxes": torch.from_numpy(np.float32(want["boxes"])),
              "masks": torch.from_numpy(want["masks"]),
              "keypoints": torch.from_numpy(np.float32(want["keypoints"]))}
    reference = GeneralizedRCNNTransform(min_size, 1333, list(detection.MEAN),
                                         list(detection.STD)).eval()
    image_list, (resized,) = reference(
        [torch.from_numpy(want["image"]).permute(2, 0, 1).float() / 255], [target])
    h, w = image_list.image_sizes[0]
    np.testing.assert_array_equal(targets["image_size"], (h, w))
    padded = image_list.tensors[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(inputs[:padded.shape[0], :padded.shape[1]], padded, rtol=0,
                               atol=1e-6)
    assert not inputs[padded.shape[0]:].any() and not inputs[:, padded.shape[1]:].any()
    n = len(want["labels"])
    np.testing.assert_array_equal(targets["boxes"][:n], resized["boxes"].numpy())
    np.testing.assert_array_equal(targets["masks"][:n, :h, :w], resized["masks"].numpy())
    np.testing.assert_array_equal(targets["keypoints"][:n], resized["keypoints"].numpy())


def test_flip_mirrors_boxes_masks_and_swaps_keypoints(data_dir):
  config = make_config(data_dir, "shapes_detection/figures_small")
  settings, source = config.input, source_of(config)
  assert tuple(settings.keypoint_flip) == FIGURE_FLIP  # filled from the data set's metadata
  unlabelled = 0
  for index in range(6):
    example = source[index]
    unlabelled += int((objects_as_arrays(example["objects"], 7)["keypoints"][..., 2] == 0).sum())
    for min_size in (96, 80):  # 96: scale 1 for the 96 x 128 images; 80: scaled
      for flipped in (False, True):
        inputs, targets = detection.transform(example, settings, min_size, flipped)
        check_targets(inputs, targets, example, settings, min_size, flipped)
  assert unlabelled  # some v = 0 keypoints, which a flip must leave at (0, 0, 0)
  settings.keypoint_flip = (0, 1, 1, 3, 4, 5, 6)
  with pytest.raises(ValueError, match="keypoint_flip"):
    detection.transform(source[0], settings, 96, flip=True)


def test_clamping_degenerate_crowd_dropped_and_empty():
  """Hand-made objects: a box past the border is clamped, degenerate ones are not valid."""
  mask = np.zeros((40, 60), np.uint8)
  mask[2:40, 0:30] = 1
  objects = {"bbox": [np.float32([-5, 2, 30, 50]), np.float32([10, 10, 10, 20]),
                      np.float32([70, 5, 80, 9]), np.float32([1, 1, 5, 5])],
             "label": [2, 0, 1, 1], "category_id": [3, 1, 2, 2],
             "is_crowd": [False, False, True, False], "area": [1.0] * 4,
             "mask": [encode_mask(mask)] * 4}
  example = {"image": np.full((40, 60, 3), 128, np.uint8), "image_id": 7, "objects": objects}
  settings = detection.default_config()
  settings.update(max_size=1000, pad_size=(96, 96), max_objects=3)
  inputs, targets = detection.transform(example, settings, 60, flip=False)  # scale 1.5
  np.testing.assert_array_equal(targets["image_size"], (60, 90))
  np.testing.assert_allclose(targets["boxes"], [[0, 3, 45, 60], [15, 15, 15, 30],
                                                [90, 7.5, 90, 13.5]])
  np.testing.assert_array_equal(targets["valid"], [True, False, False])
  np.testing.assert_array_equal(targets["is_crowd"], [False, False, True])
  np.testing.assert_array_equal(targets["labels"], [3, 1, 2])  # the 4th object is dropped
  assert targets["masks"][0, 3:60, :45].all() and targets["masks"][0].sum() == 57 * 45
  assert targets["image_id"].dtype == np.int64 and inputs.shape == (96, 96, 3)
  empty = {**example, "objects": {name: [] for name in objects}}
  _, targets = detection.transform(empty, settings, 60, flip=True)
  assert not targets["valid"].any() and not targets["masks"].any() and not targets["boxes"].any()


def test_max_objects_keeps_the_first_stored(data_dir):
  config = make_config(data_dir, "shapes_detection/shapes_small", max_objects=2, flip=False)
  source = source_of(config)
  counts = [len(source[i]["objects"]["label"]) for i in range(len(source))]
  index = int(np.argmax(counts))
  assert counts[index] > 2
  example = source[index]
  _, targets = detection.train_example(example, np.random.default_rng(0), config.input)
  want = expected_targets(example, config.input, 96, flipped=False)
  np.testing.assert_allclose(targets["boxes"], want["boxes"][:2], rtol=1e-6)
  np.testing.assert_array_equal(targets["masks"][:, :want["image_size"][0], :want["image_size"][1]],
                                want["masks"][:2])
  assert targets["valid"].all() and targets["masks"].shape == (2, 128, 128)


def test_keypoint_settings_must_match_the_data(data_dir):
  config = make_config(data_dir, "shapes_detection/shapes_small", num_keypoints=7)
  with pytest.raises(ValueError, match="no keypoints"):
    detection.eval_example(source_of(config, "validation")[0], config.input)
  config = make_config(data_dir, "shapes_detection/figures_small", num_keypoints=5,
                       keypoint_flip=(0, 1, 2, 3, 4))
  with pytest.raises(ValueError, match="set it to 7"):
    detection.eval_example(source_of(config, "validation")[0], config.input)
  # Without keypoints a keypoint data set trains boxes and masks only.
  config = make_config(data_dir, "shapes_detection/figures_small", num_keypoints=0)
  _, targets = detection.eval_example(source_of(config, "validation")[0], config.input)
  assert "keypoints" not in targets


def test_default_settings_are_torchvisions():
  settings = detection.default_config()
  assert tuple(settings.train_min_sizes) == (800,) and settings.max_size == 1333
  assert settings.test_min_size == 800 and settings.num_keypoints == 0 and settings.masks
  assert settings.mask_patch_size == 0  # full-resolution masks, as torchvision
  pad_h, pad_w = settings.pad_size
  assert pad_h == pad_w == -(-settings.max_size // 32) * 32
  # Every image fits, portrait or landscape, up to the extreme aspect ratios.
  for shape in ((480, 640), (640, 480), (100, 2000), (2000, 100), (800, 1333)):
    assert max(detection.resized_size(*shape, 800, 1333)) <= pad_h
  assert detection.resized_size(480, 640, 800, 1333) == (800, 1066)
  assert detection.resized_size(500, 2000, 800, 1333) == (333, 1333)
  metadata = ShapesDetection(config="figures").metadata()  # known without data
  assert tuple(detection.default_config(metadata).keypoint_flip) == FIGURE_FLIP


def cell_areas(mask: np.ndarray, box: np.ndarray, cells: int) -> np.ndarray:
  """(cells, cells): the part of each of the box's equal cells that `mask` (h, w) 0/1 covers.

  From the mask's integral image S (S[r, c] = mask[:r, :c].sum()): the mask is
  constant on each pixel (r, c) = [c, c + 1) x [r, r + 1), so its integral up
  to a point is S interpolated bilinearly; a cell's area is then
  S(y2, x2) - S(y1, x2) - S(y2, x1) + S(y1, x1).
  """
  height, width = mask.shape
  table = np.zeros((height + 1, width + 1))
  table[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
  x1, y1, x2, y2 = np.asarray(box, np.float64)
  ys = np.clip(y1 + (y2 - y1) * np.arange(cells + 1) / cells, 0, height)
  xs = np.clip(x1 + (x2 - x1) * np.arange(cells + 1) / cells, 0, width)
  r, c = np.minimum(ys.astype(int), height - 1), np.minimum(xs.astype(int), width - 1)
  a, b = (ys - r)[:, None], (xs - c)[None, :]
  integral = ((1 - a) * (1 - b) * table[r[:, None], c] + a * (1 - b) * table[r[:, None] + 1, c]
              + (1 - a) * b * table[r[:, None], c + 1] + a * b * table[r[:, None] + 1, c + 1])
  areas = integral[1:, 1:] - integral[:-1, 1:] - integral[1:, :-1] + integral[:-1, :-1]
  return areas / ((y2 - y1) / cells * (x2 - x1) / cells)


@pytest.mark.parametrize("flipped", [False, True])
def test_mask_patches_are_the_masks_areas_on_their_boxes(data_dir, flipped):
  """mask_patch_size = P: 'mask_patches' (M, P, P) instead of 'masks', each object's share of
  its box's cells covered by the full-resolution mask target of the same transform; the
  other targets unchanged."""
  full = make_config(data_dir, "shapes_detection/shapes_small")
  patched = make_config(data_dir, "shapes_detection/shapes_small", mask_patch_size=12)
  source = source_of(full)
  objects = 0
  for index, min_size in ((0, 96), (1, 80), (2, 64), (3, 96), (4, 80), (5, 64)):
    _, want = detection.transform(source[index], full.input, min_size, flipped)
    inputs, targets = detection.transform(source[index], patched.input, min_size, flipped)
    assert "masks" not in targets and set(targets) == set(want) - {"masks"} | {"mask_patches"}
    for name in set(targets) - {"mask_patches"}:
      np.testing.assert_array_equal(targets[name], want[name], err_msg=name)
    patches = targets["mask_patches"]
    assert patches.shape == (8, 12, 12) and patches.dtype == np.float32
    n = len(source[index]["objects"]["label"])
    for i in range(n):
      np.testing.assert_allclose(patches[i], cell_areas(want["masks"][i], want["boxes"][i], 12),
                                 rtol=0, atol=1e-5)
    assert not patches[n:].any()
    assert (patches[:n] == 1).any() and ((patches[:n] > 0) & (patches[:n] < 1)).any()
    objects += n
  assert objects > 6


def test_patches_of_a_flipped_image_are_the_patches_flipped(data_dir):
  """At scale 1 (min_size the short side) a flip mirrors each patch.
  Resized, torch's nearest rule is not mirror-symmetric: patches then follow the flipped
  resized masks (test_mask_patches_are_the_masks_areas_on_their_boxes)."""
  config = make_config(data_dir, "shapes_detection/figures_small", mask_patch_size=10)
  source = source_of(config)
  for index in range(6):
    example = source[index]
    min_size = min(example["image"].shape[:2])
    _, plain = detection.transform(example, config.input, min_size, flip=False)
    _, flipped = detection.transform(example, config.input, min_size, flip=True)
    assert tuple(plain["image_size"]) == example["image"].shape[:2]
    np.testing.assert_allclose(flipped["mask_patches"], plain["mask_patches"][:, :, ::-1],
                               rtol=0, atol=1e-6)
    assert plain["mask_patches"].any()


@pytest.mark.parametrize("value", [-1, 2.5, True, "28", None])
def test_bad_mask_patch_size_is_rejected(data_dir, value):
  config = make_config(data_dir, "shapes_detection/shapes_small")
  # A new dict: ConfigDict keeps a field's type (an int here) on assignment.
  config.input = ml_collections.ConfigDict({**config.input.to_dict(), "mask_patch_size": value})
  message = rf"config.input.mask_patch_size={value!r} must be an int >= 0"
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    detection.transform(source_of(config)[0], config.input, 96, flip=False)
  with pytest.raises(ValueError, match="mask_patch_size"):
    input_pipeline.batch_spec(config, input_pipeline.get_builder(config).info.features,
                              train=True)


def test_train_batches_with_mask_patches_match_their_spec(data_dir):
  config = make_config(data_dir, "shapes_detection/figures_small", mask_patch_size=14)
  builder = input_pipeline.get_builder(config)
  spec = input_pipeline.batch_spec(config, builder.info.features, train=True)
  assert "masks" not in spec["label"]
  assert (spec["label"]["mask_patches"].shape, spec["label"]["mask_patches"].dtype) == (
      (config.batch_size, 8, 14, 14), np.float32)
  batch = next(input_pipeline.train_iterator(builder, config))
  assert_matches_spec(batch, spec)
  assert batch["label"]["mask_patches"].any()
  eval_spec = input_pipeline.batch_spec(config, builder.info.features, train=False)
  assert not {"masks", "mask_patches"} & set(eval_spec["label"])
  assert_matches_spec(next(input_pipeline.eval_iterator(builder, config)), eval_spec)


def assert_matches_spec(batch: dict, spec: dict) -> None:
  assert jax.tree.structure(batch) == jax.tree.structure(spec)
  for got, want in zip(jax.tree.leaves(batch), jax.tree.leaves(spec)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype), (got.shape, got.dtype, want)


@pytest.mark.parametrize("dataset", ["shapes_detection/shapes_small",
                                     "shapes_detection/figures_small"])
def test_train_batches_are_the_stored_examples_augmented(data_dir, dataset):
  config = make_config(data_dir, dataset)
  builder = input_pipeline.get_builder(config)
  spec = input_pipeline.batch_spec(config, builder.info.features, train=True)
  assert ("keypoints" in spec["label"]) == dataset.endswith("figures_small")
  iterator = input_pipeline.train_iterator(builder, config)
  read = input_pipeline._TrainExample(source_of(config), config, 0, 1)
  flips = set()
  for step in range(3):
    batch = next(iterator)
    assert_matches_spec(batch, spec)
    assert batch["mask"].all()
    for j in range(config.batch_size):
      example = read.source[read.locate(step * config.batch_size + j)[0]]
      inputs, targets = batch["inputs"][j], jax.tree.map(lambda x: x[j], batch["label"])
      boxes = expected_targets(example, config.input, 96, flipped=False)["boxes"]
      flipped = not np.allclose(targets["boxes"][:len(boxes)], boxes, rtol=1e-6, atol=1e-5)
      check_targets(inputs, targets, example, config.input, 96, flipped)
      flips.add(flipped)
  assert flips == {False, True}


def test_train_batches_are_deterministic_and_resume(data_dir):
  config = make_config(data_dir, "shapes_detection/figures_small")
  builder = input_pipeline.get_builder(config)
  first = [next(input_pipeline.train_iterator(builder, config, start_step=s)) for s in (0, 1)]
  fresh = input_pipeline.train_iterator(builder, config)
  for want in first:
    jax.tree.map(np.testing.assert_array_equal, next(fresh), want)
  assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])
  config.seed = 1  # another seed, other flips and order
  other = next(input_pipeline.train_iterator(builder, config))
  assert not np.array_equal(other["inputs"], first[0]["inputs"])


def test_eval_batches_cover_the_split_once_padded_with_mask_false(data_dir):
  config = make_config(data_dir, "shapes_detection/shapes_small")
  builder = input_pipeline.get_builder(config)
  spec = input_pipeline.batch_spec(config, builder.info.features, train=False)
  batches = list(input_pipeline.eval_iterator(builder, config))
  assert len(batches) == 3  # 16 examples, 6 per batch
  assert "masks" not in spec["label"]  # evaluation scores against the stored ground truth
  for batch in batches:
    assert_matches_spec(batch, spec)
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(18) < 16)
  source = source_of(config, "validation")
  ids = np.concatenate([b["label"]["image_id"] for b in batches])[mask]
  np.testing.assert_array_equal(ids, [source[i]["image_id"] for i in range(16)])
  for i in range(16):
    batch = batches[i // 6]
    targets = jax.tree.map(lambda x, i=i: x[i % 6], batch["label"])
    check_targets(batch["inputs"][i % 6], targets, source[i], config.input, 96, flipped=False)


def test_coco_builder_through_the_pipeline(tmp_path):
  """coco_detection reads config.manual_dir; crowd objects and images without objects pass."""
  config = common.base_config()
  config.dataset = "coco_detection/person_keypoints"
  config.data_dir, config.manual_dir = str(tmp_path / "tfds"), write_coco(str(tmp_path / "coco"))
  config.modality, config.eval_split = "detection", "validation"
  config.batch_size, config.eval_batch_size = 3, 3
  builder = input_pipeline.get_builder(config)
  config.input = detection.default_config(DetectionMetadata.from_info(builder.info))
  config.input.update(train_min_sizes=(64,), test_min_size=64, max_size=96, pad_size=(96, 96),
                      max_objects=4, flip=False)
  spec = input_pipeline.batch_spec(config, builder.info.features, train=True)
  assert spec["label"]["keypoints"].shape == (3, 4, 17, 3)
  batch = next(input_pipeline.train_iterator(builder, config))
  assert_matches_spec(batch, spec)
  source = source_of(config)
  read = input_pipeline._TrainExample(source, config, 0, 1)
  for j in range(3):
    example = source[read.locate(j)[0]]
    targets = jax.tree.map(lambda x, j=j: x[j], batch["label"])
    objects = objects_as_arrays(example["objects"], 17)
    n = len(objects["label"])
    np.testing.assert_array_equal(targets["is_crowd"][:n], objects["is_crowd"])
    np.testing.assert_array_equal(targets["valid"], np.arange(4) < n)
    h, w = example["image"].shape[:2]
    size = analytic_size(h, w, 64, 96)
    np.testing.assert_array_equal(targets["image_size"], size)
    np.testing.assert_allclose(targets["keypoints"][:n], objects["keypoints"] *
                               [size[1] / w, size[0] / h, 1], rtol=1e-6, atol=1e-5)
