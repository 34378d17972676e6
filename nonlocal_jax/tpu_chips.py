"""Cloud TPU chips and slices: published per-chip numbers and the names users type.

A slice is named either as Cloud TPU creates it (``gcloud compute tpus
tpu-vm create --accelerator-type=...``) or as a JAX topology string
(``jax.experimental.topologies.get_topology_desc(topology_name=...)``):

* ``v4-N`` and ``v5p-N`` count TensorCores, two per chip: ``v4-8`` is 4
  chips (2x2x1). JAX runs each chip as one device (megacore).
* ``v5e-N`` (``v5litepod-N``) and ``v6e-N`` count chips, one TensorCore
  each: ``v5e-8`` is 8 chips (2x4).
* ``v5e:2x2``, ``v6e:2x4``, ``v4:2x2x1``, ``v5p:2x2x1``: chips along each
  axis of the slice (1x1 / 1x1x1 is one chip, handy for tests).

Chip numbers are Google's published specifications (cloud.google.com/tpu/docs
v4, v5e, v5p, v6e pages): peak bf16 FLOP/s per chip, HBM capacity and
bandwidth per chip. The compiler may not hand out every byte of HBM; a real
device's ``memory_stats()['bytes_limit']`` is the exact figure, which
:func:`nonlocal_jax.memory_fit.check_fits_on_devices` compares a compiled step with.
"""

from __future__ import annotations

import dataclasses
import math
import re


GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: what a roofline and a memory check need per chip."""
  name: str  # 'v5e'
  device_kind: str  # jax.Device.device_kind of its devices
  hbm_bytes: int
  peak_bf16_flops: float  # FLOP/s per chip, dense bf16 matmuls (MXU)
  hbm_bytes_per_second: float
  cores_per_chip: int  # TensorCores; Cloud names of 2-core chips count cores
  axes: int  # 2 (2D torus) or 3 (3D torus / mesh)
  libtpu_name: str  # generation as libtpu's topology names spell it


CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GiB, 275e12, 1200e9, 2, 3, "v4"),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, 1, 2, "v5e"),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9, 2, 3, "v5p"),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9, 1, 2, "v6e"),
}
# Other spellings of a generation, in Cloud names and topology strings.
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e"}

# Chips -> shape of the standard slices (Cloud TPU docs' supported topologies).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: its chip, shape and the arguments of ``get_topology_desc``."""
  name: str  # as the user typed it
  chip: Chip
  shape: tuple[int, ...]  # chips along each axis

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def topology_name(self) -> str:
    """libtpu's name, e.g. 'v5e:2x4', 'v4:2x2x1'."""
    return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

  @property
  def cloud_name(self) -> str:
    """The Cloud TPU accelerator type, e.g. 'v5e-8' ('v4-8' for 4 v4 chips)."""
    return f"{self.chip.name}-{self.num_chips * self.chip.cores_per_chip}"

  def topology_kwargs(self) -> dict:
    """Keyword arguments of ``get_topology_desc`` besides the name (as MaxText's
    ``accelerator_to_spec_map``): one device per 2-core chip ('megacore') and
    the chips one host holds (one chip alone is its own host)."""
    if self.num_chips == 1:
      per_host = (1, 1, 1)
    elif self.chip.axes == 2 and self.num_chips >= 8:
      per_host = (2, 4, 1)  # v5e / v6e hosts hold 8 chips from 2x4 up
    else:
      per_host = (2, 2, 1)
    kwargs = {"chips_per_host_bounds": per_host}
    if self.chip.cores_per_chip == 2:
      kwargs["chip_config_name"] = "megacore"
    return kwargs


def supported_names() -> str:
  """The accepted slice names, for error messages and --help."""
  cores_3d = ", ".join(str(2 * n) for n in _SHAPES_3D)
  chips_2d = ", ".join(str(n) for n in _SHAPES_2D)
  return (f"Cloud TPU names v4-N and v5p-N with N TensorCores (2 per chip) in {{{cores_3d}}}; "
          f"v5e-N (or v5litepod-N) and v6e-N with N chips in {{{chips_2d}}}; or JAX topology "
          "strings such as v5e:2x2, v5e:1x1, v6e:2x4, v4:2x2x1, v5p:2x2x1 (chips per axis)")


def _unknown(name: str, why: str) -> ValueError:
  return ValueError(f"unknown TPU slice {name!r} ({why}); supported: {supported_names()}")


def parse_slice(name: str) -> Slice:
  """'v4-8' / 'v5e-8' / 'v5litepod-8' / 'v5e:2x4' / 'v4:2x2x1' -> Slice; ValueError otherwise."""
  text = name.strip().lower()
  cloud = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
  topology = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", text)
  if not (cloud or topology):
    raise _unknown(name, "expected <generation>-<count> or <generation>:<AxB[xC]>")
  generation = (cloud or topology).group(1)
  generation = _ALIASES.get(generation, generation)
  if generation not in CHIPS:
    raise _unknown(name, f"TPU generation {generation!r} is not one of {sorted(CHIPS)}")
  chip = CHIPS[generation]
  if cloud:
    count = int(cloud.group(2))
    if count % chip.cores_per_chip:
      raise _unknown(name, f"{generation}-N counts TensorCores, {chip.cores_per_chip} per chip")
    chips = count // chip.cores_per_chip
    shapes = _SHAPES_2D if chip.axes == 2 else _SHAPES_3D
    if chips not in shapes:
      raise _unknown(name, f"no standard {generation} slice has {chips} chips")
    return Slice(name, chip, shapes[chips])
  shape = tuple(int(v) for v in topology.group(2).split("x"))
  if len(shape) != chip.axes or min(shape) < 1:
    raise _unknown(name, f"{generation} topologies have {chip.axes} axes")
  return Slice(name, chip, shape)
