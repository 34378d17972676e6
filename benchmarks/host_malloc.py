"""Which host (CPU) allocator the benchmarks run under, and how to choose it.

XLA:CPU allocates the buffers of every execution afresh (an I3D-NL5 R50 train
step: ~1.5 GB of temporaries; a res3 non-local score matrix: 79 MB), and so
does PyTorch eager for every large tensor. glibc's malloc serves requests
above 32 MiB (and, from a thread outside its main arena, above 64 MiB) with a
fresh ``mmap`` and unmaps them on free, so every step page-faults its buffers
in again: a (25088 x 256) @ (256 x 784) float32 matmul took 31,000 page
faults and half its time doing so here (docs/benchmarks.md). PyTorch's CPU
timings swing by up to 10x with the state of its heap for the same reason.

Three settings, reported in every benchmark's header:

* ``default``: glibc as it is (what a plain ``python`` gets).
* ``reuse`` (``--host_malloc reuse``): :func:`reuse_freed_host_memory`, glibc
  told to keep freed memory (one arena, no mmap, no trimming). Fast for big
  single computations, but it slowed the small default training run by a
  third (one arena for all of tf.data's and XLA's threads) and never gives
  memory back (the whole-image segmentation case ran out of 24 GB), so it is
  a benchmarking setting, not one for training.
* ``jemalloc``: the process started with ``LD_PRELOAD=.../libjemalloc.so.2
  MALLOC_CONF=oversize_threshold:0`` (Debian package ``libjemalloc2``); the
  setting we recommend for training on a CPU (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import platform

# mallopt parameters, glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # bytes of free memory at the heap top before glibc returns it


def reuse_freed_host_memory() -> bool:
  """Makes glibc malloc reuse freed memory instead of unmapping it; True if it applied.

  Call it before the first JAX computation: threads that already allocated
  keep their own arena. A no-op (False) where the C library is not glibc.
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))


def jemalloc_preloaded() -> bool:
  """Whether jemalloc replaces malloc in this process (started with ``LD_PRELOAD``)."""
  return "jemalloc" in os.environ.get("LD_PRELOAD", "")


def add_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
      "--host_malloc", default="default", choices=("default", "reuse"),
      help="'default': the C library's malloc as it is; 'reuse': glibc keeps freed memory "
      "(benchmarks.host_malloc), for JAX and the PyTorch reference alike. A process started "
      "with jemalloc preloaded reports 'jemalloc' instead.")


def apply(choice: str) -> str:
  """Applies --host_malloc before the first computation; returns the allocator in force."""
  if jemalloc_preloaded():
    return "jemalloc"
  if choice == "reuse" and reuse_freed_host_memory():
    return "reuse"
  return "default"
