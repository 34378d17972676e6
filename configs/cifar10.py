"""CIFAR-10 with a small 2D ResNet + non-local blocks: a quick GPU run (TFDS ``cifar10``).

    python main.py --config configs/cifar10.py --workdir DIR
    python main.py --config configs/cifar10.py:baseline --workdir DIR

Width-32 ResNet with (2, 2, 2, 2) bottlenecks, NL blocks after every res3 and
res4 block (variant ``baseline``: none); batch 128, lr 0.1 cosine with
warm-up, 40 epochs, pad-and-crop plus flip. ``cifar10`` downloads
automatically where a network is available; prepare it in the data dir
otherwise.
"""

import ml_collections

from configs import imagenet


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in ("", "baseline"):
    raise ValueError(f"unknown variant {variant!r}; use '' or 'baseline'")
  config = imagenet.get_config("resnet_tiny" if variant == "baseline" else "resnet_nl_tiny")
  config.dataset = "cifar10"
  config.eval_split = "test"
  config.num_classes = 10
  config.input.update(style="cifar", crop_size=32)
  nonlocal_blocks = ((), (), (), ()) if variant == "baseline" else ((), (0, 1), (0, 1), ())
  config.model.kwargs = ml_collections.ConfigDict(
      {"width": 32, "stage_depths": (2, 2, 2, 2), "nonlocal_blocks": nonlocal_blocks})
  steps_per_epoch = 50_000 // 128
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_train_steps = 40 * steps_per_epoch
  config.warmup_steps = 2 * steps_per_epoch
  config.weight_decay = 5e-4
  config.eval_every_steps = 5 * steps_per_epoch
  config.checkpoint_every_steps = 5 * steps_per_epoch
  return config
