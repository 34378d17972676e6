"""Your own videos in class folders: ``<manual_dir>/<split>/<class name>/*.mp4``.

    python main.py --config configs/video_folder.py:i3d_nl5_r50 --workdir DIR \
        --config.manual_dir=/data/my_videos --config.data_dir=/data/my_videos_tfds

Videos are probed once into a TFDS data set in ``data_dir`` (one data_dir
per data set) and decoded with PyAV while training (only the sampled
frames). The number of classes is taken from the folders.

Variants:

* ``{c2d|i3d}_{baseline|nl1|nl5|nl10}_{r50|r101}`` (8x8 clips): the
  Kinetics network fine-tuned: batch 16, lr 0.005 cosine over 10k steps;
  start from Kinetics or inflated ImageNet weights with ``--config.init_from``.
* ``c2d_tiny``, ``c2d_nl_tiny``, ``i3d_nl_tiny``: width-8 networks trained
  from scratch on 8 consecutive frames at 32x32, minutes on a CPU. A
  Kinetics recipe does not transfer to them (dropout 0.5, lr 0.005 and flips
  leave a tiny net at chance); theirs is the built-in default's: no dropout,
  no weight decay, lr 0.2 cosine with 50 warm-up steps, batch 32, no flip,
  1500 steps; short side jittered in [32, 36], 32 crops, 8 consecutive frames.
"""

import ml_collections

from configs import common, kinetics

TINY = ("c2d_tiny", "c2d_nl_tiny", "i3d_nl_tiny")


def _tiny(config: ml_collections.ConfigDict, model: str) -> ml_collections.ConfigDict:
  config.input.update(num_frames=8, frame_stride=1, train_scale=(32, 36), crop_size=32,
                      flip=False, test_clips=1, test_crops=1, test_scale=32, test_crop_size=32)
  config.model.name = model
  config.model.kwargs = ml_collections.ConfigDict({"dropout_rate": 0.0})
  config.init_head = True
  config.batch_size = 32
  config.eval_batch_size = 32
  config.num_train_steps = 1500
  config.learning_rate = 0.2
  config.warmup_steps = 50
  config.weight_decay = 0.0
  config.log_every_steps = 50
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 500
  return config


def get_config(variant: str = "i3d_nl5_r50") -> ml_collections.ConfigDict:
  config = kinetics.get_config("c2d_baseline_r50_8x8" if variant in TINY else f"{variant}_8x8")
  config.dataset = "video_class_folder"
  config.manual_dir = ""
  config.data_dir = "~/tensorflow_datasets/own_videos"
  config.train_split = "train"
  config.eval_split = "test"
  config.num_classes = 0  # 0: from the class folders
  config.batch_size = 16
  config.eval_batch_size = 4
  config.num_train_steps = 10_000
  config.schedule = "cosine"
  config.learning_rate = 0.005
  config.warmup_steps = 500
  config.eval_every_steps = 2_000
  config.checkpoint_every_steps = 1_000
  if variant in TINY:
    config = _tiny(config, variant)
  return common.expose_model_arguments(config)
