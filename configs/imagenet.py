"""ImageNet classification with a 2D ResNet + non-local blocks (TFDS ``imagenet2012``).

    python main.py --config configs/imagenet.py:resnet50_nl5 --workdir DIR

Variant: any registered 2D model, e.g. ``resnet50``, ``resnet50_nl5``,
``resnet50_nl10`` (the user's seed: an NL block after every res3 and res4
block), ``resnet101_nl5``, or a Local Relation Network ``lrnet26`` /
``lrnet50`` (Hu et al., ICCV 2019). The non-local paper has no ImageNet
experiment; this is the standard ResNet recipe: batch 256, SGD momentum 0.9,
lr 0.1 with 5 warm-up epochs and cosine decay over 90 epochs, weight decay
1e-4 (not on BN or biases), random-resized 224 crops and flips; centre 224
crop of the 256 resize at test. LR-Nets use the same recipe here (the
LR-Net paper's own schedule is not in our sources). ``imagenet2012`` needs
its manual download in the TFDS data dir (prepare it once with
``tfds build imagenet2012 --manual_dir=...``).
"""

import ml_collections

from configs import common
from nonlocal_jax.preprocessing import image

STEPS_PER_EPOCH = 1_281_167 // 256


def get_config(variant: str = "resnet50_nl5") -> ml_collections.ConfigDict:
  config = common.base_config()
  config.dataset = "imagenet2012"
  config.eval_split = "validation"
  config.num_classes = 1000
  config.modality = "image"
  config.input = image.default_config()
  config.model.name = variant

  config.batch_size = 256
  config.eval_batch_size = 250
  config.num_train_steps = 90 * STEPS_PER_EPOCH
  config.schedule = "cosine"
  config.learning_rate = 0.1
  config.warmup_steps = 5 * STEPS_PER_EPOCH
  config.nesterov = False
  config.weight_decay = 1e-4  # not on BN parameters or biases

  config.eval_every_steps = 5 * STEPS_PER_EPOCH
  config.checkpoint_every_steps = STEPS_PER_EPOCH
  return common.expose_model_arguments(config)
