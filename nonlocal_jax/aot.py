"""Ahead-of-time compilation for a Cloud TPU slice on any machine: per-chip memory, FLOPs, fit.

    python -m nonlocal_jax.aot --config configs/kinetics.py:i3d_nl5_r50_8x8 --topology v5e-8 \
        [--batch_size 8] [--config.compute_dtype=bfloat16] [--max_batch] [--json FILE]

Compiles exactly the train and eval steps a run of the config would use
(``train.create_steps``: same functions, shardings over ``train.create_mesh``,
donation and dtypes) from abstract shapes only, for the compile-only devices
of the slice (``jax.experimental.topologies.get_topology_desc``; needs libtpu,
``pip install -r requirements-tpu.txt``, but no TPU). It prints per chip the
parameters + optimizer state, the batch, the temporaries and the total against
the chip's HBM (XLA's ``memory_analysis()``), FLOPs and HBM bytes per step
(``cost_analysis()``), a roofline lower bound on the step time, and
``fits: yes|no (X.X of Y GiB)``; the exit code is 0 when both steps fit, 1
when one does not. ``--batch_size`` is per chip. ``--max_batch`` searches the
largest per-chip train batch that fits (doubling, then bisection).

:func:`~nonlocal_jax.memory_fit.check_fits_on_devices` is the same check for a
real run, against the devices' own memory limits.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from nonlocal_jax import config_validation, input_pipeline, train
from nonlocal_jax.memory_fit import required_bytes
from nonlocal_jax.tpu_chips import GiB, Slice, parse_slice

def libtpu_available() -> bool:
  """True if the libtpu package (the TPU compiler, ``jax[tpu]``) is installed."""
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(tpu_slice: Slice) -> list[jax.Device]:
  """The compile-only devices of `tpu_slice` (one per chip), from libtpu's topology description."""
  if not libtpu_available():
    raise RuntimeError(f"compiling for {tpu_slice.name!r} needs libtpu, which is not installed: "
                       "pip install -r requirements-tpu.txt")
  from jax.experimental import topologies

  # libtpu takes a lock file so that one process owns the local TPU; these
  # devices only compile, so another process (a run, a test) may hold it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  topology = topologies.get_topology_desc(topology_name=tpu_slice.topology_name, platform="tpu",
                                          **tpu_slice.topology_kwargs())
  devices = list(topology.devices)
  if len(devices) != tpu_slice.num_chips:
    raise RuntimeError(f"topology {tpu_slice.topology_name!r} gave {len(devices)} devices, "
                       f"expected one per chip ({tpu_slice.num_chips})")
  return devices


def dataset_features(config: ml_collections.ConfigDict) -> Any:
  """``builder.info.features`` of ``config.dataset`` without reading or preparing any data.

  Our builders (``input_pipeline.LOCAL_BUILDERS``) are constructed over an
  empty temporary data dir; TFDS catalog builders (imagenet2012, cifar10, ...)
  describe their features in code, which ``tfds.builder`` loads offline.
  """
  import tensorflow_datasets as tfds

  name, _, builder_config = config.dataset.partition("/")
  with tempfile.TemporaryDirectory() as data_dir:
    if name in input_pipeline.LOCAL_BUILDERS:
      kwargs = {"config": builder_config} if builder_config else {}
      return input_pipeline.LOCAL_BUILDERS[name](data_dir=data_dir, **kwargs).info.features
    return tfds.builder(config.dataset, data_dir=data_dir).info.features


def batch_specs(config: ml_collections.ConfigDict, features: Any,
                sharding: jax.sharding.Sharding) -> tuple[dict, dict]:
  """(train batch, eval batch) as global ShapeDtypeStructs split over 'data' like a real batch."""
  def attach(spec):
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding), spec)
  return (attach(input_pipeline.batch_spec(config, features, train=True)),
          attach(input_pipeline.batch_spec(config, features, train=False)))


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays (or ShapeDtypeStructs) of `tree`; PRNG keys count their key data."""
  def nbytes(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.eval_shape(jax.random.key_data, x)
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize
  return sum(nbytes(x) for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class StepReport:
  """Per-chip memory and cost of one compiled step. Bytes are per chip."""
  name: str  # 'train' or 'eval'
  batch_per_chip: int
  global_batch: int
  state_bytes: int  # parameters + optimizer state (replicated: whole on every chip)
  batch_bytes: int  # this chip's share of the batch
  argument_bytes: int  # memory_analysis(): state + batch as compiled
  output_bytes: int
  alias_bytes: int  # outputs written over donated arguments (the new state)
  temp_bytes: int  # activations, gradients, workspace
  code_bytes: int
  total_bytes: int  # required_bytes(): what must fit in HBM
  flops: float  # cost_analysis() of the chip's program
  bytes_accessed: float
  compute_seconds: float  # flops / peak
  memory_seconds: float  # bytes accessed / HBM bandwidth
  compile_seconds: float
  compiler_error: str = ""  # XLA:TPU refused the program: it cannot fit in HBM

  @property
  def roofline_seconds(self) -> float:
    """Lower bound on the step time: neither compute nor HBM traffic can be beaten."""
    return max(self.compute_seconds, self.memory_seconds)


@dataclasses.dataclass
class Report:
  """A config's steps compiled for a slice: the chip's numbers and each step's report."""
  config: str
  model: str
  compute_dtype: str
  slice_name: str
  topology: str
  cloud_name: str
  num_chips: int
  device_kind: str
  hbm_bytes: int
  peak_flops: float
  hbm_bytes_per_second: float
  train: StepReport
  eval: StepReport | None

  @property
  def total_bytes(self) -> int:
    return max(self.train.total_bytes, self.eval.total_bytes if self.eval else 0)

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.hbm_bytes

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    for step in ("train", "eval"):
      if out[step] is not None:
        out[step]["roofline_seconds"] = getattr(self, step).roofline_seconds
    out.update(total_bytes=self.total_bytes, fits=self.fits)
    return out


# XLA:TPU's refusal, e.g. "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required
# for HLO temporaries (19.19G) exceeds available HBM (15.75G)."
_OUT_OF_HBM = re.compile(r"required for [^(]*\(([\d.]+)([KMGT])\)")


def _out_of_hbm_report(name: str, error: str, state: Any, batch: dict, tpu_slice: Slice,
                       compile_seconds: float) -> StepReport:
  """The report of a step the TPU compiler refused for lack of HBM: its stated need, no costs."""
  match = _OUT_OF_HBM.search(error)
  need = (float(match.group(1)) * 1024**"KMGT".index(match.group(2)) * 1024 if match
          else tpu_slice.chip.hbm_bytes + 1)
  global_batch = batch["inputs"].shape[0]
  return StepReport(
      name=name, batch_per_chip=global_batch // tpu_slice.num_chips, global_batch=global_batch,
      state_bytes=tree_bytes(state), batch_bytes=tree_bytes(batch) // tpu_slice.num_chips,
      argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=0, code_bytes=0,
      total_bytes=max(int(need), tpu_slice.chip.hbm_bytes + 1), flops=0.0, bytes_accessed=0.0,
      compute_seconds=0.0, memory_seconds=0.0, compile_seconds=compile_seconds,
      compiler_error=error.strip().splitlines()[0])


def _step_report(name: str, compiled: jax.stages.Compiled, state: Any, batch: dict,
                 tpu_slice: Slice, compile_seconds: float) -> StepReport:
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  flops, bytes_accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  global_batch = batch["inputs"].shape[0]
  return StepReport(
      name=name, batch_per_chip=global_batch // tpu_slice.num_chips, global_batch=global_batch,
      state_bytes=tree_bytes(state), batch_bytes=tree_bytes(batch) // tpu_slice.num_chips,
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes), total_bytes=required_bytes(memory),
      flops=flops, bytes_accessed=bytes_accessed,
      compute_seconds=flops / tpu_slice.chip.peak_bf16_flops,
      memory_seconds=bytes_accessed / tpu_slice.chip.hbm_bytes_per_second,
      compile_seconds=compile_seconds)


def with_batch(config: ml_collections.ConfigDict, num_chips: int, batch_per_chip: int | None,
               eval_batch_per_chip: int | None) -> ml_collections.ConfigDict:
  """`config` with per-chip batch sizes applied and both global sizes checked against the chips."""
  config = config.copy_and_resolve_references()
  if batch_per_chip is not None:
    config.batch_size = batch_per_chip * num_chips
  if eval_batch_per_chip is not None:
    config.eval_batch_size = eval_batch_per_chip * num_chips
  for name, flag in (("batch_size", "--batch_size"), ("eval_batch_size", "--eval_batch_size")):
    if config[name] < num_chips or config[name] % num_chips:
      raise ValueError(f"config.{name}={config[name]} is not a positive multiple of the "
                       f"{num_chips} chips; set {flag} (per chip)")
  return config


def abstract_steps(config: ml_collections.ConfigDict, tpu_slice: Slice,
                   devices: Sequence[jax.Device] | None = None,
                   features: Any = None) -> tuple[train.Steps, dict, dict]:
  """(steps, train batch, eval batch) of `config` on a mesh of the slice's devices, all abstract."""
  devices = topology_devices(tpu_slice) if devices is None else devices
  config_validation.validate_config(config, len(devices))
  features = dataset_features(config) if features is None else features
  config = config_validation.resolve_num_classes(config, features)
  steps = train.create_steps(config, train.create_mesh(list(devices)))
  return (steps, *batch_specs(config, features, steps.data_sharding))


def compile_steps(config: ml_collections.ConfigDict, tpu_slice: Slice, *,
                  devices: Sequence[jax.Device] | None = None, features: Any = None,
                  train_only: bool = False) -> tuple[train.Steps, dict]:
  """Compiles the config's train (and eval) step for the slice's devices.

  Returns (steps, {'train': (Compiled, batch, seconds), 'eval': ...}); the
  batch is the abstract global batch the step was compiled for.
  """
  steps, train_batch, eval_batch = abstract_steps(config, tpu_slice, devices, features)
  compiled = {}
  for name, fn, batch in (("train", steps.train_step, train_batch),
                          ("eval", steps.eval_step, eval_batch)):
    if name == "eval" and train_only:
      continue
    start = time.perf_counter()
    compiled[name] = (fn.lower(steps.abstract_state, batch).compile(), batch,
                      time.perf_counter() - start)
  return steps, compiled


def analyze(config: ml_collections.ConfigDict, tpu_slice: Slice, *, config_name: str = "",
            devices: Sequence[jax.Device] | None = None, features: Any = None,
            train_only: bool = False) -> Report:
  """Compiles and measures the steps of `config` (batch sizes as set: global) on `tpu_slice`.

  A step the TPU compiler refuses for lack of HBM is reported as not fitting,
  with the need the compiler states.
  """
  steps, train_batch, eval_batch = abstract_steps(config, tpu_slice, devices, features)
  reports = {}
  for name, fn, batch in (("train", steps.train_step, train_batch),
                          ("eval", steps.eval_step, eval_batch)):
    if name == "eval" and train_only:
      continue
    start = time.perf_counter()
    try:
      compiled = fn.lower(steps.abstract_state, batch).compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      reports[name] = _out_of_hbm_report(name, str(e), steps.abstract_state, batch, tpu_slice,
                                         time.perf_counter() - start)
      continue
    reports[name] = _step_report(name, compiled, steps.abstract_state, batch, tpu_slice,
                                 time.perf_counter() - start)
  chip = tpu_slice.chip
  return Report(
      config=config_name, model=config.model.name,
      compute_dtype=config.compute_dtype, slice_name=tpu_slice.name,
      topology=tpu_slice.topology_name, cloud_name=tpu_slice.cloud_name,
      num_chips=tpu_slice.num_chips, device_kind=chip.device_kind, hbm_bytes=chip.hbm_bytes,
      peak_flops=chip.peak_bf16_flops, hbm_bytes_per_second=chip.hbm_bytes_per_second,
      train=reports["train"], eval=reports.get("eval"))


def find_max_batch(fits: Callable[[int], bool], start: int = 1,
                   limit: int = 1 << 16) -> tuple[int, int]:
  """Largest b >= 1 with fits(b), assuming fits is monotone: doubling from `start`, then bisection.

  Returns (largest fitting batch or 0 if even 1 does not fit, calls of fits).
  """
  calls = 0

  def probe(b):
    nonlocal calls
    calls += 1
    return fits(b)

  low, high = 0, None  # low fits (0: nothing known to fit), high does not fit
  b = max(start, 1)
  while high is None:
    if probe(b):
      low = b
      if b >= limit:
        return b, calls
      b *= 2
    else:
      high = b
      if b == 1:
        return 0, calls
      if low == 0:  # started above the answer: halve down until one fits
        while b > 1 and low == 0:
          b //= 2
          if probe(b):
            low = b
          else:
            high = b
        if low == 0:
          return 0, calls
  while high - low > 1:
    mid = (low + high) // 2
    if probe(mid):
      low = mid
    else:
      high = mid
  return low, calls


def _size(n: float) -> str:
  """Bytes in GiB, or MiB below 1 GiB, right-aligned."""
  return f"{n / GiB:8.2f} GiB" if n >= GiB else f"{n / 2**20:8.2f} MiB"


def _seconds(s: float) -> str:
  return f"{s * 1e3:.2f} ms"


def format_report(report: Report) -> str:
  """The human-readable report, ending with the verdict line."""
  names = sorted({report.slice_name, report.topology, report.cloud_name}, key=len)
  lines = [
      f"config: {report.config or '-'}  model: {report.model}  compute dtype: "
      f"{report.compute_dtype}",
      f"slice: {' = '.join(names)}: {report.num_chips} chip(s) of {report.device_kind}, "
      f"{report.hbm_bytes / GiB:.0f} GiB HBM, {report.peak_flops / 1e12:.0f} TFLOP/s bf16, "
      f"{report.hbm_bytes_per_second / 1e9:.0f} GB/s each",
  ]
  for step in (report.train, report.eval):
    if step is None:
      continue
    if step.compiler_error:
      lines += [
          f"{step.name} step: batch {step.batch_per_chip} per chip ({step.global_batch} global): "
          f"the TPU compiler refused it after {step.compile_seconds:.1f} s:",
          f"  {step.compiler_error}",
          f"  parameters + optimizer state {_size(step.state_bytes)}",
          f"  total                        {_size(step.total_bytes)} or more, of "
          f"{report.hbm_bytes / GiB:.0f} GiB HBM",
      ]
      continue
    lines += [
        f"{step.name} step: batch {step.batch_per_chip} per chip ({step.global_batch} global), "
        f"compiled in {step.compile_seconds:.1f} s; per chip:",
        f"  parameters + optimizer state {_size(step.state_bytes)}",
        f"  batch                        {_size(step.batch_bytes)}",
        f"  arguments (as compiled)      {_size(step.argument_bytes)}",
        f"  outputs - donated            {_size(step.output_bytes - step.alias_bytes)}",
        f"  temporaries                  {_size(step.temp_bytes)}",
        f"  generated code               {_size(step.code_bytes)}",
        f"  total                        {_size(step.total_bytes)} of "
        f"{report.hbm_bytes / GiB:.0f} GiB HBM",
        f"  FLOPs                        {step.flops / 1e9:8.2f} GFLOP",
        f"  HBM bytes accessed           {step.bytes_accessed / 1e9:8.2f} GB",
        f"  roofline lower bound         {_seconds(step.roofline_seconds)} (compute "
        f"{_seconds(step.compute_seconds)} at the bf16 peak, HBM {_seconds(step.memory_seconds)})",
    ]
  lines.append("roofline: a lower bound from peak FLOP/s and HBM bandwidth, not a measurement; "
               "float32 matmuls use the bf16 peak too (XLA:TPU's default precision computes them "
               "in one bf16 pass)")
  verdict = "yes" if report.fits else "no"
  lines.append(f"fits: {verdict} ({report.total_bytes / GiB:.1f} of "
               f"{report.hbm_bytes / GiB:.0f} GiB)")
  return "\n".join(lines)


def define_flags() -> None:
  """The CLI's absl flags (defined on demand: main.py defines its own --config)."""
  from absl import flags
  from ml_collections import config_flags

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config_flags.DEFINE_config_file(
      "config", os.path.join(root, "configs", "default.py"),
      "Experiment config file, optionally with ':variant' (as main.py).", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice: v4-8, v5e-8 / v5litepod-8, v5p-8, v6e-8, "
                      "v5e-16, v4-32, ... or a JAX topology string (v5e:2x2, v4:2x2x1).")
  flags.DEFINE_integer("batch_size", None, "Train batch per chip (default: config.batch_size / "
                       "chips).", lower_bound=1)
  flags.DEFINE_integer("eval_batch_size", None, "Eval batch per chip (default: "
                       "config.eval_batch_size / chips).", lower_bound=1)
  flags.DEFINE_bool("max_batch", False, "Search the largest per-chip train batch that fits "
                    "(doubling from --batch_size or 1, then bisection; one compile per probe).")
  flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
  flags.mark_flag_as_required("topology")


def main(argv: Sequence[str]) -> int:
  """The CLI on parsed flags; returns the exit code (0: fits, 1: does not fit, 2: bad flags)."""
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:  # configs/*.py import `configs.common`
    sys.path.insert(0, root)
  try:
    tpu_slice = parse_slice(FLAGS.topology)
    config = with_batch(FLAGS.config, tpu_slice.num_chips, FLAGS.batch_size,
                        FLAGS.eval_batch_size)
  except ValueError as e:  # exit code 2: a usage error, not a verdict
    raise app.UsageError(str(e), exitcode=2) from e
  devices = topology_devices(tpu_slice)
  features = dataset_features(config)

  config_name = FLAGS["config"].config_filename
  if os.path.isabs(config_name) and config_name.startswith(os.getcwd() + os.sep):
    config_name = os.path.relpath(config_name)
  report = analyze(config, tpu_slice, config_name=config_name,
                   devices=devices, features=features)
  out = report.to_json()
  print(format_report(report), flush=True)
  if FLAGS.max_batch:
    eval_bytes = report.eval.total_bytes if report.eval else 0

    def fits(batch_per_chip: int) -> bool:
      probe = with_batch(config, tpu_slice.num_chips, batch_per_chip, None)
      r = analyze(probe, tpu_slice, devices=devices, features=features, train_only=True)
      ok = max(r.train.total_bytes, eval_bytes) <= tpu_slice.chip.hbm_bytes
      print(f"  batch {batch_per_chip} per chip: train step {r.train.total_bytes / GiB:.2f} GiB "
            f"({'fits' if ok else 'does not fit'})", flush=True)
      return ok

    best, compiles = find_max_batch(fits, start=FLAGS.batch_size or 1)
    print(f"max batch: {best} per chip ({best * tpu_slice.num_chips} global) on "
          f"{tpu_slice.name}, found with {compiles} compiles")
    out.update(max_batch_per_chip=best, max_batch_compiles=compiles)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0 if report.fits else 1


def run() -> None:
  """Entry point: parses the flags, compiles, exits 0 (fits) or 1 (does not fit)."""
  from absl import app

  # Compile-only TPU devices need no TPU backend: keep JAX itself on the CPU, so
  # the chips of a TPU VM (maybe busy training) are not touched.
  jax.config.update("jax_platforms", "cpu")
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
