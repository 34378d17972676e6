"""The built-in default run shows the paper's claim for every seed (C2D + NL >= 95%, C2D <= 60%).

Ten full default runs (about 20 minutes on 2 CPU cores), so they run only when asked:

    NONLOCAL_JAX_MULTISEED=1 python -m pytest -q tests/test_default_run.py
"""

import os

import pytest

from configs import default as default_config
from nonlocal_jax import train

SEEDS = (0, 1, 2, 3, 4)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("NONLOCAL_JAX_MULTISEED"),
                       reason="ten full default runs; set NONLOCAL_JAX_MULTISEED=1 to run them"),
]


@pytest.fixture(scope="module")
def fresh_data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tfds"))  # the default set is built by the first run


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("variant,bound", [("", 0.95), ("baseline", 0.60)])
def test_default_run(variant, bound, seed, fresh_data_dir, tmp_path):
  config = default_config.get_config(variant)
  config.data_dir = fresh_data_dir
  config.seed = seed
  accuracy = train.train_and_evaluate(config, str(tmp_path))["eval_accuracy"]
  if variant:
    assert accuracy <= bound, f"C2D alone reached {accuracy:.3f} with seed {seed}"
  else:
    assert accuracy >= bound, f"C2D + NL reached only {accuracy:.3f} with seed {seed}"
