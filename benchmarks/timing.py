"""Wall-clock timing and process isolation shared by the benchmarks."""

import multiprocessing
import time
from collections.abc import Callable

import numpy as np

from benchmarks.host_malloc import apply as apply_host_malloc


def median_seconds(step: Callable[[], object], repeats: int) -> float:
  """Median wall time of `step()` over `repeats` calls, after one warm-up call.

  `step` must block until its work is done (e.g. ``jax.block_until_ready``).
  """
  step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _call_with_host_malloc(host_malloc: str, fn: Callable, *args):
  apply_host_malloc(host_malloc)
  return fn(*args)


def in_fresh_process(fn: Callable, *args, host_malloc: str):
  """fn(*args) in a new interpreter (spawned, same environment) with --host_malloc applied.

  The PyTorch references run this way: their eager timings then depend
  neither on the heap this process left behind nor on XLA's threads.
  """
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    return pool.apply(_call_with_host_malloc, (host_malloc, fn, *args))
