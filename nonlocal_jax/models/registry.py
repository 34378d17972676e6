"""Named model presets: ``create_model(name, num_classes=..., rngs=...)`` and ``list_models()``.

Video names: ``{c2d,i3d}[_{nl1,nl5,nl10}]_r{50,101}[_32x2]``. Non-local
placement (0-based block indices, spec 2.3):

====== ============================== ====================================
name   R50                            R101
====== ============================== ====================================
nl1    res4 4 (before the last block) res4 21
nl5    res3 1,3; res4 1,3,5           res3 1,3; res4 6,13,20 (official)
nl10   every res3 and res4 block      res3 0-3; res4 1,5,9,13,17,21 (ours)
====== ============================== ====================================

No public code defines a 10-block R101; ours spaces six res4 blocks evenly
and ends before the last block, like nl1.

Image names: ``resnet{50,101}[_{nl1,nl5,nl10}]``; Local Relation Networks
``lrnet{26,50}`` (Hu et al., ICCV 2019: 7x7 local relation layers, m = 8).
Segmentation: ``nonlocalnet_r{50,101}_d8``. Detection (``models/mask_rcnn.py``):
``maskrcnn_r{50,101}_fpn[_nl1]``, ``keypointrcnn_r{50,101}_fpn[_nl4,_nl5]``. Tiny presets for tests and CPU
runs end in ``_tiny``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from nonlocal_jax.models.image_resnet import ImageResNet
from nonlocal_jax.models.lrnet import LRNet
from nonlocal_jax.models.mask_rcnn import DETECTOR_NONLOCAL_OPTIONS, MaskRCNN
from nonlocal_jax.models.segmentation import NonLocalSegmenter
from nonlocal_jax.models.video_resnet import VideoResNet


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered preset: constructor, its keyword arguments and a typical input (no batch)."""
  constructor: Callable[..., nnx.Module]
  kwargs: Mapping[str, Any]
  input_shape: tuple[int, ...]
  task: str


NONLOCAL_PLACEMENTS = {
    50: {"nl1": ((), (), (4,), ()),
         "nl5": ((), (1, 3), (1, 3, 5), ()),
         "nl10": ((), (0, 1, 2, 3), (0, 1, 2, 3, 4, 5), ())},
    101: {"nl1": ((), (), (21,), ()),
          "nl5": ((), (1, 3), (6, 13, 20), ()),
          "nl10": ((), (0, 1, 2, 3), (1, 5, 9, 13, 17, 21), ())},
}
_NONE = ((), (), (), ())

_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, spec: ModelSpec) -> None:
  if name in _REGISTRY:
    raise ValueError(f"model {name!r} is already registered")
  _REGISTRY[name] = spec


def _register_presets() -> None:
  for depth, placements in NONLOCAL_PLACEMENTS.items():
    for nl in ("baseline", *placements):
      blocks = _NONE if nl == "baseline" else placements[nl]
      tag = "" if nl == "baseline" else f"_{nl}"
      for arch in ("c2d", "i3d"):
        for clip, frames in (("8x8", 8), ("32x2", 32)):
          suffix = "" if clip == "8x8" else "_32x2"
          register(f"{arch}{tag}_r{depth}{suffix}", ModelSpec(
              VideoResNet, dict(arch=arch, depth=depth, clip=clip, nonlocal_blocks=blocks),
              (frames, 224, 224, 3), "video"))
      register(f"resnet{depth}{tag}", ModelSpec(
          ImageResNet, dict(depth=depth, nonlocal_blocks=blocks), (224, 224, 3), "image"))
    register(f"nonlocalnet_r{depth}_d8", ModelSpec(
        NonLocalSegmenter, dict(depth=depth), (512, 1024, 3), "segmentation"))

  tiny = dict(width=8, stage_depths=(1, 1, 1, 1))
  tiny_nl = ((), (0,), (0,), ())
  register("c2d_tiny", ModelSpec(VideoResNet, dict(arch="c2d", **tiny), (8, 32, 32, 3), "video"))
  register("c2d_nl_tiny", ModelSpec(
      VideoResNet, dict(arch="c2d", nonlocal_blocks=tiny_nl, **tiny), (8, 32, 32, 3), "video"))
  register("i3d_nl_tiny", ModelSpec(
      VideoResNet, dict(arch="i3d", nonlocal_blocks=tiny_nl, **tiny), (8, 32, 32, 3), "video"))
  register("resnet_tiny", ModelSpec(ImageResNet, dict(**tiny), (32, 32, 3), "image"))
  register("resnet_nl_tiny", ModelSpec(
      ImageResNet, dict(nonlocal_blocks=tiny_nl, **tiny), (32, 32, 3), "image"))
  register("nonlocalnet_tiny", ModelSpec(
      NonLocalSegmenter, dict(head_channels=16, aux_channels=8, **tiny), (64, 64, 3),
      "segmentation"))


def _register_lrnet() -> None:
  # m = 8 does not divide res2's 100 channels; 5 is the largest divisor of 100
  # not above 8 (the paper reports no loss with up to 8 channels per map).
  paper = dict(kernel_size=7, channels_per_group=(8, 5, 8, 8, 8))
  for depth in (26, 50):
    register(f"lrnet{depth}", ModelSpec(LRNet, dict(depth=depth, **paper), (224, 224, 3), "image"))
  register("lrnet_tiny", ModelSpec(
      LRNet, dict(stage_depths=(1, 1, 1, 1), stage_widths=(8, 16, 32, 64),
                  stage_out_features=(16, 32, 64, 128), stem_width=8, channels_per_group=4),
      (32, 32, 3), "image"))


def _register_detectors() -> None:
  # Wang et al., section 6: 1 NL block right before the last res4 block (Mask R-CNN);
  # 4 in the keypoint head, one after every 2 of its 8 convolutions, optionally +1 in res4.
  head_nl = (1, 3, 5, 7)
  # Stated in each preset, so that configs listing every block option keep it.
  nl = dict(nonlocal_options=DETECTOR_NONLOCAL_OPTIONS)
  for depth, placements in NONLOCAL_PLACEMENTS.items():
    nl1 = placements["nl1"]
    for tag, blocks in (("", _NONE), ("_nl1", nl1)):
      register(f"maskrcnn_r{depth}_fpn{tag}", ModelSpec(
          MaskRCNN, dict(depth=depth, nonlocal_blocks=blocks, **nl), (800, 1344, 3),
          "detection"))
    for tag, blocks, head in (("", _NONE, ()), ("_nl4", _NONE, head_nl),
                              ("_nl5", nl1, head_nl)):
      register(f"keypointrcnn_r{depth}_fpn{tag}", ModelSpec(
          MaskRCNN, dict(depth=depth, nonlocal_blocks=blocks, masks=False, num_keypoints=17,
                         keypoint_nonlocal_after=head, **nl), (800, 1344, 3), "detection"))
  tiny = dict(width=8, stage_depths=(1, 1, 1, 1), fpn_features=32, box_features=64,
              mask_features=32, keypoint_features=32, **nl)
  register("maskrcnn_tiny", ModelSpec(MaskRCNN, tiny, (128, 128, 3), "detection"))
  register("maskrcnn_nl_tiny", ModelSpec(
      MaskRCNN, dict(nonlocal_blocks=((), (), (0,), ()), **tiny), (128, 128, 3), "detection"))
  register("keypointrcnn_tiny", ModelSpec(
      MaskRCNN, dict(masks=False, num_keypoints=7, keypoint_nonlocal_after=(1, 3, 5, 7), **tiny),
      (128, 128, 3), "detection"))


_register_presets()
_register_lrnet()
_register_detectors()


def list_models() -> list[str]:
  """Names accepted by :func:`create_model`, sorted."""
  return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
  """The registered preset `name`; a ValueError names close matches otherwise."""
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}")
  return _REGISTRY[name]


def eval_mode(model: nnx.Module) -> nnx.Module:
  """A view of `model` for inference: no dropout, BN with running statistics.

  Also for models without BatchNorm (``norm='affine'`` with non-local blocks
  without BN), which plain ``nnx.view(..., use_running_average=True)`` rejects.
  """
  return nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)


def create_model(name: str, *, num_classes: int, rngs: nnx.Rngs, **overrides: Any) -> nnx.Module:
  """Builds the preset `name` with `num_classes` outputs.

  `overrides` replace the preset's constructor arguments (for example
  ``nonlocal_options=dict(instantiation='dot_product')``, ``dtype=jnp.bfloat16``,
  ``head_pool_window=(4, 7, 7)``); an unknown argument raises a ValueError
  listing the accepted ones.
  """
  spec = get_spec(name)
  accepted = [p for p in inspect.signature(spec.constructor.__init__).parameters
              if p not in ("self", "rngs")]
  unknown = sorted(set(overrides) - set(accepted))
  if unknown:
    raise ValueError(f"model {name!r} ({spec.constructor.__name__}) does not take {unknown}; "
                     f"accepted arguments: {', '.join(accepted)}")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  return spec.constructor(**{**spec.kwargs, **overrides, "num_classes": num_classes}, rngs=rngs)
