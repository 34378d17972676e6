"""Multi-label classification (Charades): per-class sigmoid cross-entropy; mAP on the host."""

import flax.struct
import jax
import jax.numpy as jnp
import optax
from clu import metrics

from nonlocal_jax.metrics import MeanAveragePrecision
from nonlocal_jax.tasks.base import Task, views_per_example


@flax.struct.dataclass
class MultilabelEvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")


class MultilabelTask(Task):
  """Outputs are logits (B, K); ``label`` is (B, K) multi-hot."""

  def loss(self, outputs: jax.Array, batch: dict) -> jax.Array:
    return optax.sigmoid_binary_cross_entropy(outputs.astype(jnp.float32),
                                              batch["label"].astype(jnp.float32)).mean()

  def eval_metrics(self, outputs: jax.Array, batch: dict) -> tuple[metrics.Collection, dict]:
    """Mean loss over classes and examples; sigmoid scores (B, K), targets and mask for mAP."""
    mask = batch["mask"]
    logits = outputs.astype(jnp.float32)
    loss = optax.sigmoid_binary_cross_entropy(logits, batch["label"].astype(jnp.float32))
    collected = {"scores": jax.nn.sigmoid(logits), "targets": batch["label"], "mask": mask}
    return MultilabelEvalMetrics.single_from_model_output(loss=loss.mean(-1), mask=mask), collected

  def combine_views(self, outputs: jax.Array, num_views: int) -> jax.Array:
    """(B * V, K) logits -> (B, K) logit of the mean sigmoid, as the official multi-view test does."""
    probs = jax.nn.sigmoid(views_per_example(outputs, num_views)).mean(axis=1)
    return jnp.log(probs) - jnp.log1p(-probs)

  def host_metrics(self, collected: list[dict]) -> dict[str, float]:
    """mAP over every eval example (it needs all scores at once)."""
    if not collected:
      return {}
    total = MeanAveragePrecision.empty()
    for outputs in collected:
      total = total.merge(MeanAveragePrecision.from_model_output(**outputs))
    return {"mAP": total.compute()}
