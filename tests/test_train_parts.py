"""Pieces of the training loop against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common
from nonlocal_jax import train
from nonlocal_jax.models import create_model
from nonlocal_jax.models.segmentation import slide_inference
from nonlocal_jax.tasks import TASKS, Task, create_task


def test_weight_decay_skips_norms_and_biases():
  model = create_model("c2d_nl_tiny", num_classes=2, rngs=nnx.Rngs(0))
  mask = train.decay_mask(nnx.state(model, nnx.Param))
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  decayed = [k for k, v in flat.items() if v]
  kept = [k for k, v in flat.items() if not v]
  assert all("kernel" in k for k in decayed)
  assert any("'head']['projection']['bias'" in k for k in kept)
  assert any("'nonlocal_blocks']['0']['theta']['bias'" in k for k in kept)
  assert any("'nonlocal_blocks']['0']['bn']['scale'" in k for k in kept)
  assert any("'stem']['norm']['scale'" in k for k in kept)
  assert any("'nonlocal_blocks']['0']['theta']['kernel'" in k for k in decayed)


def step_config(**overrides):
  config = common.base_config()
  config.update(overrides)
  return config


def test_step_schedule_matches_the_official_recipe():
  lr = train.create_learning_rate_fn(step_config(
      schedule="step", learning_rate=0.01, lr_steps=(150_000, 300_000), num_train_steps=400_000))
  for step, want in [(0, 0.01), (149_999, 0.01), (150_000, 0.001), (299_999, 0.001),
                     (300_000, 0.0001), (399_999, 0.0001)]:
    assert float(lr(step)) == pytest.approx(want, rel=1e-6)


def test_poly_and_warmup_cosine_schedules():
  poly = train.create_learning_rate_fn(step_config(
      schedule="poly", learning_rate=0.01, end_learning_rate=1e-4, poly_power=0.9,
      num_train_steps=1000))
  assert float(poly(500)) == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4, rel=1e-5)
  cosine = train.create_learning_rate_fn(step_config(
      schedule="cosine", learning_rate=0.2, warmup_steps=10, num_train_steps=110))
  assert float(cosine(5)) == pytest.approx(0.1)
  assert float(cosine(60)) == pytest.approx(0.1, rel=1e-5)


def test_nesterov_sgd_with_decay_equals_hand_update():
  params = {"w": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}
  grads = {"w": jnp.array([0.1, 0.2]), "bias": jnp.array([0.3])}
  tx = train.create_optimizer(step_config(weight_decay=0.1, momentum=0.9, nesterov=True),
                              optax.constant_schedule(0.5))
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  g = np.array([0.1, 0.2]) + 0.1 * np.array([1.0, -2.0])  # decayed weight, not the bias
  np.testing.assert_allclose(updates["w"], -0.5 * (g + 0.9 * g), rtol=1e-6)  # nesterov: g + mu*v
  np.testing.assert_allclose(updates["bias"], -0.5 * (0.3 + 0.9 * 0.3), rtol=1e-6)


def test_combine_views_averages_probabilities():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 0.0]])
  combined = create_task(step_config()).combine_views(logits, 2)
  probs = np.asarray(jax.nn.softmax(logits))
  np.testing.assert_allclose(np.exp(combined), [(probs[0] + probs[1]) / 2,
                                                (probs[2] + probs[3]) / 2], rtol=1e-6)


def test_slide_inference_of_a_pointwise_model_equals_whole_image():
  w = jax.random.normal(jax.random.key(0), (3, 5))
  model = lambda x: (x @ w, None)  # pointwise: every window sees the same values
  images = jax.random.normal(jax.random.key(1), (2, 37, 50, 3))
  slid = slide_inference(model, images, crop_size=(16, 20), stride=(11, 13))
  np.testing.assert_allclose(np.asarray(slid), np.asarray(images @ w), rtol=1e-5, atol=1e-5)


def test_segmentation_loss_ignores_label_and_adds_aux():
  config = step_config(task="segmentation", ignore_label=255, aux_loss_weight=0.4)
  logits = jnp.zeros((1, 2, 2, 3)).at[0, 0, 0, 1].set(2.0)
  aux = jnp.zeros((1, 2, 2, 3))
  labels = jnp.array([[[1, 255], [0, 2]]])
  loss = create_task(config).loss((logits, aux), {"label": labels})
  xent_hit = -np.log(np.exp(2) / (np.exp(2) + 2))
  main = (xent_hit + 2 * np.log(3)) / 3
  assert float(loss) == pytest.approx(main + 0.4 * np.log(3), rel=1e-5)


def test_tasks_table_holds_task_classes_and_refuses_unknown_names():
  assert all(issubclass(task_class, Task) for task_class in TASKS.values())
  with pytest.raises(ValueError, match="config.task='no_such_task'") as error:
    create_task(step_config(task="no_such_task"))
  assert all(repr(name) in str(error.value) for name in TASKS)
