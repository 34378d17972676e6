"""Single-label classification (Kinetics, ImageNet, ...): softmax cross-entropy with optional
label smoothing; top-1 / top-5 accuracy."""

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics

from nonlocal_jax.metrics import top_k_accuracy
from nonlocal_jax.tasks.base import Task, views_per_example


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


def _softmax_xent(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy (B,) of logits (B, K) against integer labels (B,)."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


class ClassificationTask(Task):
  """Outputs are logits (B, K) (log-probabilities after `combine_views`); ``label`` is (B,)."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.label_smoothing = config.label_smoothing

  def loss(self, outputs: jax.Array, batch: dict) -> jax.Array:
    return _softmax_xent(outputs, batch["label"], self.label_smoothing).mean()

  def train_metrics(self, outputs: jax.Array, batch: dict, loss: jax.Array,
                    learning_rate: jax.Array) -> metrics.Collection:
    return ClassificationTrainMetrics.single_from_model_output(
        loss=loss, logits=outputs.astype(jnp.float32), labels=batch["label"],
        learning_rate=learning_rate)

  def eval_metrics(self, outputs: jax.Array, batch: dict) -> tuple[metrics.Collection, dict]:
    logits = outputs.astype(jnp.float32)
    loss = _softmax_xent(logits, batch["label"])
    return ClassificationEvalMetrics.single_from_model_output(
        loss=loss, logits=logits, labels=batch["label"], mask=batch["mask"]), {}

  def combine_views(self, outputs: jax.Array, num_views: int) -> jax.Array:
    """(B * V, K) logits -> (B, K) log of the mean softmax, as the official multi-view test does."""
    return jnp.log(jax.nn.softmax(views_per_example(outputs, num_views), axis=-1).mean(axis=1))
