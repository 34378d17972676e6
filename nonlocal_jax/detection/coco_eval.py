"""COCO evaluation of detections with pycocotools, as torchvision's detection reference does it.

* :func:`coco_results`: one image's detections (original-image boxes, and
  masks / keypoints from :mod:`nonlocal_jax.detection.postprocess`) as COCO
  result records.
* :func:`ground_truth_json`: a COCO-format ground truth of a data set's
  examples (:mod:`nonlocal_jax.data.detection_features`), for the generated
  data sets, which have no annotation file.
* :func:`evaluate`: pycocotools' ``COCOeval`` per IoU type, its ``stats`` as
  named metrics.

The result records follow torchvision's ``references/detection/coco_eval.py``
(``prepare_for_coco_detection`` / ``_segmentation`` / ``_keypoint``): boxes
[x, y, w, h], masks binarised with ``> 0.5`` and written as compressed RLE
with the counts decoded to str, keypoints flattened (x, y, 1) per keypoint
(the visibility is torchvision's constant 1; COCOeval ignores it), and the
box score as the score of all three. One record here carries all of a
detection's fields; :func:`evaluate` hands pycocotools, per IoU type, only
the field torchvision's records of that type have, as ``COCO.loadRes``
derives a segmentation's area and box from its mask and a keypoint
detection's from its keypoints only when the record has no box (the area
decides the small / medium / large ranges).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from nonlocal_jax.data.detection_features import DetectionMetadata, objects_as_arrays

IOU_TYPES = ("bbox", "segm", "keypoints")
# Names of COCOeval.stats, in order (pycocotools cocoeval.py _summarizeDets / _summarizeKps).
DETECTION_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
                   "ARm", "ARl")
KEYPOINT_STATS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
# Metric name prefix and the result field each IoU type evaluates.
METRIC_PREFIX = {"bbox": "box", "segm": "mask", "keypoints": "keypoint"}
RESULT_FIELD = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}
# pycocotools' default OKS sigmas (cocoeval.py Params.setKpParams) are COCO's 17 person keypoints.
COCO_NUM_KEYPOINTS = 17


def coco_results(image_id: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                 category_ids: Sequence[int], masks: np.ndarray | None = None,
                 keypoints: np.ndarray | None = None) -> list[dict]:
  """One image's detections as COCO result records.

  Args:
    image_id: the image's COCO id.
    boxes: (D, 4) boxes (x1, y1, x2, y2) in the original image's pixels.
    scores: (D,) box scores.
    labels: (D,) the model's labels 1..K (0 is the background, never a
      detection).
    category_ids: label l is written as category ``category_ids[l - 1]``:
      pass ``DetectionMetadata.category_ids``, which lists the data set's
      category of each of its labels 0..K-1, when the model's label l is the
      data set's label l - 1; pass ``range(1, 91)`` for torchvision's 91-class
      COCO models, whose labels are COCO's ids.
    masks: (D, H, W) pasted mask probabilities (or binary masks) of the
      original image; binarised with ``> 0.5``.
    keypoints: (D, K, 3) keypoints (x, y, v) in the original image's pixels.

  Returns:
    D dicts {'image_id', 'category_id', 'score', 'bbox' [x, y, w, h]} plus
    'segmentation' (RLE {'size': [H, W], 'counts': str}) with `masks` and
    'keypoints' (3K floats) with `keypoints`.
  """
  boxes = np.asarray(boxes, np.float32)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"boxes must be (D, 4) (x1, y1, x2, y2), got shape {boxes.shape}")
  num = len(boxes)
  scores = np.asarray(scores, np.float32)
  labels = np.asarray(labels)
  if scores.shape != (num,) or labels.shape != (num,):
    raise ValueError(f"scores and labels must be ({num},), one per box, got shapes "
                     f"{scores.shape} and {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers 1..{len(category_ids)}, got dtype {labels.dtype}")
  bad = sorted(set(labels[(labels < 1) | (labels > len(category_ids))].tolist()))
  if bad:
    raise ValueError(f"labels {bad} are not in 1..{len(category_ids)} (label l is category "
                     f"category_ids[l - 1] of {len(category_ids)} category ids)")
  # torchvision coco_eval.py convert_to_xywh, in float32.
  xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
  records = [{"image_id": int(image_id), "category_id": int(category_ids[label - 1]),
              "bbox": box, "score": score}
             for label, box, score in zip(labels.tolist(), xywh.tolist(), scores.tolist())]
  if masks is not None:
    masks = np.asarray(masks)
    if masks.ndim != 3 or len(masks) != num:
      raise ValueError(f"masks must be (D, H, W) with D = {num} boxes, got shape {masks.shape}")
    if num:
      binary = np.asfortranarray(np.moveaxis(masks > 0.5, 0, -1).astype(np.uint8))
      for record, rle in zip(records, mask_utils.encode(binary)):
        record["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("utf-8")}
  if keypoints is not None:
    keypoints = np.asarray(keypoints, np.float32)
    if keypoints.ndim != 3 or keypoints.shape[0] != num or keypoints.shape[2] != 3:
      raise ValueError(f"keypoints must be (D, K, 3) (x, y, v) with D = {num} boxes, got shape "
                       f"{keypoints.shape}")
    for record, flat in zip(records, keypoints.reshape(num, 3 * keypoints.shape[1]).tolist()):
      record["keypoints"] = flat
  return records


def ground_truth_json(examples: Iterable[Mapping], metadata: DetectionMetadata) -> dict:
  """A COCO-format ground truth of a data set's examples, for pycocotools.

  Args:
    examples: examples of :mod:`nonlocal_jax.data.detection_features`
      (decoded: 'image' an (H, W, 3) array, 'image_id', 'objects' as
      ``tfds.data_source`` or ``tfds.as_numpy`` returns them).
    metadata: the data set's :class:`DetectionMetadata`.

  Returns:
    {'images': [{'id', 'height', 'width'}], 'annotations': [...],
    'categories': [...]}: an annotation per object with a 1-based 'id',
    'image_id', 'category_id', 'bbox' [x, y, w, h], 'area', 'iscrowd',
    'segmentation' (compressed RLE, counts as str) and, for keypoint data
    sets, 'keypoints' (3K numbers) and 'num_keypoints' (keypoints with v > 0);
    a category per class with 'id' and 'name' and, for keypoint data sets,
    the keypoint names and the 1-indexed 'skeleton' (COCO's JSON convention).
  """
  images, annotations, seen = [], [], set()
  known = set(metadata.category_ids)
  for example in examples:
    image_id = int(example["image_id"])
    if image_id in seen:
      raise ValueError(f"image id {image_id} appears twice; COCO image ids are unique")
    seen.add(image_id)
    height, width = (int(side) for side in np.shape(example["image"])[:2])
    images.append({"id": image_id, "height": height, "width": width})
    objects = objects_as_arrays(example["objects"], metadata.num_keypoints)
    unknown = sorted(set(objects["category_id"].tolist()) - known)
    if unknown:
      raise ValueError(f"image {image_id}: category ids {unknown} are not the data set's "
                       f"{list(metadata.category_ids)}")
    box = objects["bbox"]
    xywh = np.concatenate([box[:, :2], box[:, 2:] - box[:, :2]], axis=1)
    for i in range(len(box)):
      counts = objects["mask"][i]
      annotation = {
          "id": len(annotations) + 1, "image_id": image_id,
          "category_id": int(objects["category_id"][i]), "bbox": xywh[i].tolist(),
          "area": float(objects["area"][i]), "iscrowd": int(objects["is_crowd"][i]),
          "segmentation": {"size": [height, width],
                           "counts": counts.decode("ascii") if isinstance(counts, bytes)
                           else str(counts)}}
      if "keypoints" in objects:
        points = objects["keypoints"][i]
        annotation["keypoints"] = points.reshape(-1).tolist()
        annotation["num_keypoints"] = int((points[:, 2] > 0).sum())
      annotations.append(annotation)
  categories = []
  for name, category_id in zip(metadata.class_names, metadata.category_ids):
    category = {"id": category_id, "name": name}
    if metadata.num_keypoints:
      category["keypoints"] = list(metadata.keypoint_names)
      category["skeleton"] = [[a + 1, b + 1] for a, b in metadata.skeleton]
    categories.append(category)
  return {"images": images, "annotations": annotations, "categories": categories}


def _typed_results(results: Sequence[Mapping], iou_type: str) -> list[dict]:
  """The records pycocotools evaluates for `iou_type`: torchvision's fields of that type only."""
  field = RESULT_FIELD[iou_type]
  missing = [i for i, record in enumerate(results) if field not in record]
  if missing:
    raise ValueError(f"iou type {iou_type!r} needs a {field!r} in every result; results "
                     f"{missing[:5]}{' ...' if len(missing) > 5 else ''} have none (pass masks / "
                     "keypoints to coco_results)")
  return [{"image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"],
           field: r[field]} for r in results]


def _keypoint_count(coco_gt: COCO) -> int:
  counts = {len(c["keypoints"]) for c in coco_gt.dataset["categories"] if "keypoints" in c}
  if len(counts) != 1:
    raise ValueError("iou type 'keypoints' needs ground-truth categories with one number of "
                     f"'keypoints' names; their counts are {sorted(counts)}")
  return counts.pop()


def evaluate(ground_truth: Mapping | str | os.PathLike, results: Sequence[Mapping],
             iou_types: Sequence[str] = ("bbox", "segm"),
             image_ids: Iterable[int] | None = None,
             keypoint_sigmas: Sequence[float] | None = None) -> dict[str, float]:
  """COCO AP / AR of `results` against `ground_truth`, with pycocotools, quietly.

  As torchvision's ``CocoEvaluator``: the ground truth is copied (COCOeval
  writes into its annotations), each IoU type is evaluated with ``COCOeval``
  (``evaluate``, ``accumulate``, ``summarize``) on the images `image_ids`
  (sorted), and no results at all are an empty ``COCO()`` (``loadRes``
  rejects an empty list): every AP / AR is then 0, or -1 where the ground
  truth has no object of that area range, as pycocotools reports.

  Args:
    ground_truth: a COCO-format dict (e.g. :func:`ground_truth_json`) or the
      path of a COCO annotation file.
    results: records of :func:`coco_results` (all images).
    iou_types: some of 'bbox', 'segm', 'keypoints' (or one of them).
    image_ids: the images evaluated; default all the ground truth's. Their
      results must be in `results` (a subset's results may be passed alone).
    keypoint_sigmas: OKS sigma per keypoint; required unless the keypoints
      are COCO's 17 (pycocotools' sigmas).

  Returns:
    {'box_AP', 'box_AP50', 'box_AP75', 'box_APs', 'box_APm', 'box_APl',
    'box_AR1', 'box_AR10', 'box_AR100', 'box_ARs', 'box_ARm', 'box_ARl'} for
    'bbox', the same with 'mask_' for 'segm', and 'keypoint_' + 'AP', 'AP50',
    'AP75', 'APm', 'APl', 'AR', 'AR50', 'AR75', 'ARm', 'ARl' for
    'keypoints'; AP / AR in [0, 1], -1 when undefined.
  """
  if isinstance(iou_types, str):
    iou_types = (iou_types,)
  unknown = [t for t in iou_types if t not in IOU_TYPES]
  if unknown or not iou_types:
    raise ValueError(f"iou_types {list(iou_types)!r}: each must be one of {IOU_TYPES}")
  with contextlib.redirect_stdout(io.StringIO()):
    if isinstance(ground_truth, Mapping):
      coco_gt = COCO()
      coco_gt.dataset = copy.deepcopy(dict(ground_truth))
      coco_gt.createIndex()
    else:
      coco_gt = COCO(os.fspath(ground_truth))
  all_ids = set(coco_gt.getImgIds())
  if not all_ids:
    raise ValueError("the ground truth has no images")
  evaluated = sorted(all_ids if image_ids is None else {int(i) for i in image_ids})
  outside = sorted(set(evaluated) - all_ids)
  stray = sorted({int(r["image_id"]) for r in results} - all_ids)
  if outside or stray:
    raise ValueError(f"image ids {(outside + stray)[:10]} are not in the ground truth's "
                     f"{len(all_ids)} images")
  metrics = {}
  for iou_type in iou_types:
    typed = _typed_results(results, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
      coco_dt = coco_gt.loadRes(typed) if typed else COCO()
      evaluator = COCOeval(coco_gt, coco_dt, iou_type)
      evaluator.params.imgIds = evaluated
      if iou_type == "keypoints":
        num_keypoints = _keypoint_count(coco_gt)
        if keypoint_sigmas is not None:
          if len(keypoint_sigmas) != num_keypoints:
            raise ValueError(f"keypoint_sigmas has {len(keypoint_sigmas)} values; the ground "
                             f"truth has {num_keypoints} keypoints")
          evaluator.params.kpt_oks_sigmas = np.asarray(keypoint_sigmas, np.float64)
        elif num_keypoints != COCO_NUM_KEYPOINTS:
          raise ValueError(f"the ground truth has {num_keypoints} keypoints, pycocotools' OKS "
                           f"sigmas are COCO's {COCO_NUM_KEYPOINTS}: pass keypoint_sigmas")
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
    names = KEYPOINT_STATS if iou_type == "keypoints" else DETECTION_STATS
    prefix = METRIC_PREFIX[iou_type]
    metrics.update({f"{prefix}_{name}": float(value)
                    for name, value in zip(names, evaluator.stats)})
  return metrics
