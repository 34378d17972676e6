"""clu metrics for the three tasks: top-k accuracy, multi-label mAP and mIoU.

All take an optional ``mask`` (B,) so padded evaluation examples count zero
times. Metrics are merged across batches with ``merge`` and reduced across
devices by ``jax.jit`` (they are computed from global arrays).
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics


def top_k_accuracy(k: int) -> type[metrics.Average]:
  """Average of 'label among the k highest logits' (logits (B, K), labels (B,))."""
  def correct(logits: jax.Array, labels: jax.Array, **_) -> jax.Array:
    top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
    return jnp.any(top == labels[..., None], axis=-1).astype(jnp.float32)
  return metrics.Average.from_fun(correct)


@flax.struct.dataclass
class MeanAveragePrecision(metrics.CollectingMetric.from_outputs(("scores", "targets", "mask"))):
  """Multi-label mAP (Charades): mean over classes with a positive of the average precision.

  Collects (B, K) scores and {0,1} targets on the host (it cannot run inside
  ``jax.jit``: build it from the step's outputs with ``from_model_output``
  and merge in the Python loop). AP per class is the
  mean precision at the rank of every positive (as sklearn's
  average_precision_score, with ties broken by order).
  """

  def compute(self) -> float:
    values = super().compute()
    mask = values["mask"].astype(bool)
    return mean_average_precision(values["scores"][mask], values["targets"][mask])


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
  """scores, targets: (N, K). Classes with no positive are skipped."""
  aps = []
  for k in range(scores.shape[1]):
    positives = targets[:, k] > 0
    if not positives.any():
      continue
    order = np.argsort(-scores[:, k], kind="stable")
    hits = positives[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    aps.append(precision_at[hits].mean())
  return float(np.mean(aps)) if aps else float("nan")


@flax.struct.dataclass
class ConfusionMatrix(metrics.Metric):
  """Pixel confusion matrix (K, K) [true, predicted]; labels >= K (e.g. 255) are ignored.

  ``compute`` returns mean IoU over classes that occur (in labels or
  predictions), as mmseg does.
  """

  matrix: jax.Array

  @classmethod
  def from_model_output(cls, *, logits: jax.Array, labels: jax.Array,
                        mask: jax.Array | None = None, **_) -> "ConfusionMatrix":
    num_classes = logits.shape[-1]
    predictions = jnp.argmax(logits, axis=-1).reshape(-1)
    labels = labels.reshape(-1)
    valid = (labels >= 0) & (labels < num_classes)
    if mask is not None:
      per_pixel = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (logits.ndim - 2)),
                                   logits.shape[:-1])
      valid = valid & per_pixel.reshape(-1).astype(bool)
    index = jnp.where(valid, labels * num_classes + predictions, 0)
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(valid.astype(jnp.int32))
    return cls(matrix=counts.reshape(num_classes, num_classes))

  def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
    return type(self)(matrix=self.matrix + other.matrix)

  def reduce(self) -> "ConfusionMatrix":
    return type(self)(matrix=self.matrix.sum(axis=0) if self.matrix.ndim == 3 else self.matrix)

  def compute(self) -> float:
    return mean_iou(np.asarray(self.matrix))


def mean_iou(matrix: np.ndarray) -> float:
  """Mean over present classes of TP / (TP + FP + FN) from a [true, predicted] matrix."""
  tp = np.diag(matrix).astype(np.float64)
  union = matrix.sum(0) + matrix.sum(1) - tp
  present = union > 0
  return float((tp[present] / union[present]).mean()) if present.any() else float("nan")
