"""Converters of published checkpoints into our models.

    python -m nonlocal_jax.convert --from caffe2 --model i3d_nl5_r50 \
        --input i3d_nonlocal_8x8_IN_pretrain_400k.pkl --output ~/ckpt/i3d_nl5_r50_8x8

Sources: ``pyslowfast`` (``.pyth``), ``caffe2`` (official video-nonlocal-net
``.pkl``), ``torchvision`` (ImageNet ResNet-50/101, inflated into C2D / I3D
when the model is a video model) and ``mmseg`` (NonLocalNet R50/R101-D8).
The output is a weights checkpoint (``config.init_from``,
:func:`nonlocal_jax.checkpoints.load_model`).
"""

from nonlocal_jax.convert.converter import SOURCES, Conversion, convert
from nonlocal_jax.convert.readers import read_caffe2_blobs, read_torch_state_dict

__all__ = ["SOURCES", "Conversion", "convert", "read_caffe2_blobs", "read_torch_state_dict",
           "read_source"]


def read_source(source: str, path: str):
  """{source key: array} of the checkpoint file `path` of framework `source`."""
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
  return read_caffe2_blobs(path) if source == "caffe2" else read_torch_state_dict(path)
