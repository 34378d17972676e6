"""Charades multi-label classification (paper section 5.2, Table 4).

    python main.py --config configs/charades.py:i3d_nl5_r101 --workdir DIR \
        --config.manual_dir=/data/charades --config.init_from=<Kinetics run>

Variant ``{c2d|i3d}_{baseline|nl5}_{r50|r101}`` (default ``i3d_nl5_r101``).
The paper's recipe: initialised from Kinetics models, per-category sigmoid
cross-entropy, batch 8 (1 clip per GPU), lr 0.00125 divided by 10 every 75k
iterations, 200k iterations; clips of 32 frames, stride 4; spatial jitter as
for Kinetics, rescaled so the 224 window becomes 288 pixels (short side
[329, 411], 288 crop); test at short side 320; mAP over 157 classes.
"""

import ml_collections

from configs import kinetics


def get_config(variant: str = "i3d_nl5_r101") -> ml_collections.ConfigDict:
  parts = variant.split("_")
  if len(parts) != 3 or parts[1] not in ("baseline", "nl5"):
    raise ValueError(f"unknown variant {variant!r}; expected "
                     "{c2d|i3d}_{baseline|nl5}_{r50|r101}")
  config = kinetics.get_config(f"{parts[0]}_{parts[1]}_{parts[2]}_8x8")
  config.dataset = "charades"
  config.manual_dir = "~/data/charades"
  config.train_split = "train"
  config.eval_split = "test"
  config.num_classes = 157
  config.task = "multilabel"
  config.input.update(num_frames=32, frame_stride=4, train_scale=(329, 411), crop_size=288,
                      test_clips=10, test_crops=3, test_scale=320, test_crop_size=320)
  # T at res5 is 16 for 32-frame clips in the 8x8 architecture; 288 / 32 = 9.
  config.model.kwargs.head_pool_window = (16, 9, 9)
  config.init_head = False
  config.batch_size = 8
  config.eval_batch_size = 2
  config.num_train_steps = 200_000
  config.learning_rate = 0.00125
  config.lr_steps = (75_000, 150_000)
  config.eval_every_steps = 25_000
  return config
