"""Model zoo: video (C2D / I3D), image and segmentation networks with non-local blocks; LR-Nets."""

from nonlocal_jax.models.image_resnet import ImageResNet
from nonlocal_jax.models.lrnet import LRNet
from nonlocal_jax.models.registry import (ModelSpec, create_model, eval_mode, get_spec,
                                          list_models)
from nonlocal_jax.models.segmentation import NonLocalSegmenter
from nonlocal_jax.models.video_resnet import VideoResNet

__all__ = ["ImageResNet", "LRNet", "ModelSpec", "NonLocalSegmenter", "VideoResNet",
           "create_model", "eval_mode", "get_spec", "list_models"]
