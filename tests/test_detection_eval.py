"""Detection post-processing and COCO evaluation against torchvision and pycocotools.

Post-processing is compared with torchvision's own functions
(``roi_heads.paste_masks_in_image``, ``roi_heads.heatmaps_to_keypoints``,
``transform.resize_boxes`` / ``resize_keypoints`` / ``postprocess``) and
``F.interpolate`` on the same random inputs. On x86-64 PyTorch runs its
resize kernels with fused multiply-adds (CPU capability AVX2 / AVX-512), as
nonlocal_jax.detection.postprocess does, and results must be equal; under
another capability (``ATEN_CPU_CAPABILITY=default``) they may differ by float32
roundings and are compared with a tolerance.

Evaluation runs on ground truths made by :func:`ground_truth_json` from the
synthetic builders' examples (shapes with masks, stick figures with 7
keypoints) and from a hand-made COCO-style person set (17 keypoints, for
pycocotools' own OKS sigmas), and is compared with pycocotools called
directly on result lists written as torchvision's reference coco_eval.py
writes them.
"""

import contextlib
import copy
import io
import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.nn import functional as F
from torchvision.models.detection import roi_heads, transform

from nonlocal_jax.data import shapes_detection
from nonlocal_jax.data.detection_features import (DetectionMetadata, decode_masks, encode_mask,
                                                  objects_as_arrays)
from nonlocal_jax.detection import postprocess
from nonlocal_jax.detection.coco_eval import (DETECTION_STATS, KEYPOINT_STATS, coco_results,
                                              evaluate, ground_truth_json)

# PyTorch's x86-64 kernels built with FMA: our float32 operations are theirs.
EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
# Category ids of the shapes' three classes: out of order and with gaps, as COCO's.
SHAPE_CATEGORY_IDS = (5, 9, 2)
# OKS sigmas of the figures' 7 keypoints: COCO's nose, wrists, hips and ankles
# (pycocotools cocoeval.py Params.setKpParams).
FIGURE_SIGMAS = (0.026, 0.062, 0.062, 0.107, 0.107, 0.089, 0.089)
COCO_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                  "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                  "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
                 (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5),
                 (4, 6))


def assert_torch_equal(ours: np.ndarray, theirs: torch.Tensor) -> None:
  theirs = theirs.numpy()
  assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
  if EXACT:
    np.testing.assert_array_equal(ours, theirs)
  else:
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def random_boxes(rng: np.random.Generator, count: int, low: float, high: float,
                 sizes: tuple[float, float]) -> np.ndarray:
  """(count, 4) float32 boxes with corners in [low, high] and log-uniform sides in `sizes`."""
  x1, y1 = rng.uniform(low, high, size=(2, count))
  w, h = np.exp(rng.uniform(*np.log(sizes), size=(2, count)))
  return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def exact_fma32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
  """a * b + c rounded once to float32 (nearest, ties to even), with exact fractions."""
  exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
  near = np.float32(float(exact))  # within an ulp: float() and float32() round twice
  candidates = [np.nextafter(near, np.float32(-np.inf)), near,
                np.nextafter(near, np.float32(np.inf))]
  return min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact),
                                        int(np.asarray(v).view(np.int32)) & 1))


def test_fma_rounds_once():
  # a * b is a float32 midpoint M = 1 + 2^-11 + 2^-24: M + 2^-80 rounds up, and so does
  # M + 3 * 2^-54, which float64 first rounds to M + 2^-52 (rounding twice, a float64 sum
  # rounded to float32 goes down in the first case).
  a = np.float32(1 + 2**-12)
  cases = [(a, a, np.float32(2**-80)), (a, a, np.float32(3 * 2**-54)),
           (a, a, np.float32(-2**-80)), (-a, a, np.float32(2**-80))]
  rng = np.random.default_rng(14)
  cases += list(zip(*(rng.standard_normal((3, 200)).astype(np.float32)
                      * np.float32(2.0) ** rng.integers(-30, 30, (3, 200)))))
  a, b, c = (np.asarray(column, np.float32) for column in zip(*cases))
  expected = [exact_fma32(*case) for case in zip(a, b, c)]
  np.testing.assert_array_equal(postprocess._fma(a, b, c), np.asarray(expected, np.float32))
  assert postprocess._fma(a[0], a[0], c[0]) > np.float32(float(a[0]) * float(a[0]) + float(c[0]))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_resizes_match_interpolate(mode):
  rng = np.random.default_rng(0)
  resize = postprocess.resize_bilinear if mode == "bilinear" else postprocess.resize_bicubic
  image = rng.standard_normal((3, 30, 30)).astype(np.float32)
  # Up and down, the same size, 1 pixel, and both sides of bilinear's h + w <= 128 split.
  for out_size in [(30, 30), (1, 1), (5, 61), (64, 64), (64, 65), (200, 31), (97, 250)]:
    theirs = F.interpolate(torch.from_numpy(image)[:, None], size=out_size, mode=mode,
                           align_corners=False)[:, 0]
    assert_torch_equal(resize(image, *out_size), theirs)


def test_paste_masks_matches_torchvision():
  rng = np.random.default_rng(1)
  height, width = 150, 230
  across = random_boxes(rng, 40, -40, 250, (20, 120))
  overlapping = ((across[:, 0] < width - 2) & (across[:, 1] < height - 2) & (across[:, 2] > 2)
                 & (across[:, 3] > 2))
  boxes = np.concatenate([
      random_boxes(rng, 12, 0, 140, (4, 80)),          # inside, small (corner-weight resize)
      random_boxes(rng, 4, 0, 60, (100, 140)),         # large (row-by-row resize)
      across[overlapping],                             # partly outside, on every side
      random_boxes(rng, 6, 0, 140, (0.05, 1.5)),       # below a pixel
      np.array([[10, 20, 10, 20], [0, 0, 230, 150], [-5.5, -7.25, 240.5, 160.75]], np.float32),
  ])
  assert ((boxes[:, :2] < 0) | (boxes[:, 2:] > [width, height])).any(axis=1).sum() >= 8
  masks = (1 / (1 + np.exp(-3 * rng.standard_normal((len(boxes), 28, 28))))).astype(np.float32)
  ours = postprocess.paste_masks(masks, boxes, (height, width))
  theirs = roi_heads.paste_masks_in_image(torch.from_numpy(masks)[:, None],
                                          torch.from_numpy(boxes), (height, width))[:, 0]
  assert_torch_equal(ours, theirs)
  if not EXACT:
    assert np.mean((ours > 0.5) != (theirs.numpy() > 0.5)) < 1e-4
  assert ours.any(axis=(1, 2)).all()


def test_paste_masks_pastes_nothing_for_boxes_outside_the_image():
  # torchvision's slicing breaks here (a negative slice end); the box covers no pixel.
  boxes = np.array([[-50, 10, -20, 40], [300, 10, 340, 40], [10, 200, 40, 260]], np.float32)
  pasted = postprocess.paste_masks(np.ones((3, 28, 28), np.float32), boxes, (150, 230))
  assert pasted.shape == (3, 150, 230) and not pasted.any()


def test_heatmaps_to_keypoints_matches_torchvision():
  rng = np.random.default_rng(2)
  boxes = np.concatenate([
      random_boxes(rng, 10, -30, 300, (0.3, 300)),
      np.array([[5, 5, 61, 61], [0.5, 2.25, 1.0, 2.5], [-10, -20, 90.5, 30]], np.float32),
  ])
  heatmaps = (4 * rng.standard_normal((len(boxes), 56, 56, 17))).astype(np.float32)
  keypoints, scores = postprocess.heatmaps_to_keypoints(heatmaps, boxes)
  their_keypoints, their_scores = roi_heads.heatmaps_to_keypoints(
      torch.from_numpy(heatmaps).permute(0, 3, 1, 2), torch.from_numpy(boxes))
  assert_torch_equal(keypoints, their_keypoints)
  assert_torch_equal(scores, their_scores)


@pytest.mark.skipif(not EXACT, reason="near-equal maxima are ordered by float32 roundings")
def test_heatmaps_to_keypoints_breaks_ties_as_torchvision():
  # Flat maps, and maps a few ulps from flat, have many (near-)equal maxima: the first one wins,
  # and rounding the resize differently from PyTorch would pick another.
  rng = np.random.default_rng(3)
  boxes = random_boxes(rng, 6, 0, 50, (20, 90))
  ulp = np.float32(2.5 * 2**-23)
  yy, xx = np.mgrid[:56, :56] / 56.0
  heatmaps = np.concatenate([
      np.broadcast_to(np.stack([np.zeros((56, 56)), np.full((56, 56), 2.5), -((xx - 0.5) ** 2),
                                np.round(rng.standard_normal((56, 56)))], axis=-1),
                      (6, 56, 56, 4)),
      2.5 + ulp * rng.integers(-2, 3, size=(6, 56, 56, 12))], axis=-1).astype(np.float32)
  keypoints, scores = postprocess.heatmaps_to_keypoints(heatmaps, boxes)
  their_keypoints, their_scores = roi_heads.heatmaps_to_keypoints(
      torch.from_numpy(heatmaps).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(boxes))
  assert_torch_equal(keypoints, their_keypoints)
  assert_torch_equal(scores, their_scores)


def test_resize_boxes_and_keypoints_match_torchvision():
  rng = np.random.default_rng(4)
  boxes = random_boxes(rng, 20, -10, 700, (1, 300))
  keypoints = np.concatenate([rng.uniform(-10, 800, size=(20, 17, 2)),
                              rng.integers(0, 3, size=(20, 17, 1))], axis=-1).astype(np.float32)
  for from_size, to_size in [((800, 1067), (480, 640)), ((800, 1199), (427, 640)),
                             ((13, 17), (29, 31))]:
    assert_torch_equal(postprocess.resize_boxes(boxes, from_size, to_size),
                       transform.resize_boxes(torch.from_numpy(boxes), from_size, to_size))
    assert_torch_equal(postprocess.resize_keypoints(keypoints, from_size, to_size),
                       transform.resize_keypoints(torch.from_numpy(keypoints), from_size,
                                                  to_size))


def test_postprocess_chain_matches_torchvision_transform_postprocess():
  rng = np.random.default_rng(5)
  resized, original = (512, 683), (300, 400)
  boxes = random_boxes(rng, 6, 0, 400, (10, 200))
  mask_probs = rng.random((6, 28, 28), dtype=np.float32)
  heatmaps = rng.standard_normal((6, 56, 56, 17)).astype(np.float32)
  keypoints, _ = postprocess.heatmaps_to_keypoints(heatmaps, boxes)
  original_boxes = postprocess.resize_boxes(boxes, resized, original)
  masks = postprocess.paste_masks(mask_probs, original_boxes, original)
  keypoints = postprocess.resize_keypoints(keypoints, resized, original)
  their_keypoints, _ = roi_heads.heatmaps_to_keypoints(
      torch.from_numpy(heatmaps).permute(0, 3, 1, 2), torch.from_numpy(boxes))
  rcnn_transform = transform.GeneralizedRCNNTransform(800, 1333, [0.0] * 3, [1.0] * 3).eval()
  [theirs] = rcnn_transform.postprocess(
      [{"boxes": torch.from_numpy(boxes), "masks": torch.from_numpy(mask_probs)[:, None],
        "keypoints": their_keypoints}], [resized], [original])
  assert_torch_equal(original_boxes, theirs["boxes"])
  assert_torch_equal(masks, theirs["masks"][:, 0])
  assert_torch_equal(keypoints, theirs["keypoints"])


def test_postprocess_rejects_bad_arguments():
  boxes = np.zeros((2, 4), np.float32)
  with pytest.raises(ValueError, match="image_size must be"):
    postprocess.paste_masks(np.zeros((2, 28, 28)), boxes, (0, 10))
  with pytest.raises(ValueError, match="masks must be"):
    postprocess.paste_masks(np.zeros((3, 28, 28)), boxes, (10, 10))
  with pytest.raises(ValueError, match="padding must be"):
    postprocess.paste_masks(np.zeros((2, 28, 28)), boxes, (10, 10), padding=-1)
  with pytest.raises(ValueError, match="boxes must be"):
    postprocess.resize_boxes(np.zeros((2, 5)), (10, 10), (20, 20))
  with pytest.raises(ValueError, match="from_size must be"):
    postprocess.resize_keypoints(np.zeros((2, 17, 3)), (10.5, 10), (20, 20))
  with pytest.raises(ValueError, match="keypoints must be"):
    postprocess.resize_keypoints(np.zeros((2, 17)), (10, 10), (20, 20))
  with pytest.raises(ValueError, match="heatmaps must be"):
    postprocess.heatmaps_to_keypoints(np.zeros((3, 56, 56, 17)), boxes)
  with pytest.raises(ValueError, match="finite"):
    postprocess.heatmaps_to_keypoints(np.full((2, 56, 56, 17), np.nan), boxes)


def empty_objects(num_keypoints: int) -> dict:
  """An image's ``objects`` without objects, as ``tfds.data_source`` returns them."""
  objects = {name: [] for name in ("bbox", "label", "category_id", "is_crowd", "area", "mask")}
  if num_keypoints:
    objects["keypoints"] = []
  return objects


@pytest.fixture(scope="module")
def shapes():
  """(examples, metadata): synthetic shapes (category ids remapped), a crowd, an empty image."""
  metadata = DetectionMetadata.create(shapes_detection.SHAPE_NAMES, SHAPE_CATEGORY_IDS)
  examples = []
  for index in range(6):
    rng = np.random.default_rng([7, index])
    image, objects = shapes_detection.make_shapes(rng, 96 + 32 * (index % 2), 128)
    objects["category_id"] = np.asarray(SHAPE_CATEGORY_IDS)[objects["label"]]
    examples.append({"image": image, "image_id": 100 + 3 * index, "objects": objects})
  examples[1]["objects"]["is_crowd"][0] = True
  examples.append({"image": np.zeros((64, 80, 3), np.uint8), "image_id": 7,
                   "objects": empty_objects(0)})
  return examples, metadata


@pytest.fixture(scope="module")
def figures():
  """(examples, metadata): synthetic stick figures with 7 keypoints, an empty image."""
  metadata = DetectionMetadata.create(("figure",), (1,), shapes_detection.KEYPOINT_NAMES,
                                      shapes_detection.SKELETON)
  examples = []
  for index in range(6):
    rng = np.random.default_rng([8, index])
    image, objects = shapes_detection.make_figures(rng, 128, 96 + 32 * (index % 2))
    examples.append({"image": image, "image_id": index + 1, "objects": objects})
  examples.append({"image": np.zeros((96, 96, 3), np.uint8), "image_id": 99,
                   "objects": empty_objects(metadata.num_keypoints)})
  return examples, metadata


@pytest.fixture(scope="module")
def people():
  """(examples, metadata): COCO's 17 person keypoints on hand-made boxes and masks."""
  metadata = DetectionMetadata.create(("person",), (1,), COCO_KEYPOINTS, COCO_SKELETON)
  rng = np.random.default_rng(9)
  examples = []
  for index in range(4):
    height, width = 120, 160
    masks, keypoints = [], []
    for _ in range(3):
      x1, y1 = rng.integers(0, 80), rng.integers(0, 50)
      mask = np.zeros((height, width), bool)
      mask[y1:y1 + rng.integers(30, 70), x1:x1 + rng.integers(20, 80)] = True
      rows, cols = np.nonzero(mask)
      points = np.stack([rng.uniform(cols.min(), cols.max() + 1, 17),
                         rng.uniform(rows.min(), rows.max() + 1, 17),
                         rng.integers(0, 3, 17)], axis=-1)
      points[points[:, 2] == 0, :2] = 0
      masks.append(mask)
      keypoints.append(points)
    objects = {"bbox": np.asarray([shapes_detection.tight_box(m) for m in masks], np.float32),
               "label": np.zeros(3, np.int64), "category_id": np.ones(3, np.int64),
               "is_crowd": np.zeros(3, bool),
               "area": np.asarray([m.sum() for m in masks], np.float32),
               "mask": [encode_mask(m) for m in masks],
               "keypoints": np.asarray(keypoints, np.float32)}
    examples.append({"image": np.zeros((height, width, 3), np.uint8), "image_id": 50 + index,
                     "objects": objects})
  return examples, metadata


def quiet_coco(dataset: dict) -> COCO:
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    coco.createIndex()
  return coco


def test_ground_truth_json_round_trips_through_pycocotools(shapes, figures):
  for examples, metadata in (shapes, figures):
    coco = quiet_coco(ground_truth_json(examples, metadata))
    assert sorted(coco.getImgIds()) == sorted(e["image_id"] for e in examples)
    for example in examples:
      height, width = example["image"].shape[:2]
      assert coco.imgs[example["image_id"]] == {"id": example["image_id"], "height": height,
                                                "width": width}
      objects = objects_as_arrays(example["objects"], metadata.num_keypoints)
      annotations = coco.loadAnns(coco.getAnnIds(imgIds=[example["image_id"]], iscrowd=None))
      assert len(annotations) == len(objects["label"])
      masks = decode_masks(objects["mask"], height, width)
      for i, annotation in enumerate(annotations):
        np.testing.assert_array_equal(coco.annToMask(annotation), masks[i])
        x1, y1, x2, y2 = objects["bbox"][i].tolist()
        np.testing.assert_allclose(annotation["bbox"], [x1, y1, x2 - x1, y2 - y1])
        assert annotation["category_id"] == metadata.category_ids[objects["label"][i]]
        assert annotation["iscrowd"] == int(objects["is_crowd"][i])
        assert annotation["area"] == objects["area"][i]
        if metadata.num_keypoints:
          points = objects["keypoints"][i]
          np.testing.assert_array_equal(annotation["keypoints"], points.reshape(-1))
          assert annotation["num_keypoints"] == (points[:, 2] > 0).sum()
    categories = coco.loadCats(coco.getCatIds())
    assert [c["id"] for c in categories] == list(metadata.category_ids)
    if metadata.num_keypoints:
      assert categories[0]["keypoints"] == list(metadata.keypoint_names)
      assert categories[0]["skeleton"] == [[a + 1, b + 1] for a, b in metadata.skeleton]
  assert quiet_coco(ground_truth_json(*shapes)).getAnnIds(iscrowd=True)


def test_ground_truth_json_rejects_repeated_images_and_unknown_categories(shapes):
  examples, metadata = shapes
  with pytest.raises(ValueError, match="image id 100 appears twice"):
    ground_truth_json([examples[0], examples[0]], metadata)
  other = DetectionMetadata.create(shapes_detection.SHAPE_NAMES, (1, 2, 3))
  with pytest.raises(ValueError, match="are not the data set's"):
    ground_truth_json(examples[:1], other)


def detections_of(examples: list[dict], metadata: DetectionMetadata,
                  rng: np.random.Generator | None = None) -> list[dict]:
  """Per image: the ground truth's non-crowd objects as detections, jittered when `rng` is given.

  Returns dicts of arrays {image_id, boxes, scores, labels (1..K), masks, keypoints}.
  """
  detections = []
  for example in examples:
    height, width = example["image"].shape[:2]
    objects = objects_as_arrays(example["objects"], metadata.num_keypoints)
    keep = ~objects["is_crowd"]
    boxes = objects["bbox"][keep]
    masks = decode_masks(objects["mask"], height, width)[keep].astype(np.float32)
    labels = objects["label"][keep] + 1
    keypoints = objects.get("keypoints", np.zeros((len(keep), 0, 3), np.float32))[keep].copy()
    keypoints[..., 2] = 1
    scores = np.linspace(0.9, 0.5, len(boxes), dtype=np.float32)
    if rng is not None:
      boxes = boxes + rng.uniform(-4, 4, boxes.shape).astype(np.float32)
      masks = np.roll(masks, rng.integers(-3, 4, size=2), axis=(1, 2)) * 0.8
      keypoints[..., :2] += rng.uniform(-3, 3, keypoints[..., :2].shape).astype(np.float32)
      labels = np.where(rng.random(len(labels)) < 0.2, labels % len(metadata.category_ids) + 1,
                        labels)
      scores = rng.uniform(0.05, 1, len(boxes)).astype(np.float32)
      # A false positive with a duplicate's mask and keypoints, when there is something to copy.
      if len(boxes):
        boxes = np.concatenate([boxes, [[2, 3, 40, 50]]]).astype(np.float32)
        masks = np.concatenate([masks, masks[:1]])
        keypoints = np.concatenate([keypoints, keypoints[:1] + 5])
        labels = np.concatenate([labels, [1]])
        scores = np.concatenate([scores, [0.7]]).astype(np.float32)
    detections.append({"image_id": example["image_id"], "boxes": boxes, "scores": scores,
                       "labels": labels, "masks": masks,
                       "keypoints": keypoints if metadata.num_keypoints else None})
  return detections


def our_results(detections: list[dict], metadata: DetectionMetadata) -> list[dict]:
  return [record for d in detections
          for record in coco_results(d["image_id"], d["boxes"], d["scores"], d["labels"],
                                     metadata.category_ids, d["masks"], d["keypoints"])]


def torchvision_records(detections: list[dict], metadata: DetectionMetadata
                        ) -> dict[str, list[dict]]:
  """Result lists per IoU type as torchvision's references/detection/coco_eval.py writes them."""
  records = {"bbox": [], "segm": [], "keypoints": []}
  for d in detections:
    boxes = torch.from_numpy(d["boxes"])
    x1, y1, x2, y2 = boxes.unbind(1)
    xywh = torch.stack((x1, y1, x2 - x1, y2 - y1), dim=1).tolist()
    scores = torch.from_numpy(d["scores"]).tolist()
    categories = [metadata.category_ids[label - 1] for label in d["labels"].tolist()]
    masks = torch.from_numpy(d["masks"])[:, None] > 0.5
    rles = [mask_utils.encode(np.array(mask[0, :, :, np.newaxis], dtype=np.uint8, order="F"))[0]
            for mask in masks]
    for rle in rles:
      rle["counts"] = rle["counts"].decode("utf-8")
    for k in range(len(xywh)):
      base = {"image_id": d["image_id"], "category_id": categories[k], "score": scores[k]}
      records["bbox"].append({**base, "bbox": xywh[k]})
      records["segm"].append({**base, "segmentation": rles[k]})
      if d["keypoints"] is not None:
        flat = torch.from_numpy(d["keypoints"]).flatten(start_dim=1).tolist()
        records["keypoints"].append({**base, "keypoints": flat[k]})
  return records


def pycocotools_stats(ground_truth: dict, records: list[dict], iou_type: str,
                      sigmas: tuple[float, ...] | None = None) -> np.ndarray:
  """COCOeval's stats, called as torchvision's CocoEvaluator calls it."""
  coco_gt = quiet_coco(ground_truth)
  with contextlib.redirect_stdout(io.StringIO()):
    coco_dt = coco_gt.loadRes(copy.deepcopy(records)) if records else COCO()
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    if sigmas is not None:
      evaluator.params.kpt_oks_sigmas = np.asarray(sigmas)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return evaluator.stats


def named(prefix: str, stats: np.ndarray, keypoints: bool = False) -> dict[str, float]:
  names = KEYPOINT_STATS if keypoints else DETECTION_STATS
  return {f"{prefix}_{name}": float(value) for name, value in zip(names, stats)}


def test_coco_results_writes_torchvisions_records(shapes, figures):
  for examples, metadata in (shapes, figures):
    detections = detections_of(examples, metadata, np.random.default_rng(10))
    ours = our_results(detections, metadata)
    theirs = torchvision_records(detections, metadata)
    for iou_type, field in (("bbox", "bbox"), ("segm", "segmentation"),
                            ("keypoints", "keypoints")):
      if theirs[iou_type]:
        assert [{k: r[k] for k in ("image_id", "category_id", "score", field)}
                for r in ours] == theirs[iou_type]
    assert isinstance(ours[0]["segmentation"]["counts"], str)


def test_coco_results_thresholds_masks_and_maps_labels():
  masks = np.zeros((2, 4, 5), np.float32)
  masks[0, 1, 2], masks[0, 2, 2], masks[1, 3, 4] = 0.5, 0.51, 1.0
  keypoints = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
  records = coco_results(4, np.array([[1, 2, 4, 6], [0.5, 0, 1, 1]]), np.array([0.9, 0.2]),
                         np.array([2, 1]), (11, 22), masks, keypoints)
  assert [r["category_id"] for r in records] == [22, 11]
  assert records[0]["bbox"] == [1, 2, 3, 4] and records[1]["bbox"] == [0.5, 0, 0.5, 1]
  decoded = mask_utils.decode([r["segmentation"] for r in records])
  np.testing.assert_array_equal(np.moveaxis(decoded, -1, 0), masks > 0.5)
  assert records[1]["keypoints"] == keypoints[1].reshape(-1).tolist()
  assert coco_results(4, np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), (11,),
                      np.zeros((0, 4, 5)), np.zeros((0, 3, 3))) == []
  with pytest.raises(ValueError, match=r"labels \[0, 3\] are not in 1..2"):
    coco_results(4, np.zeros((3, 4)), np.zeros(3), np.array([0, 3, 1]), (11, 22))
  with pytest.raises(ValueError, match="masks must be"):
    coco_results(4, np.zeros((2, 4)), np.zeros(2), np.array([1, 1]), (11,), np.zeros((1, 4, 5)))


def test_perfect_detections_score_one(shapes, figures, people):
  examples, metadata = shapes
  metrics = evaluate(ground_truth_json(examples, metadata),
                     our_results(detections_of(examples, metadata), metadata))
  for prefix in ("box", "mask"):
    assert metrics[f"{prefix}_AP"] == metrics[f"{prefix}_AP50"] == 1.0
    assert metrics[f"{prefix}_AR100"] == 1.0
  examples, metadata = figures
  metrics = evaluate(ground_truth_json(examples, metadata),
                     our_results(detections_of(examples, metadata), metadata),
                     ("bbox", "segm", "keypoints"), keypoint_sigmas=FIGURE_SIGMAS)
  assert metrics["box_AP"] == metrics["mask_AP"] == metrics["keypoint_AP"] == 1.0
  examples, metadata = people  # pycocotools' own sigmas of COCO's 17 keypoints
  metrics = evaluate(ground_truth_json(examples, metadata),
                     our_results(detections_of(examples, metadata), metadata), "keypoints")
  assert metrics["keypoint_AP"] == metrics["keypoint_AR"] == 1.0


def test_evaluate_equals_pycocotools_called_directly(shapes, figures, people):
  rng = np.random.default_rng(11)
  for (examples, metadata), iou_types, sigmas in [
      (shapes, ("bbox", "segm"), None),
      (figures, ("bbox", "segm", "keypoints"), FIGURE_SIGMAS),
      (people, ("keypoints",), None)]:
    ground_truth = ground_truth_json(examples, metadata)
    detections = detections_of(examples, metadata, rng)
    metrics = evaluate(ground_truth, our_results(detections, metadata), iou_types,
                       keypoint_sigmas=sigmas)
    records = torchvision_records(detections, metadata)
    expected = {}
    for iou_type in iou_types:
      prefix = {"bbox": "box", "segm": "mask", "keypoints": "keypoint"}[iou_type]
      stats = pycocotools_stats(ground_truth, records[iou_type], iou_type, sigmas)
      expected.update(named(prefix, stats, iou_type == "keypoints"))
    assert metrics == expected
    assert all(0 < metrics[f"{p}_AP"] < 1 for p in ("box", "mask", "keypoint")
               if f"{p}_AP" in metrics)


def test_evaluate_on_a_subset_of_images(shapes):
  examples, metadata = shapes
  ground_truth = ground_truth_json(examples, metadata)
  detections = detections_of(examples, metadata, np.random.default_rng(12))
  subset = [e["image_id"] for e in examples[:3]]
  metrics = evaluate(ground_truth, our_results(detections[:3], metadata), ("bbox",),
                     image_ids=subset)
  part = {**ground_truth, "images": [i for i in ground_truth["images"] if i["id"] in subset],
          "annotations": [a for a in ground_truth["annotations"] if a["image_id"] in subset]}
  expected = pycocotools_stats(part, torchvision_records(detections[:3], metadata)["bbox"], "bbox")
  assert metrics == named("box", expected)


def test_evaluate_without_results_reports_what_pycocotools_does(figures):
  examples, metadata = figures
  ground_truth = ground_truth_json(examples, metadata)
  metrics = evaluate(ground_truth, [], ("bbox", "segm", "keypoints"),
                     keypoint_sigmas=FIGURE_SIGMAS)
  expected = {**named("box", pycocotools_stats(ground_truth, [], "bbox")),
              **named("mask", pycocotools_stats(ground_truth, [], "segm")),
              **named("keypoint", pycocotools_stats(ground_truth, [], "keypoints",
                                                    FIGURE_SIGMAS), True)}
  assert metrics == expected
  assert metrics["box_AP"] == metrics["keypoint_AP"] == 0.0
  assert set(metrics.values()) <= {0.0, -1.0}


def test_evaluate_reads_an_annotation_file_and_leaves_its_input_alone(shapes, tmp_path):
  examples, metadata = shapes
  ground_truth = ground_truth_json(examples, metadata)
  untouched = copy.deepcopy(ground_truth)
  results = our_results(detections_of(examples, metadata, np.random.default_rng(13)), metadata)
  from_dict = evaluate(ground_truth, results)
  assert ground_truth == untouched
  path = tmp_path / "ground_truth.json"
  path.write_text(json.dumps(ground_truth))
  assert evaluate(str(path), results) == from_dict


def test_evaluate_rejects_bad_arguments(shapes, figures):
  examples, metadata = shapes
  ground_truth = ground_truth_json(examples, metadata)
  results = our_results(detections_of(examples, metadata), metadata)
  with pytest.raises(ValueError, match="each must be one of"):
    evaluate(ground_truth, results, ("bbox", "boxes"))
  with pytest.raises(ValueError, match="needs a 'keypoints'"):
    evaluate(ground_truth, results, ("keypoints",))
  with pytest.raises(ValueError, match=r"image ids \[12345\] are not in the ground truth"):
    evaluate(ground_truth, [{**results[0], "image_id": 12345}])
  with pytest.raises(ValueError, match=r"image ids \[1\] are not in the ground truth"):
    evaluate(ground_truth, results, image_ids=[1])
  examples, metadata = figures
  ground_truth = ground_truth_json(examples, metadata)
  results = our_results(detections_of(examples, metadata), metadata)
  with pytest.raises(ValueError, match="7 keypoints, pycocotools' OKS sigmas are COCO's 17"):
    evaluate(ground_truth, results, ("keypoints",))
  with pytest.raises(ValueError, match="keypoint_sigmas has 17 values"):
    evaluate(ground_truth, results, ("keypoints",), keypoint_sigmas=[0.05] * 17)
