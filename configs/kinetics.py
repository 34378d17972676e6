"""Kinetics-400 video classification: the paper's experiments (spec 3.1-3.2, 4.1, 4.3).

    python main.py --config configs/kinetics.py:i3d_nl5_r50_8x8 --workdir DIR \
        --config.manual_dir=/data/kinetics400

Variant ``{c2d|i3d}_{baseline|nl1|nl5|nl10}_{r50|r101}_{8x8|32x2|32x4|128x1}[_affine]``
(default ``i3d_nl5_r50_8x8``). Recipe of the official code: batch 64, lr
0.01 divided by 10 at 150k and 300k iterations, 400k iterations, Nesterov
momentum 0.9, weight decay 1e-4 (not on BN parameters or biases), dropout
0.5; short side jittered in [256, 320], 224 crop, flip; test 10 clips x 3
crops at short side 256, fully convolutional, softmax scores averaged.

Clips: 8x8 and 32x4 use the official ``resnet_video`` network (preset
``..._r50``), 32x2 and 128x1 the paper's ``resnet_video_org`` (preset
``..._r50_32x2``). ``_affine``: the official frozen-BN long-clip models (BN
folded into a per-channel affine, non-local blocks without BN, res3 blocks
attending within groups of 4 frames), which is what the 32x4 / 128-frame
checkpoints hold. Start from ImageNet weights or a published checkpoint with
``--config.init_from`` (converted, see README); the data layout is in README.
"""

import ml_collections

from configs import common
from nonlocal_jax.preprocessing import video

ARCHS, PLACEMENTS, DEPTHS = ("c2d", "i3d"), ("baseline", "nl1", "nl5", "nl10"), ("r50", "r101")
# clip -> (frames, frame stride, network of the official code, T at res5).
CLIPS = {"8x8": (8, 8, "8x8", 4), "32x2": (32, 2, "32x2", 4), "32x4": (32, 4, "8x8", 16),
         "128x1": (128, 1, "32x2", 16)}
FROZEN_BN = "affine"


def parse_variant(variant: str) -> tuple[str, str, str, str, bool]:
  """'i3d_nl5_r50_32x4_affine' -> ('i3d', 'nl5', 'r50', '32x4', True); clear error otherwise."""
  parts = variant.split("_")
  frozen_bn = parts[-1] == FROZEN_BN
  if frozen_bn:
    parts = parts[:-1]
  if len(parts) != 4 or parts[0] not in ARCHS or parts[1] not in PLACEMENTS or (
      parts[2] not in DEPTHS) or parts[3] not in CLIPS:
    raise ValueError(f"unknown variant {variant!r}; expected {{{'|'.join(ARCHS)}}}_"
                     f"{{{'|'.join(PLACEMENTS)}}}_{{{'|'.join(DEPTHS)}}}_{{{'|'.join(CLIPS)}}}"
                     f"[_{FROZEN_BN}]")
  return (*parts, frozen_bn)


def model_name(arch: str, placement: str, depth: str, clip: str) -> str:
  name = arch if placement == "baseline" else f"{arch}_{placement}"
  return f"{name}_{depth}" + ("_32x2" if CLIPS[clip][2] == "32x2" else "")


def model_kwargs(clip: str, frozen_bn: bool) -> ml_collections.ConfigDict:
  """Constructor arguments: the official head, pool padding and (frozen BN) norms, all overridable."""
  kwargs = ml_collections.ConfigDict({
      "dropout_rate": 0.5,
      # Official head: average pool (T_res5, 7, 7), stride 1, fully convolutional at test time.
      "head_pool_window": (CLIPS[clip][3], 7, 7),
      "stem_pool_padding": "caffe2",  # 'pyslowfast' for PySlowFast checkpoints
      "temporal_pool": True,  # False: PySlowFast C2D_NOPOOL
      "norm": "batch_norm",
      "nonlocal_options": {"final_norm": "batch_norm"},
      "nonlocal_stage_options": ({}, {}, {}, {}),
  })
  if frozen_bn:
    kwargs.norm = "affine"
    kwargs.nonlocal_options.final_norm = "none"
    kwargs.nonlocal_stage_options = ({}, {"temporal_group_size": 4}, {}, {})
  return kwargs


def get_config(variant: str = "i3d_nl5_r50_8x8") -> ml_collections.ConfigDict:
  arch, placement, depth, clip, frozen_bn = parse_variant(variant)
  config = common.base_config()
  config.dataset = "kinetics"
  config.manual_dir = "~/data/kinetics400"
  config.eval_split = "validation"
  config.num_classes = 400
  config.modality = "video"
  config.input = video.default_config()
  frames, stride = CLIPS[clip][:2]
  config.input.update(num_frames=frames, frame_stride=stride, train_scale=(256, 320),
                      crop_size=224, flip=True, test_clips=10, test_crops=3, test_scale=256,
                      test_crop_size=256)

  config.model.name = model_name(arch, placement, depth, clip)
  config.model.kwargs = model_kwargs(clip, frozen_bn)
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
  return common.expose_model_arguments(config)
