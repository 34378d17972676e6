"""Per-chip memory, FLOPs and roofline of the paper's configs on Cloud TPU hosts, from compiles.

    python -m benchmarks.tpu_memory --json docs/tpu_memory.json            # all, resumable
    python -m benchmarks.tpu_memory --configs kinetics.py:c2d_nl5_r50_8x8 --json out.json
    python -m benchmarks.tpu_memory --configs coco.py:maskrcnn_r50_nl1 \
        coco.py:keypointrcnn_r50_nl5 --json docs/tpu_memory.json     # the detectors' cells

Compiles each config's real train step (``nonlocal_jax.aot.analyze``: the
functions, shardings, donation and dtypes of a run, and the batch its input
pipeline would emit: for a detector, the images padded to ``pad_size`` and
the targets dict, full-size masks included) for one v5e chip (``v5e:1x1``)
from abstract shapes, in four cells: float32 at batch 1 and 2 per chip,
bfloat16 at batch 2, float32 with ``remat='blocks'`` at batch 2. The long
clips and the COCO detectors, whose compiles take minutes, get the float32
batch 2 cell alone. Each finished cell is written to ``--json`` at once and
skipped when the command runs again, so a long sweep can be stopped and
resumed.

The table models per-chip memory as fixed + per-example x batch: float32
from its two compiles (exact for a linear program), otherwise from one
compile (fixed = total - temporaries - batch, per-example = (temporaries +
batch) / batch: slightly pessimistic, gradients count as per-example). The
long clips' bfloat16 and remat columns are estimated ('~') from their 8x8
twin's ratios; the detectors have no twin ('-'). The largest batch per chip
(clips or images, as the config's examples) is the largest b whose modelled
memory fits the chip's HBM; v4, v5p and v6e reuse the v5e compiles scaled to
their HBM, peak FLOP/s and bandwidth (their compilers lay memory out
differently: estimates). FLOPs and XLA's HBM byte count are linear in the
batch (two float32 compiles, or proportional to one); the roofline bound
max(FLOPs / bf16 peak, bytes / bandwidth) at the recipe's batch is a lower
bound from a model, not a measured step time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices; JAX itself on the CPU

from absl import logging
import ml_collections

from nonlocal_jax import aot
from nonlocal_jax import tpu_chips

GiB = 2**30
# cell -> (config overrides, batch per chip)
CELLS = {
    "float32/1": ({}, 1),
    "float32/2": ({}, 2),
    "bfloat16/2": ({"compute_dtype": "bfloat16"}, 2),
    "remat_blocks/2": ({"remat": "blocks"}, 2),
}
# Long clip -> the 8x8 net of the same arch and placement, whose bfloat16 / remat ratios
# estimate the long clip's (3-6 minutes per compile on 2 cores: one float32 compile each).
TWINS = {f"kinetics.py:{arch}_{placement}_r50_{clip}": f"kinetics.py:{arch}_{placement}_r50_8x8"
         for clip in ("32x2", "128x1") for arch in ("c2d", "i3d")
         for placement in ("baseline", "nl5")}
# config -> its cells. The COCO detectors (Mask R-CNN and Keypoint R-CNN R50-FPN at 1344 x 1344)
# get one float32 compile and no estimates.
CONFIGS = {
    **{f"kinetics.py:{arch}_{placement}_r50_8x8": tuple(CELLS) for arch in ("c2d", "i3d")
       for placement in ("baseline", "nl5")},
    "kinetics.py:i3d_nl5_r101_8x8": tuple(CELLS),
    "segmentation.py:cityscapes_r50_512x1024_40k": tuple(CELLS),
    **{name: ("float32/2",) for name in TWINS},
    "coco.py:maskrcnn_r50_nl1": ("float32/2",),
    "coco.py:keypointrcnn_r50_nl5": ("float32/2",),
}
COMPILED_ON = "v5e:1x1"
# Cloud TPU 8-TensorCore / 8-chip hosts the table is for.
HOSTS = ("v4-8", "v5e-8", "v5p-8", "v6e-8")


def load_config(name: str) -> ml_collections.ConfigDict:
  """'kinetics.py:variant' -> configs/kinetics.py's get_config('variant')."""
  path, _, variant = name.partition(":")
  module = importlib.import_module(f"configs.{path.removesuffix('.py')}")
  return module.get_config(variant) if variant else module.get_config()


def compile_cell(config_name: str, cell: str) -> dict:
  """One train-step compile on one v5e chip: its per-chip bytes, FLOPs and compile time."""
  overrides, batch = CELLS[cell]
  config = load_config(config_name)
  config.update(overrides)
  tpu_slice = tpu_chips.parse_slice(COMPILED_ON)
  config = aot.with_batch(config, tpu_slice.num_chips, batch, 1)
  step = aot.analyze(config, tpu_slice, config_name=config_name, train_only=True).train
  return {"total": step.total_bytes, "temp": step.temp_bytes, "batch_bytes": step.batch_bytes,
          "state": step.state_bytes, "flops": step.flops, "bytes_accessed": step.bytes_accessed,
          "compile_seconds": step.compile_seconds, "compiler_error": step.compiler_error}


def linear_model(cells: dict, cell: str) -> tuple[float, float]:
  """(fixed, per-example) bytes of a cell's memory (see the module docstring)."""
  if cell == "float32" and "float32/1" in cells:
    one, two = cells["float32/1"]["total"], cells["float32/2"]["total"]
    return 2 * one - two, two - one
  c = cells[f"{cell}/2"]
  return c["total"] - c["temp"] - c["batch_bytes"], (c["temp"] + c["batch_bytes"]) / 2


def memory_models(results: dict, name: str) -> tuple[dict, bool]:
  """({cell: (fixed, per-example) or None}, estimated).

  bfloat16 and remat come from their own compiles, else are estimated from the
  twin's ratios (:data:`TWINS`), else are None (no compile, no twin).
  """
  cells = results[name]
  models = {"float32": linear_model(cells, "float32")}
  if "bfloat16/2" in cells:
    return {**models, **{c: linear_model(cells, c) for c in ("bfloat16", "remat_blocks")}}, False
  if name not in TWINS:
    return {**models, "bfloat16": None, "remat_blocks": None}, False
  twin = results[TWINS[name]]
  base_fixed, base_per_example = linear_model(twin, "float32")
  for cell in ("bfloat16", "remat_blocks"):
    fixed, per_example = linear_model(twin, cell)
    models[cell] = (models["float32"][0] * fixed / base_fixed,
                    models["float32"][1] * per_example / base_per_example)
  return models, True


def largest_batch(fixed: float, per_example: float, hbm: int) -> int:
  return max(int((hbm - fixed) // per_example), 0)


def _ready(results: dict, name: str) -> bool:
  """Whether `name`'s compiles, and its twin's when it has one, are done and compiled."""
  cells = results.get(name, {})
  if any(c not in cells or cells[c]["compiler_error"] for c in CONFIGS[name]):
    return False
  return name not in TWINS or all(c in results.get(TWINS[name], {}) for c in CELLS)


def table_rows(results: dict) -> list[dict]:
  """One row per (config, host) whose compiles are done; see the module docstring."""
  rows = []
  for name in filter(lambda n: _ready(results, n), CONFIGS):
    models, estimated = memory_models(results, name)
    one, two = results[name].get("float32/1"), results[name]["float32/2"]
    config = load_config(name)
    global_batch, unit = config.batch_size, "clips" if config.modality == "video" else "images"
    for host in HOSTS:
      tpu_slice = tpu_chips.parse_slice(host)
      chip, recipe = tpu_slice.chip, global_batch // tpu_slice.num_chips
      fixed, per_example = models["float32"]
      # FLOPs and bytes are linear in the batch: from two compiles, or proportional to one.
      if one:
        flops = one["flops"] + (two["flops"] - one["flops"]) * (recipe - 1)
        traffic = one["bytes_accessed"] + (two["bytes_accessed"] - one["bytes_accessed"]) * (
            recipe - 1)
      else:
        flops, traffic = two["flops"] * recipe / 2, two["bytes_accessed"] * recipe / 2
      compute, memory = flops / chip.peak_bf16_flops, traffic / chip.hbm_bytes_per_second
      rows.append({
          "config": name, "host": host, "unit": unit, "recipe_batch_per_chip": recipe,
          "estimated": estimated,
          **{f"max_batch_{cell}": model and largest_batch(*model, chip.hbm_bytes)
             for cell, model in models.items()},
          "recipe_gib_float32": (fixed + per_example * recipe) / GiB,
          "recipe_gflop": flops / 1e9,
          "roofline_ms": max(compute, memory) * 1e3,
          "bound": "compute" if compute >= memory else "HBM",
      })
  return rows


def print_table(rows: list[dict]) -> None:
  """The markdown table: '~' marks an estimate from the twin, '-' a column without one."""
  print(f"| config | host (batch / chip at the recipe) | largest batch / chip: f32 | bf16 | "
        f"f32 + remat='blocks' | memory / chip at the recipe batch, f32 | GFLOP / step / chip | "
        f"roofline bound / step |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    mark = "~" if r["estimated"] else ""
    bf16, remat = (("-" if r[f"max_batch_{c}"] is None else f"{mark}{r[f'max_batch_{c}']}")
                   for c in ("bfloat16", "remat_blocks"))
    unit = r["unit"] if r["recipe_batch_per_chip"] != 1 else r["unit"].removesuffix("s")
    print(f"| {r['config']} | {r['host']} ({r['recipe_batch_per_chip']} {unit}) | "
          f"{r['max_batch_float32']} | {bf16} | {remat} | "
          f"{r['recipe_gib_float32']:.1f} GiB | {r['recipe_gflop']:,.0f} | "
          f"{r['roofline_ms']:.0f} ms ({r['bound']}) |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument("--json", help="results so far (read first, then written after each cell)")
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  results = {}
  if args.json and os.path.exists(args.json):
    with open(args.json) as f:
      results = json.load(f)["compiles"]
  for name in args.configs:
    for cell in CONFIGS[name]:
      if cell in results.get(name, {}):
        continue
      results.setdefault(name, {})[cell] = compile_cell(name, cell)
      c = results[name][cell]
      print(f"{name} {cell}: {c['total'] / GiB:.2f} GiB (batch {c['batch_bytes'] / GiB:.2f} GiB, "
            f"temporaries {c['temp'] / GiB:.2f} GiB), {c['flops'] / 1e9:,.0f} GFLOP, compiled in "
            f"{c['compile_seconds']:.0f} s", flush=True)
      if args.json:
        with open(args.json, "w") as f:
          json.dump({"compiled_on": COMPILED_ON, "compiles": results,
                     "table": table_rows(results)}, f, indent=1)
  print_table(table_rows(results))


if __name__ == "__main__":
  main()
