"""Detection, instance segmentation and keypoints (Mask R-CNN / Keypoint R-CNN).

The model computes its own losses from the targets in training
(``MaskRCNN.losses``); evaluation runs ``MaskRCNN.detect``, copies the fixed-size
detections to the host and scores them with the COCO evaluator (pycocotools)
against the eval split: its original annotation file for COCO, a ground truth
written from the examples for our generated sets. Box AP always, mask AP with
a mask head, keypoint AP with a keypoint head.

Batches: ``inputs`` (B, H, W, 3); ``label`` the detection modality's targets
dict (:mod:`nonlocal_jax.preprocessing.detection`); ``mask`` (B,).
"""


from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics
from flax import nnx

from nonlocal_jax.detection import coco_eval, postprocess
from nonlocal_jax.tasks.base import Task

# COCO's OKS sigmas (pycocotools cocoeval.py Params.setKpParams) by body part, so that
# data sets with other keypoints (our stick figures: head, hands, hips, feet) get the
# sigma of the nearest COCO part; COCO's own 17 keypoints get exactly pycocotools'.
_SIGMA_BY_PART = {"nose": .026, "head": .026, "eye": .025, "ear": .035, "shoulder": .079,
                  "elbow": .072, "wrist": .062, "hand": .062, "hip": .107, "knee": .087,
                  "ankle": .089, "foot": .089}


def keypoint_sigmas(names: tuple[str, ...]) -> np.ndarray:
  """OKS sigmas of keypoints named like COCO's ('left_wrist') or our figures' ('left_hand')."""
  parts = [name.removeprefix("left_").removeprefix("right_") for name in names]
  unknown = [name for name, part in zip(names, parts) if part not in _SIGMA_BY_PART]
  if unknown:
    raise ValueError(f"no OKS sigma for keypoints {unknown}; known parts: "
                     f"{sorted(_SIGMA_BY_PART)}")
  return np.array([_SIGMA_BY_PART[part] for part in parts])


@flax.struct.dataclass
class DetectionEvalMetrics(metrics.Collection):
  """Averaged over the eval images: how many detections pass the score threshold."""
  detections_per_image: metrics.Average.from_output("detections_per_image")


class DetectionTask(Task):
  """Losses from the model, COCO metrics from the host."""

  num_classes_from_labels = False  # the classes are the data set's objects' ClassLabel

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.config = config
    kwargs = config.model.kwargs
    self.loss_names = ["loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"]
    self.loss_names += ["loss_mask"] * bool(kwargs.masks)
    self.loss_names += ["loss_keypoint"] * bool(kwargs.num_keypoints)
    self.train_collection = metrics.Collection.create(
        loss=metrics.Average.from_output("loss"),
        learning_rate=metrics.LastValue.from_output("learning_rate"),
        **{name: metrics.Average.from_output(name) for name in self.loss_names})
    self._reference = None  # (metadata, ground truth) of the eval split, read once

  # -- training ---------------------------------------------------------------

  def train_outputs(self, model: nnx.Module, batch: dict) -> dict[str, jax.Array]:
    return model.losses(batch["inputs"], batch["label"])

  def loss(self, outputs: dict[str, jax.Array], batch: dict) -> jax.Array:
    """The sum of the model's losses (torchvision's training reference sums them)."""
    del batch
    return sum(outputs[name] for name in self.loss_names)

  def train_metrics(self, outputs: dict[str, jax.Array], batch: dict, loss: jax.Array,
                    learning_rate: jax.Array) -> metrics.Collection:
    del batch
    return self.train_collection.single_from_model_output(
        loss=loss, learning_rate=learning_rate, **{k: outputs[k] for k in self.loss_names})

  # -- evaluation -------------------------------------------------------------

  def eval_outputs(self, forward: Callable, model: nnx.Module, batch: dict) -> Any:
    del forward  # one view per image; the detector has its own inference forward
    return model.detect(batch["inputs"], batch["label"]["image_size"])

  def eval_metrics(self, outputs: dict[str, jax.Array],
                   batch: dict) -> tuple[metrics.Collection, dict]:
    targets = batch["label"]
    count = outputs["valid"].sum(axis=1).astype(jnp.float32)
    collection = DetectionEvalMetrics.single_from_model_output(detections_per_image=count,
                                                               mask=batch["mask"])
    collected = {**outputs, "mask": batch["mask"], "image_id": targets["image_id"],
                 "image_size": targets["image_size"], "original_size": targets["original_size"]}
    return collection, collected

  def host_metrics(self, collected: list[dict]) -> dict[str, float]:
    """COCO box (and mask / keypoint) AP of every eval image's detections."""
    metadata, ground_truth = self._eval_reference()
    results = []
    for batch in collected:
      for i in np.flatnonzero(batch["mask"]):
        results += self._image_results({k: v[i] for k, v in batch.items()}, metadata)
    iou_types = ("bbox",) + ("segm",) * bool(self.config.model.kwargs.masks)
    iou_types += ("keypoints",) * bool(self.config.model.kwargs.num_keypoints)
    sigmas = keypoint_sigmas(metadata.keypoint_names) if metadata.num_keypoints else None
    image_ids = sorted({int(b["image_id"][i]) for b in collected for i in np.flatnonzero(b["mask"])})
    return coco_eval.evaluate(ground_truth, results, iou_types, image_ids=image_ids,
                              keypoint_sigmas=sigmas)

  def _eval_reference(self) -> tuple:
    """(DetectionMetadata, the eval split's COCO-format ground truth), read on first use.

    The ground truth is the split's annotation file (COCO) or is built from its
    examples (our generated sets).
    """
    if self._reference is None:
      from nonlocal_jax import input_pipeline  # the task is built before any data exists
      from nonlocal_jax.data.detection_features import DetectionMetadata

      builder = input_pipeline.create_builder(self.config)
      metadata = DetectionMetadata.from_info(builder.info)
      split = self.config.eval_split
      if split in metadata.annotation_files:
        ground_truth = metadata.annotation_files[split]
      else:
        source = input_pipeline.data_source(builder, split)
        ground_truth = coco_eval.ground_truth_json((source[i] for i in range(len(source))),
                                                   metadata)
      self._reference = (metadata, ground_truth)
    return self._reference

  def _image_results(self, image: dict, metadata) -> list[dict]:
    """One image's valid detections in its original pixels, as COCO result records."""
    keep = image["valid"]
    original_boxes, masks, keypoints = postprocess.to_image_pixels(
        image["boxes"][keep], image["masks"][keep] if "masks" in image else None,
        image["keypoint_heatmaps"][keep] if "keypoint_heatmaps" in image else None,
        image["image_size"], image["original_size"])
    return coco_eval.coco_results(int(image["image_id"]), original_boxes, image["scores"][keep],
                                  image["labels"][keep], metadata.category_ids, masks=masks,
                                  keypoints=keypoints)
