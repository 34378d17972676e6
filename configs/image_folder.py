"""Your own images in class folders: ``<manual_dir>/<split>/<class name>/*.jpg``.

    python main.py --config configs/image_folder.py:resnet50_nl5 --workdir DIR \
        --config.manual_dir=/data/my_images --config.data_dir=/data/my_images_tfds

The folders are read once into a TFDS data set in ``data_dir`` (use one
data_dir per data set). The number of classes is taken from the folders.
The variant names the model (default ``resnet50_nl5``); the recipe is
ImageNet's scaled to a short run (lr 0.01 cosine over 5k steps, batch 64).
Start from ImageNet weights with ``--config.init_from``.

``resnet_tiny``, ``resnet_nl_tiny`` and ``lrnet_tiny`` (width 8) train from
scratch at 32x32 in minutes on a CPU, with a recipe of their own: random
crops of 25%-100% of the image (Inception-style) resized to 32 and flips;
the whole image resized to 32 for evaluation (centre square); lr 0.1 cosine
with 50 warm-up steps, batch 64, 1500 steps.
"""

import ml_collections

from configs import common, imagenet

TINY = ("resnet_tiny", "resnet_nl_tiny", "lrnet_tiny")


def get_config(variant: str = "resnet50_nl5") -> ml_collections.ConfigDict:
  config = imagenet.get_config(variant)
  config.dataset = "image_class_folder"
  config.manual_dir = ""
  config.data_dir = "~/tensorflow_datasets/own_images"
  config.train_split = "train"
  config.eval_split = "test"
  config.num_classes = 0  # 0: from the class folders
  config.init_head = False
  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_train_steps = 5_000
  config.learning_rate = 0.01
  config.warmup_steps = 250
  config.eval_every_steps = 1_000
  config.checkpoint_every_steps = 1_000
  if variant in TINY:
    config.input.update(crop_size=32, resize_size=32, crop_area=(0.25, 1.0))
    config.init_head = True
    config.num_train_steps = 1500
    config.learning_rate = 0.1
    config.warmup_steps = 50
    config.log_every_steps = 50
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 500
  return common.expose_model_arguments(config)
