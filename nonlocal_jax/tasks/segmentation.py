"""Semantic segmentation: pixel cross-entropy ignoring ``ignore_label`` plus ``aux_loss_weight``
times the loss of the auxiliary FCNHead (:mod:`nonlocal_jax.models.segmentation`); mIoU from the
pixel confusion matrix."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics

from nonlocal_jax.metrics import ConfusionMatrix
from nonlocal_jax.tasks.base import Task


@flax.struct.dataclass
class SegmentationEvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  mean_iou: ConfusionMatrix


def _pixel_xent(logits: jax.Array, labels: jax.Array, ignore_label: int) -> tuple[jax.Array,
                                                                                   jax.Array]:
  """Per-image summed cross-entropy over valid pixels (B,) and valid-pixel counts (B,).

  logits (B, H, W, K), labels (B, H, W).
  """
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  xent = jnp.where(valid, xent, 0.0)
  count = valid.sum(axis=(1, 2))
  return xent.sum(axis=(1, 2)), count


class SegmentationTask(Task):
  """Train outputs are (logits, aux_logits or None), each (B, H, W, K); ``label`` is (B, H, W).

  Eval outputs are that pair, or the logits alone after sliding-window inference
  (:func:`nonlocal_jax.models.segmentation.slide_inference`).
  """

  num_classes_from_labels = False  # labels are (H, W) maps: config.num_classes is set

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.ignore_label = config.ignore_label
    self.aux_loss_weight = config.aux_loss_weight

  def loss(self, outputs: tuple[jax.Array, jax.Array | None], batch: dict) -> jax.Array:
    """Mean over the valid pixels of the batch; the auxiliary loss uses the same count."""
    logits, aux_logits = outputs
    total, count = _pixel_xent(logits, batch["label"], self.ignore_label)
    loss = total.sum() / jnp.maximum(count.sum(), 1)
    if aux_logits is not None and self.aux_loss_weight:
      aux_total, _ = _pixel_xent(aux_logits, batch["label"], self.ignore_label)
      loss = loss + self.aux_loss_weight * aux_total.sum() / jnp.maximum(count.sum(), 1)
    return loss

  def eval_metrics(self, outputs: Any, batch: dict) -> tuple[metrics.Collection, dict]:
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    total, count = _pixel_xent(logits, batch["label"], self.ignore_label)
    loss = total / jnp.maximum(count, 1)
    return SegmentationEvalMetrics.single_from_model_output(
        loss=loss, logits=logits, labels=batch["label"], mask=batch["mask"]), {}
