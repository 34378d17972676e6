"""Wall-clock timing shared by the benchmarks."""

import time
from collections.abc import Callable

import numpy as np


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
