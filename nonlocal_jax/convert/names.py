"""Where each of our weights lives in the other frameworks' checkpoints (spec section 5).

Each ``*_key(path)`` takes the path of one of our weights, e.g.
``('stages', '1', 'blocks', '0', 'a', 'conv', 'kernel')`` (res3 block 0,
first convolution) or ``('stages', '2', 'nonlocal_blocks', '3', 'theta',
'bias')``, and returns the key of the same weight in that framework's file,
or None when the framework has no such weight (then the conversion reports it
missing). Our stage index s is res{s+2}; block and non-local indices are the
0-based block indices of both the official code and PySlowFast.
"""

from __future__ import annotations

from collections.abc import Callable

Path = tuple[str, ...]

_TORCH_NORM = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_TORCH_PARAM = {"kernel": "weight", "bias": "bias"}
_CAFFE2_NORM = {"scale": "s", "bias": "b", "mean": "rm", "var": "riv"}
_CAFFE2_PARAM = {"kernel": "w", "bias": "b"}
_NONLOCAL_PROJECTIONS = ("theta", "phi", "g", "out")


def pyslowfast_key(path: Path) -> str | None:
  """PySlowFast ``model_state`` keys (``slowfast/models/video_model_builder.py``)."""
  match path:
    case ("stem", "conv", "kernel"):
      return "s1.pathway0_stem.conv.weight"
    case ("stem", "norm", p):
      return f"s1.pathway0_stem.bn.{_TORCH_NORM[p]}"
    case ("stages", s, "blocks", i, layer, kind, p):
      module = f"s{int(s) + 2}.pathway0_res{i}." + (
          "branch1" if layer == "shortcut" else f"branch2.{layer}")
      return f"{module}.weight" if kind == "conv" else f"{module}_bn.{_TORCH_NORM[p]}"
    case ("stages", s, "nonlocal_blocks", i, "bn", p):
      return f"s{int(s) + 2}.pathway0_nonlocal{i}.bn.{_TORCH_NORM[p]}"
    case ("stages", s, "nonlocal_blocks", i, proj, p) if proj in _NONLOCAL_PROJECTIONS:
      return f"s{int(s) + 2}.pathway0_nonlocal{i}.conv_{proj}.{_TORCH_PARAM[p]}"
    case ("head", "projection", p):
      return f"head.projection.{_TORCH_PARAM[p]}"
  return None


def caffe2_key(path: Path) -> str | None:
  """Blob names of the official video-nonlocal-net ``.pkl`` files."""
  match path:
    case ("stem", "conv", "kernel"):
      return "conv1_w"
    case ("stem", "norm", p):
      return f"res_conv1_bn_{_CAFFE2_NORM[p]}"
    case ("stages", s, "blocks", i, layer, kind, p):
      prefix = f"res{int(s) + 2}_{i}_" + ("branch1" if layer == "shortcut" else f"branch2{layer}")
      return f"{prefix}_w" if kind == "conv" else f"{prefix}_bn_{_CAFFE2_NORM[p]}"
    case ("stages", s, "nonlocal_blocks", i, "bn", p):
      return f"nonlocal_conv{int(s) + 2}_{i}_bn_{_CAFFE2_NORM[p]}"
    case ("stages", s, "nonlocal_blocks", i, proj, p) if proj in _NONLOCAL_PROJECTIONS:
      return f"nonlocal_conv{int(s) + 2}_{i}_{proj}_{_CAFFE2_PARAM[p]}"
    case ("head", "projection", p):
      return f"pred_{_CAFFE2_PARAM[p]}"
  return None


def _torchvision_block_key(s: str, i: str, layer: str, kind: str, p: str) -> str:
  block = f"layer{int(s) + 1}.{i}"
  if layer == "shortcut":
    return f"{block}.downsample.0.weight" if kind == "conv" else (
        f"{block}.downsample.1.{_TORCH_NORM[p]}")
  n = "abc".index(layer) + 1
  return f"{block}.conv{n}.weight" if kind == "conv" else f"{block}.bn{n}.{_TORCH_NORM[p]}"


def torchvision_key(path: Path) -> str | None:
  """torchvision ``resnet50`` / ``resnet101`` and detector state-dict keys (no non-local blocks).

  Detectors (``maskrcnn_resnet50_fpn``, ``keypointrcnn_resnet50_fpn``): our
  ``backbone`` is their ``backbone.body``; the keys are those of current
  torchvision (older files are renamed by
  :func:`nonlocal_jax.convert.converter.modern_torchvision_keys`).
  """
  match path:
    case ("stem", "conv", "kernel"):
      return "conv1.weight"
    case ("stem", "norm", p):
      return f"bn1.{_TORCH_NORM[p]}"
    case ("stages", s, "blocks", i, layer, kind, p):
      return _torchvision_block_key(s, i, layer, kind, p)
    case ("head", "projection", p):
      return f"fc.{_TORCH_PARAM[p]}"
    case ("backbone", "head", *_):
      return None
    case ("backbone", *rest):
      key = torchvision_key(tuple(rest))
      return None if key is None else f"backbone.body.{key}"
    case ("fpn", ("inner" | "layer") as kind, level, p):
      return f"backbone.fpn.{kind}_blocks.{level}.0.{_TORCH_PARAM[p]}"
    case ("rpn", "conv", p):
      return f"rpn.head.conv.0.0.{_TORCH_PARAM[p]}"
    case ("rpn", module, p) if module in _TORCHVISION_RPN:
      return f"rpn.head.{_TORCHVISION_RPN[module]}.{_TORCH_PARAM[p]}"
    case ("box_head", module, p) if module in _TORCHVISION_BOX_HEAD:
      return f"roi_heads.{_TORCHVISION_BOX_HEAD[module]}.{_TORCH_PARAM[p]}"
    case ("mask_head", "convs", j, p):
      return f"roi_heads.mask_head.{j}.0.{_TORCH_PARAM[p]}"
    case ("mask_predictor", module, p) if module in _TORCHVISION_MASK_PREDICTOR:
      return f"roi_heads.mask_predictor.{_TORCHVISION_MASK_PREDICTOR[module]}.{_TORCH_PARAM[p]}"
    case ("keypoint_head", "convs", j, p):  # Sequential(conv, ReLU, conv, ReLU, ...)
      return f"roi_heads.keypoint_head.{2 * int(j)}.{_TORCH_PARAM[p]}"
    case ("keypoint_predictor", "upsample", p):
      return f"roi_heads.keypoint_predictor.kps_score_lowres.{_TORCH_PARAM[p]}"
  return None


_TORCHVISION_RPN = {"objectness": "cls_logits", "deltas": "bbox_pred"}
_TORCHVISION_BOX_HEAD = {"fc6": "box_head.fc6", "fc7": "box_head.fc7",
                         "scores": "box_predictor.cls_score", "deltas": "box_predictor.bbox_pred"}
_TORCHVISION_MASK_PREDICTOR = {"upsample": "conv5_mask", "logits": "mask_fcn_logits"}


# mmcv ConvModules of the decode and auxiliary heads (a .conv and a .bn each).
_MMSEG_CONV_MODULES = {
    "head_in": "decode_head.convs.0",
    "head_out": "decode_head.convs.1",
    "head_cat": "decode_head.conv_cat",
    "aux_in": "auxiliary_head.convs.0",
}
_MMSEG_CLASSIFIERS = {"classifier": "decode_head.conv_seg",
                      "aux_classifier": "auxiliary_head.conv_seg"}


def mmseg_key(path: Path) -> str | None:
  """mmsegmentation NonLocalNet (``nonlocal_r50-d8``) state-dict keys."""
  match path:
    case ("stem", j, kind, p):  # deep stem: Sequential(conv, bn, relu) x 3
      index = 3 * int(j) + (0 if kind == "conv" else 1)
      return f"backbone.stem.{index}." + ("weight" if kind == "conv" else _TORCH_NORM[p])
    case ("stages", s, "blocks", i, layer, kind, p):
      return "backbone." + _torchvision_block_key(s, i, layer, kind, p)
    case (module, kind, p) if module in _MMSEG_CONV_MODULES:
      prefix = _MMSEG_CONV_MODULES[module]
      return f"{prefix}.conv.weight" if kind == "conv" else f"{prefix}.bn.{_TORCH_NORM[p]}"
    case ("nonlocal_block", "bn", p):
      return f"decode_head.nl_block.conv_out.bn.{_TORCH_NORM[p]}"
    case ("nonlocal_block", "out", p):
      return f"decode_head.nl_block.conv_out.conv.{_TORCH_PARAM[p]}"
    case ("nonlocal_block", proj, p) if proj in _NONLOCAL_PROJECTIONS:
      return f"decode_head.nl_block.{proj}.conv.{_TORCH_PARAM[p]}"
    case (module, "conv", p) if module in _MMSEG_CLASSIFIERS:
      return f"{_MMSEG_CLASSIFIERS[module]}.{_TORCH_PARAM[p]}"
  return None


KEY_FUNCTIONS: dict[str, Callable[[Path], str | None]] = {
    "pyslowfast": pyslowfast_key,
    "caffe2": caffe2_key,
    "torchvision": torchvision_key,
    "mmseg": mmseg_key,
}
