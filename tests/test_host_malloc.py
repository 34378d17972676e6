"""The benchmarks' host-allocator setting: freed large buffers are reused, not faulted in again."""

import os
import pathlib
import platform
import subprocess
import sys
import textwrap

import pytest

from benchmarks import host_malloc
from benchmarks.timing import in_fresh_process

_REPO = pathlib.Path(__file__).resolve().parents[1]

# mallocs, fills and frees 128 MB several times; prints the page faults per round after the
# first (what every XLA execution's fresh buffers cost). Plain malloc: numpy asks for huge pages.
_PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from benchmarks import host_malloc
    if sys.argv[1] == "reuse":
      assert host_malloc.reuse_freed_host_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def round_trip():
      buffer = libc.malloc(128 * 2**20)
      ctypes.memset(buffer, 1, 128 * 2**20)
      libc.free(buffer)
    round_trip()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      round_trip()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
""")


def _faults_per_round(mode: str) -> float:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                       check=True, cwd=_REPO)
  return float(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_reuse_avoids_page_faults_on_large_buffers():
  pages = 128 * 2**20 / 4096
  assert _faults_per_round("default") > 0.9 * pages  # glibc: mmap + munmap every time
  assert _faults_per_round("reuse") < 0.01 * pages


def test_apply_reports_the_allocator_in_force(monkeypatch):
  monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
  assert host_malloc.apply("default") == "jemalloc"
  monkeypatch.delenv("LD_PRELOAD")
  assert host_malloc.apply("default") == "default"


def test_in_fresh_process_runs_in_another_interpreter():
  assert in_fresh_process(os.getpid, host_malloc="default") != os.getpid()
