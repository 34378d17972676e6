"""The interface of a task: how outputs and a batch become the loss and the metrics.

``train.py`` calls only these methods, so a new kind of task is a new
subclass registered in :data:`nonlocal_jax.tasks.TASKS`, with no branch in the
training loop. Batches are dicts with ``inputs``, ``label`` and (eval)
``mask`` (B,); see :mod:`nonlocal_jax.input_pipeline`.
"""

import abc
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from clu import metrics
from flax import nnx


@flax.struct.dataclass
class LossMetrics(metrics.Collection):
  """Training metrics of a task without a per-step accuracy."""
  loss: metrics.Average.from_output("loss")
  learning_rate: metrics.LastValue.from_output("learning_rate")


def views_per_example(outputs: jax.Array, num_views: int) -> jax.Array:
  """(B * V, ...) outputs of consecutive views -> (B, V, ...) float32."""
  outputs = outputs.astype(jnp.float32)
  return outputs.reshape(-1, num_views, *outputs.shape[1:])


class Task(abc.ABC):
  """Loss and metrics of one kind of task, configured by the experiment config."""

  # Whether config.num_classes is taken from / checked against the data set's
  # ``label`` feature (a ClassLabel or multi-hot vector); not for label maps.
  num_classes_from_labels: bool = True

  def __init__(self, config: ml_collections.ConfigDict):
    """Reads the task's settings from `config` (none by default)."""
    del config

  # -- training ---------------------------------------------------------------

  def train_outputs(self, model: nnx.Module, batch: dict) -> Any:
    """What the model returns in a train step, for `loss` and `train_metrics`.

    Default: ``model(batch['inputs'])``; a task whose loss the model computes
    from the targets overrides this to pass them.
    """
    return model(batch["inputs"])

  @abc.abstractmethod
  def loss(self, outputs: Any, batch: dict) -> jax.Array:
    """Scalar training loss, averaged over the global batch."""

  def train_metrics(self, outputs: Any, batch: dict, loss: jax.Array,
                    learning_rate: jax.Array) -> metrics.Collection:
    """Metrics of one train step (default: the loss and the learning rate)."""
    del outputs, batch
    return LossMetrics.single_from_model_output(loss=loss, learning_rate=learning_rate)

  # -- evaluation -------------------------------------------------------------

  def eval_outputs(self, forward: Callable[[nnx.Module, jax.Array], Any], model: nnx.Module,
                   batch: dict) -> Any:
    """What the model returns in an eval step: `forward` (plain, multi-view or sliding
    windows, ``train.eval_forward_fn``) on ``batch['inputs']`` by default."""
    return forward(model, batch["inputs"])

  @abc.abstractmethod
  def eval_metrics(self, outputs: Any, batch: dict) -> tuple[metrics.Collection, dict]:
    """(jit-able metric collection, arrays for `host_metrics`) of one eval batch.

    The collection is masked by ``batch['mask']`` (B,) and merged over batches;
    the arrays ({} if none) are copied to the host after every batch.
    """

  def combine_views(self, outputs: jax.Array, num_views: int) -> jax.Array:
    """Averages the eval outputs of the `num_views` consecutive views of each example.

    (B * V, ...) -> (B, ...). A task whose modality has one eval view does not
    override this.
    """
    raise NotImplementedError(f"{type(self).__name__} does not average {num_views} eval views "
                              f"(outputs {outputs.shape})")

  def host_metrics(self, collected: list[dict]) -> dict[str, float]:
    """Metrics that need every eval output at once (default: none).

    `collected` holds the non-empty arrays of `eval_metrics` of every batch, as numpy.
    """
    del collected
    return {}
