"""UCF101 fine-tuning with the TFDS catalog builder (``ucf101/ucf101_1_256``).

    python main.py --config configs/ucf101.py:i3d_nl5_r50 --workdir DIR \
        --config.init_from=<Kinetics run or converted checkpoint>

Variant ``{c2d|i3d}_{baseline|nl1|nl5|nl10}_{r50|r101}`` (default
``i3d_nl5_r50``). The TFDS builder stores decoded 256x256 frames (preparing it
needs an ``ffmpeg`` binary, see data notes); 8x8 clips, 224 crops with scale
jitter and flip, 10 x 3 views at test. Fine-tuning recipe (ours; the paper has
no UCF101 experiment): batch 32, lr 0.005 cosine over 30k steps.
"""

import ml_collections

from configs import kinetics


def get_config(variant: str = "i3d_nl5_r50") -> ml_collections.ConfigDict:
  config = kinetics.get_config(f"{variant}_8x8")
  config.dataset = "ucf101/ucf101_1_256"
  config.manual_dir = ""
  config.train_split = "train"
  config.eval_split = "test"
  config.num_classes = 101
  config.input.update(train_scale=(256, 320), test_scale=256)
  config.batch_size = 32
  config.eval_batch_size = 8
  config.num_train_steps = 30_000
  config.schedule = "cosine"
  config.learning_rate = 0.005
  config.warmup_steps = 1_000
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 2_000
  return config
