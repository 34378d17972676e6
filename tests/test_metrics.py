"""Metrics against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from nonlocal_jax.metrics import ConfusionMatrix, MeanAveragePrecision, mean_iou, top_k_accuracy
from nonlocal_jax.tasks.classification import ClassificationEvalMetrics


def test_top1_top5_with_mask():
  logits = jnp.array([
      [0.0, 1, 2, 3, 4, 5, 6],  # label 6: top-1 hit
      [6.0, 5, 4, 3, 2, 1, 0],  # label 4: rank 5 -> top-5 hit only
      [6.0, 5, 4, 3, 2, 1, 0],  # label 6: rank 7 -> miss
      [0.0, 0, 0, 0, 0, 0, 9],  # masked out
  ])
  labels = jnp.array([6, 4, 6, 0])
  mask = jnp.array([1, 1, 1, 0])
  got = ClassificationEvalMetrics.single_from_model_output(
      loss=jnp.zeros(4), logits=logits, labels=labels, mask=mask).compute()
  assert float(got["accuracy"]) == pytest.approx(1 / 3)
  assert float(got["top5_accuracy"]) == pytest.approx(2 / 3)
  top2 = top_k_accuracy(2).from_model_output(logits=logits, labels=labels, mask=mask).compute()
  assert float(top2) == pytest.approx(1 / 3)


def test_mean_average_precision_by_hand():
  scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.6]])
  targets = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
  # class 0: ranking 0.9(+), 0.8(-), 0.3(+), 0.1(-): AP = (1/1 + 2/3) / 2 = 5/6
  # class 1: ranking 0.7(+), 0.6(-), 0.2(-), 0.1(-): AP = 1
  metric = MeanAveragePrecision.from_model_output(
      scores=scores[:2], targets=targets[:2], mask=np.ones(2)).merge(
          MeanAveragePrecision.from_model_output(
              scores=np.concatenate([scores[2:], [[5.0, 5.0]]]),
              targets=np.concatenate([targets[2:], [[0, 0]]]), mask=np.array([1, 1, 0])))
  assert metric.compute() == pytest.approx((5 / 6 + 1) / 2)


def test_mean_iou_ignores_label_and_masked_images():
  # 2 classes, 1 image of 2x3 pixels and one masked image.
  labels = np.array([[[0, 0, 1], [1, 255, 1]], [[0, 0, 0], [0, 0, 0]]])
  predicted = np.array([[[0, 1, 1], [1, 0, 0]], [[1, 1, 1], [1, 1, 1]]])
  logits = np.eye(2)[predicted] * 5.0
  metric = ConfusionMatrix.from_model_output(logits=jnp.asarray(logits), labels=jnp.asarray(labels),
                                             mask=jnp.array([1, 0]))
  # valid pixels of image 0 (true, pred): (0,0) (0,1) (1,1) (1,1) (1,0)
  np.testing.assert_array_equal(np.asarray(metric.matrix), [[1, 1], [1, 2]])
  # IoU0 = 1 / (1 + 1 + 1) ; IoU1 = 2 / (2 + 1 + 1)
  assert metric.compute() == pytest.approx((1 / 3 + 2 / 4) / 2)
  assert metric.merge(metric).compute() == pytest.approx(metric.compute())


def test_mean_iou_skips_absent_classes():
  assert mean_iou(np.array([[3, 0, 0], [0, 0, 0], [0, 0, 1]])) == pytest.approx(1.0)
