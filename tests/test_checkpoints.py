"""Weights checkpoints: round trip, fresh heads, one error listing every mismatch."""

import numpy as np
import pytest
from flax import nnx

from nonlocal_jax import checkpoints
from nonlocal_jax.models import create_model


def tiny(num_classes=3, seed=0, **kwargs):
  return create_model("c2d_nl_tiny", num_classes=num_classes, rngs=nnx.Rngs(seed), **kwargs)


def test_round_trip_restores_every_weight(tmp_path):
  source = tiny(seed=0)
  checkpoints.save_weights(source, str(tmp_path / "w"))
  target = tiny(seed=1)
  assert checkpoints.restore_weights(target, str(tmp_path / "w")) == []
  want, got = checkpoints.weights_of(source), checkpoints.weights_of(target)
  assert want.keys() == got.keys() and len(want) > 100
  for key in want:
    np.testing.assert_array_equal(want[key], got[key])


def test_fresh_head_for_other_classes(tmp_path):
  checkpoints.save_weights(tiny(num_classes=3), str(tmp_path / "w"))
  target = tiny(num_classes=5, seed=1)
  head_before = np.asarray(target.head.projection.kernel[...])
  with pytest.raises(ValueError, match="2 weights do not match.*init_head=False"):
    checkpoints.restore_weights(target, str(tmp_path / "w"))
  skipped = checkpoints.restore_weights(target, str(tmp_path / "w"), init_head=False)
  assert sorted(skipped) == [("head", "projection", "bias"), ("head", "projection", "kernel")]
  np.testing.assert_array_equal(np.asarray(target.head.projection.kernel[...]), head_before)


def test_mismatches_are_listed_together_and_nothing_changes(tmp_path):
  checkpoints.save_weights(tiny(), str(tmp_path / "w"))
  target = create_model("c2d_tiny", num_classes=3, rngs=nnx.Rngs(1))  # no NL blocks
  before = checkpoints.weights_of(target)
  with pytest.raises(ValueError) as error:
    checkpoints.restore_weights(target, str(tmp_path / "w"))
  message = str(error.value)
  assert "not in the model: stages/1/nonlocal_blocks/0/theta/kernel" in message
  assert "not in the model: stages/2/nonlocal_blocks/0/bn/mean" in message
  after = checkpoints.weights_of(target)
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_refuses_to_overwrite_and_reports_missing_sources(tmp_path):
  checkpoints.save_weights(tiny(), str(tmp_path / "w"))
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    checkpoints.save_weights(tiny(), str(tmp_path / "w"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoints.restore_weights(tiny(), str(tmp_path / "nope"))
