"""Losses and metrics per task: single-label classification, multi-label, segmentation.

A task turns model outputs and a batch into the training loss and into clu
metric collections. Batches are dicts with ``inputs``, ``label`` and (eval)
``mask`` (B,); see :mod:`nonlocal_jax.input_pipeline`.

* ``classification`` (Kinetics, ImageNet, ...): softmax cross-entropy with
  optional label smoothing; top-1 / top-5 accuracy.
* ``multilabel`` (Charades): ``label`` is (B, K) multi-hot; per-class sigmoid
  cross-entropy; mAP.
* ``segmentation``: outputs are (logits, aux_logits); pixel cross-entropy
  ignoring ``ignore_label`` plus ``aux_loss_weight`` times the auxiliary
  loss; mIoU from the pixel confusion matrix.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics

from nonlocal_jax.metrics import ConfusionMatrix, MeanAveragePrecision, top_k_accuracy

TASKS = ("classification", "multilabel", "segmentation")


@flax.struct.dataclass
class ClassificationTrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  accuracy: metrics.Accuracy
  learning_rate: metrics.LastValue.from_output("learning_rate")


@flax.struct.dataclass
class ClassificationEvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  accuracy: metrics.Accuracy
  top5_accuracy: top_k_accuracy(5)


@flax.struct.dataclass
class LossMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  learning_rate: metrics.LastValue.from_output("learning_rate")


@flax.struct.dataclass
class MultilabelEvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")


@flax.struct.dataclass
class SegmentationEvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  mean_iou: ConfusionMatrix


def _softmax_xent(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _pixel_xent(logits: jax.Array, labels: jax.Array, ignore_label: int) -> tuple[jax.Array,
                                                                                   jax.Array]:
  """Per-image mean cross-entropy over valid pixels (B,) and valid-pixel counts (B,)."""
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  xent = jnp.where(valid, xent, 0.0)
  count = valid.sum(axis=(1, 2))
  return xent.sum(axis=(1, 2)), count


class Task:
  """Loss and metrics of one task, configured by the experiment config."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.name = config.task
    if self.name not in TASKS:
      raise ValueError(f"config.task={self.name!r} is not one of {TASKS}")
    self.label_smoothing = config.label_smoothing
    self.ignore_label = config.ignore_label
    self.aux_loss_weight = config.aux_loss_weight

  # -- training ---------------------------------------------------------------

  def loss(self, outputs: Any, batch: dict) -> jax.Array:
    """Scalar training loss, averaged over the global batch."""
    if self.name == "classification":
      return _softmax_xent(outputs, batch["label"], self.label_smoothing).mean()
    if self.name == "multilabel":
      return optax.sigmoid_binary_cross_entropy(outputs.astype(jnp.float32),
                                                batch["label"].astype(jnp.float32)).mean()
    logits, aux_logits = outputs
    total, count = _pixel_xent(logits, batch["label"], self.ignore_label)
    loss = total.sum() / jnp.maximum(count.sum(), 1)
    if aux_logits is not None and self.aux_loss_weight:
      aux_total, _ = _pixel_xent(aux_logits, batch["label"], self.ignore_label)
      loss = loss + self.aux_loss_weight * aux_total.sum() / jnp.maximum(count.sum(), 1)
    return loss

  def train_metrics(self, outputs: Any, batch: dict, loss: jax.Array,
                    learning_rate: jax.Array) -> metrics.Collection:
    if self.name == "classification":
      return ClassificationTrainMetrics.single_from_model_output(
          loss=loss, logits=outputs.astype(jnp.float32), labels=batch["label"],
          learning_rate=learning_rate)
    return LossMetrics.single_from_model_output(loss=loss, learning_rate=learning_rate)

  # -- evaluation -------------------------------------------------------------

  def eval_metrics(self, outputs: Any, batch: dict) -> tuple[metrics.Collection, dict]:
    """(jit-able metric collection, arrays for host-side metrics) of one eval batch.

    For classification, `outputs` are logits or log-probabilities (B, K).
    """
    mask = batch["mask"]
    if self.name == "classification":
      logits = outputs.astype(jnp.float32)
      loss = _softmax_xent(logits, batch["label"])
      return ClassificationEvalMetrics.single_from_model_output(
          loss=loss, logits=logits, labels=batch["label"], mask=mask), {}
    if self.name == "multilabel":
      logits = outputs.astype(jnp.float32)
      loss = optax.sigmoid_binary_cross_entropy(logits, batch["label"].astype(jnp.float32))
      collected = {"scores": jax.nn.sigmoid(logits), "targets": batch["label"], "mask": mask}
      return MultilabelEvalMetrics.single_from_model_output(loss=loss.mean(-1), mask=mask), collected
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    total, count = _pixel_xent(logits, batch["label"], self.ignore_label)
    loss = total / jnp.maximum(count, 1)
    return SegmentationEvalMetrics.single_from_model_output(
        loss=loss, logits=logits, labels=batch["label"], mask=mask), {}

  def host_metrics(self, collected: list[dict]) -> dict[str, float]:
    """Metrics that need every eval output at once (multi-label mAP)."""
    if self.name != "multilabel" or not collected:
      return {}
    total = MeanAveragePrecision.empty()
    for outputs in collected:
      total = total.merge(MeanAveragePrecision.from_model_output(**outputs))
    return {"mAP": total.compute()}
