"""Losses and metrics per task, chosen by ``config.task`` from :data:`TASKS`.

* ``classification`` (Kinetics, ImageNet, ...): softmax cross-entropy with
  optional label smoothing; top-1 / top-5 accuracy.
* ``multilabel`` (Charades): ``label`` is (B, K) multi-hot; per-class sigmoid
  cross-entropy; mAP.
* ``segmentation``: outputs are (logits, aux_logits); pixel cross-entropy
  ignoring ``ignore_label`` plus ``aux_loss_weight`` times the auxiliary
  loss; mIoU from the pixel confusion matrix.
* ``detection`` (COCO, our generated shapes): the detector's own losses;
  COCO box / mask / keypoint AP on the host.

Each is a :class:`Task` subclass (the interface is in :mod:`nonlocal_jax.tasks.base`).
"""

import ml_collections

from nonlocal_jax.tasks.base import Task
from nonlocal_jax.tasks.classification import ClassificationTask
from nonlocal_jax.tasks.detection import DetectionTask
from nonlocal_jax.tasks.multilabel import MultilabelTask
from nonlocal_jax.tasks.segmentation import SegmentationTask

TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "multilabel": MultilabelTask,
    "segmentation": SegmentationTask,
    "detection": DetectionTask,
}


def create_task(config: ml_collections.ConfigDict) -> Task:
  """The task named by ``config.task``, with its settings from `config`."""
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r} is not one of {tuple(TASKS)}")
  return TASKS[config.task](config)


__all__ = ["TASKS", "Task", "create_task"]
