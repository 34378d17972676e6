"""CIFAR-10 with a small 2D ResNet + non-local blocks: a quick GPU run (TFDS ``cifar10``).

    python main.py --config configs/cifar10.py --workdir DIR
    python main.py --config configs/cifar10.py:baseline --workdir DIR

Width-32 ResNet with (2, 2, 2, 2) bottlenecks, NL blocks after every res3 and
res4 block (variant ``baseline``: none); batch 128, lr 0.1 cosine with
warm-up, 40 epochs, pad-and-crop plus flip. Variant ``lrnet``: the same
budget with 7x7 local relation layers (m = 8) in place of the 3x3
convolutions, an LR-Net-26 at half width (stem 32, stage widths 48..384,
outputs 128..1024, as the width-32 ResNet); ``lrnet_tiny``: the 166k-parameter
``lrnet_tiny`` preset, small enough to train on a CPU. ``cifar10`` downloads
automatically where a network is available; prepare it in the data dir
otherwise.
"""

import ml_collections

from configs import common, imagenet


VARIANTS = ("", "baseline", "lrnet", "lrnet_tiny")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
  model = {"": "resnet_nl_tiny", "baseline": "resnet_tiny"}.get(variant, "lrnet_tiny")
  config = imagenet.get_config(model)
  config.dataset = "cifar10"
  config.eval_split = "test"
  config.num_classes = 10
  config.input.update(style="cifar", crop_size=32)
  if variant in ("", "baseline"):
    nonlocal_blocks = ((), (), (), ()) if variant == "baseline" else ((), (0, 1), (0, 1), ())
    config.model.kwargs = ml_collections.ConfigDict(
        {"width": 32, "stage_depths": (2, 2, 2, 2), "nonlocal_blocks": nonlocal_blocks})
  elif variant == "lrnet":
    config.model.kwargs = ml_collections.ConfigDict(
        {"stage_depths": (2, 2, 2, 2), "stem_width": 32, "stage_widths": (48, 96, 192, 384),
         "stage_out_features": (128, 256, 512, 1024), "kernel_size": 7,
         "channels_per_group": 8})
  steps_per_epoch = 50_000 // 128
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_train_steps = 40 * steps_per_epoch
  config.warmup_steps = 2 * steps_per_epoch
  config.weight_decay = 5e-4
  config.eval_every_steps = 5 * steps_per_epoch
  config.checkpoint_every_steps = 5 * steps_per_epoch
  return common.expose_model_arguments(config)
