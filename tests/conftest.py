"""Test-wide settings: a CPU with 8 virtual devices, float32 matmuls at full precision."""

import os
import sys

# torch 2.14.1 (tests only; the build whose torchvision ops load here) is a CUDA build that
# imports triton, and triton's native library crashes the process when TensorFlow is loaded
# first. Nothing here runs on a GPU: make `import triton` fail, which torch handles.
sys.modules.setdefault("triton", None)

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding the small synthetic long-range video set (256 / 96 clips)."""
  from nonlocal_jax.data.long_range_video import LongRangeVideo

  path = str(tmp_path_factory.mktemp("tfds"))
  LongRangeVideo(config="small", data_dir=path).download_and_prepare(file_format="array_record")
  return path
