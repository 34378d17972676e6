"""Your own videos in class folders: ``<manual_dir>/<split>/<class name>/*.mp4``.

    python main.py --config configs/video_folder.py:i3d_nl5_r50 --workdir DIR \
        --config.manual_dir=/data/my_videos --config.data_dir=/data/my_videos_tfds

Videos are probed once into a TFDS data set in ``data_dir`` (one data_dir
per data set) and decoded with PyAV while training (only the sampled
frames). The number of classes is taken from the folders. Variant
``{c2d|i3d}_{baseline|nl1|nl5|nl10}_{r50|r101}`` (8x8 clips); fine-tuning
recipe: batch 16, lr 0.005 cosine over 10k steps; start from Kinetics or
inflated ImageNet weights with ``--config.init_from``.
"""

import ml_collections

from configs import kinetics


def get_config(variant: str = "i3d_nl5_r50") -> ml_collections.ConfigDict:
  config = kinetics.get_config(f"{variant}_8x8")
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
  return config
