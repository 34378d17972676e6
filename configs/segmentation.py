"""Semantic segmentation with NonLocalNet (mmsegmentation's configs; spec 4.6).

    python main.py --config configs/segmentation.py:cityscapes_r50_512x1024_40k --workdir DIR \
        --config.manual_dir=/data/cityscapes

Variant ``{dataset}_{r50|r101}_{crop}_{iters}`` with the runs of mmseg's
README: ``cityscapes_*_512x1024_{40k,80k}``, ``cityscapes_*_769x769_{40k,80k}``,
``ade20k_*_512x512_{80k,160k}``, ``voc12aug_*_512x512_{20k,40k}``. Recipe: SGD
lr 0.01, momentum 0.9, weight decay 5e-4 (on every parameter, as mmseg),
poly decay power 0.9 to 1e-4 per iteration; random rescale 0.5-2.0 of the
dataset scale, random crop, flip; auxiliary FCN loss weight 0.4; ignore label
255; mIoU. Batch 8 (Cityscapes) or 16; whole-image test (slide for 769x769).
Start from ImageNet weights (ResNetV1c) with ``--config.init_from``.
Not reproduced: PhotoMetricDistortion, cat_max_ratio crops, align_corners=True
of the 769 configs.
"""

import ml_collections

from configs import common
from nonlocal_jax.preprocessing import segmentation

DATASETS = {
    # name: (builder, classes, img_scale, batch, train split, eval split, eval pad size)
    "cityscapes": ("cityscapes19", 19, (2048, 1024), 8, "train", "validation", (1024, 2048)),
    "ade20k": ("ade20k", 150, (2048, 512), 16, "train", "validation", (512, 2048)),
    "voc12aug": ("voc12_aug", 21, (2048, 512), 16, "train", "validation", (512, 2048)),
}
RUNS = {
    "cityscapes": {"512x1024": ("40k", "80k"), "769x769": ("40k", "80k")},
    "ade20k": {"512x512": ("80k", "160k")},
    "voc12aug": {"512x512": ("20k", "40k")},
}


def get_config(variant: str = "cityscapes_r50_512x1024_40k") -> ml_collections.ConfigDict:
  parts = variant.split("_")
  valid = [f"{d}_{r}_{c}_{i}" for d, crops in RUNS.items() for r in ("r50", "r101")
           for c, iters in crops.items() for i in iters]
  if variant not in valid:
    raise ValueError(f"unknown variant {variant!r}; one of {', '.join(valid)}")
  name, depth, crop, iters = parts
  builder, num_classes, img_scale, batch, train_split, eval_split, pad = DATASETS[name]
  crop_size = tuple(int(v) for v in crop.split("x"))

  config = common.base_config()
  config.dataset = builder
  config.manual_dir = f"~/data/{name}"
  config.train_split = train_split
  config.eval_split = eval_split
  config.num_classes = num_classes
  config.task = "segmentation"
  config.modality = "segmentation"

  config.input = segmentation.default_config()
  config.input.update(img_scale=img_scale, crop_size=crop_size, eval_pad_size=pad)
  if crop == "769x769":
    config.input.update(eval_mode="slide", eval_crop_size=(769, 769), eval_stride=(513, 513))

  config.model.name = f"nonlocalnet_{depth}_d8"
  config.init_head = False  # ImageNet backbone weights: fresh heads

  config.batch_size = batch
  config.eval_batch_size = 8
  config.num_train_steps = int(iters[:-1]) * 1000
  config.schedule = "poly"
  config.learning_rate = 0.01
  config.end_learning_rate = 1e-4
  config.poly_power = 0.9
  config.nesterov = False
  config.weight_decay = 5e-4
  config.decay_norm_and_bias = True

  config.log_every_steps = 50
  config.eval_every_steps = 4_000
  config.checkpoint_every_steps = 4_000
  config.keep_checkpoints = 2
  return common.expose_model_arguments(config)
