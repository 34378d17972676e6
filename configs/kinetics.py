"""Kinetics-400 video classification: the paper's experiments (spec 3.1-3.2, 4.1, 4.3).

    python main.py --config configs/kinetics.py:i3d_nl5_r50_8x8 --workdir DIR \
        --config.manual_dir=/data/kinetics400

Variant ``{c2d|i3d}_{baseline|nl1|nl5|nl10}_{r50|r101}_{8x8|32x2}``
(default ``i3d_nl5_r50_8x8``). Recipe of the official code: batch 64, lr
0.01 divided by 10 at 150k and 300k iterations, 400k iterations, Nesterov
momentum 0.9, weight decay 1e-4 (not on BN parameters or biases), dropout
0.5; short side jittered in [256, 320], 224 crop, flip; test 10 clips x 3
crops at short side 256, fully convolutional, softmax scores averaged.
Start from ImageNet weights with ``--config.init_from`` (converted, see
README); the data layout is in README.
"""

import ml_collections

from configs import common
from nonlocal_jax.preprocessing import video

ARCHS, PLACEMENTS, DEPTHS, CLIPS = ("c2d", "i3d"), ("baseline", "nl1", "nl5", "nl10"), (
    "r50", "r101"), ("8x8", "32x2")


def parse_variant(variant: str) -> tuple[str, str, str, str]:
  """'i3d_nl5_r50_8x8' -> ('i3d', 'nl5', 'r50', '8x8'), with a clear error otherwise."""
  parts = tuple(variant.split("_"))
  if len(parts) != 4 or parts[0] not in ARCHS or parts[1] not in PLACEMENTS or (
      parts[2] not in DEPTHS) or parts[3] not in CLIPS:
    raise ValueError(f"unknown variant {variant!r}; expected {{{'|'.join(ARCHS)}}}_"
                     f"{{{'|'.join(PLACEMENTS)}}}_{{{'|'.join(DEPTHS)}}}_{{{'|'.join(CLIPS)}}}")
  return parts


def model_name(arch: str, placement: str, depth: str, clip: str) -> str:
  name = arch if placement == "baseline" else f"{arch}_{placement}"
  return f"{name}_{depth}" + ("_32x2" if clip == "32x2" else "")


def get_config(variant: str = "i3d_nl5_r50_8x8") -> ml_collections.ConfigDict:
  arch, placement, depth, clip = parse_variant(variant)
  config = common.base_config()
  config.dataset = "kinetics"
  config.manual_dir = "~/data/kinetics400"
  config.eval_split = "validation"
  config.num_classes = 400
  config.modality = "video"
  config.input = video.default_config()
  frames, stride = (8, 8) if clip == "8x8" else (32, 2)
  config.input.update(num_frames=frames, frame_stride=stride, train_scale=(256, 320),
                      crop_size=224, flip=True, test_clips=10, test_crops=3, test_scale=256,
                      test_crop_size=256)

  config.model.name = model_name(arch, placement, depth, clip)
  # Official head: average pool (T_res5, 7, 7) with stride 1, fully convolutional at test time.
  config.model.kwargs = ml_collections.ConfigDict({"dropout_rate": 0.5,
                                                   "head_pool_window": (4, 7, 7)})
  config.init_head = False  # converted ImageNet weights, inflated (see README)

  config.batch_size = 64
  config.eval_batch_size = 8
  config.num_train_steps = 400_000
  config.schedule = "step"
  config.learning_rate = 0.01
  config.lr_steps = (150_000, 300_000)
  config.nesterov = True
  config.weight_decay = 1e-4  # not on BN parameters or biases

  config.eval_every_steps = 50_000
  config.checkpoint_every_steps = 5_000
  return config
