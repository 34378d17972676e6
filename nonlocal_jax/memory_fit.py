"""Does a compiled step fit in a device's memory? Checked before the first step of a run.

XLA's ``memory_analysis()`` of the compiled step gives the bytes one device
holds; on accelerators ``device.memory_stats()['bytes_limit']`` gives what it
has. Comparing them before the first step turns an out-of-memory error deep
in the run into a message with the numbers and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from nonlocal_jax.tpu_chips import GiB

FIX_HINT = ("use a smaller per-chip batch, config.remat='blocks' (recompute activations in the "
            "backward pass) or config.compute_dtype='bfloat16'")


class StepDoesNotFitError(RuntimeError):
  """A compiled step needs more memory per device than the device has."""


def required_bytes(memory: Any) -> int:
  """Peak bytes one device holds for a compiled step, from its ``memory_analysis()``.

  Arguments + outputs - donated (aliased) outputs + temporaries + code: the
  state and batch in, the new state written over the donated old one, the
  activations and gradients of the step.
  """
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes
             + memory.generated_code_size_in_bytes)


def check_fits_on_devices(compiled: jax.stages.Compiled, devices: Sequence[jax.Device], *,
                          name: str = "train step") -> None:
  """Raises StepDoesNotFitError if `compiled` needs more memory than a device of `devices` has.

  Compares ``compiled.memory_analysis()`` (per device) with each device's
  ``memory_stats()['bytes_limit']``. CPU devices, and devices without memory
  statistics, are skipped (host memory is not a fixed budget).
  """
  limits = []
  for device in devices:
    if device.platform == "cpu":
      continue
    stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
      limits.append((int(stats["bytes_limit"]), device))
  if not limits:
    return
  memory = compiled.memory_analysis()
  if memory is None:
    return
  need = required_bytes(memory)
  limit, device = min(limits, key=lambda pair: pair[0])
  if need > limit:
    raise StepDoesNotFitError(
        f"the {name} needs {need / GiB:.2f} GiB per device (arguments "
        f"{memory.argument_size_in_bytes / GiB:.2f}, temporaries {memory.temp_size_in_bytes / GiB:.2f}"
        f" GiB) but {device.device_kind} {device.id} has {limit / GiB:.2f} GiB: {FIX_HINT}. "
        "`python -m nonlocal_jax.aot` finds the largest batch that fits without a TPU.")
