"""The default config shrunk to a run of seconds on the small synthetic set (shared by tests)."""

import ml_collections

from configs import default as default_config


def small_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """configs/default.py on ``long_range_video/small``: batch 16, 20 steps, checkpoints every 10."""
  config = default_config.get_config()
  config.dataset = "long_range_video/small"
  config.data_dir = data_dir
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_train_steps = 20
  config.warmup_steps = 0
  config.log_every_steps = 5
  config.checkpoint_every_steps = 10
  config.update(overrides)
  return config
