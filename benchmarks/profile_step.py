"""Where a train step spends its time: a jax.profiler trace, summed per XLA operation.

    python -m benchmarks.profile_step                         # i3d_nl5_r50, batch 4, 8x112x112
    python -m benchmarks.profile_step --model c2d_r50 --top 20 --json out.json

Traces two steps of ``train.train_step`` (after warm-up) with
``jax.profiler.trace(create_perfetto_trace=True)``, adds up the durations of
the XLA thunks per operation and per kind of operation (the fusion name
without its number), and names each of the slowest operations by its HLO
(output shape and the JAX operation it came from). Times are summed over the
executor's threads, so they can exceed the wall time of a step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

from benchmarks import host_malloc
from benchmarks.train_step import jitted_step, step_config

_SKIP = ("ThunkExecutor", "ThreadpoolListener", "Slinky", "$")


def trace_step(model: str, batch: int, frames: int, crop: int, trace_dir: str) -> str:
  """Runs two traced steps; returns the compiled step's HLO text."""
  step, state, data = jitted_step(step_config(model, batch), frames, crop)
  hlo = step.lower(state, data).compile().as_text()
  for _ in range(2):
    state, _ = step(state, data)
  jax.block_until_ready(state)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(2):
      state, _ = step(state, data)
      jax.block_until_ready(state)
  return hlo


def thunk_times(trace_dir: str) -> collections.Counter:
  """{XLA operation name: microseconds} over the traced steps."""
  path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  threads = {e["tid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  times = collections.Counter()
  for e in events:
    if (e.get("ph") == "X" and threads.get(e.get("tid"), "").startswith("tf_XLA")
        and not e["name"].startswith(_SKIP) and not e["name"].startswith("end: ")):
      times[e["name"]] += e["dur"]
  return times


def describe(name: str, hlo: str) -> str:
  """Output shape and originating JAX operation of the HLO instruction `name`."""
  match = re.search(rf"\n\s*%{re.escape(name)} = (\S+) [^\n]*", hlo)
  if not match:
    return ""
  op = re.search(r'op_name="([^"]*)"', match.group(0))
  return f"{match.group(1)} {op.group(1).split('/')[-1] if op else ''}".strip()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="i3d_nl5_r50")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--crop", type=int, default=112)
  parser.add_argument("--top", type=int, default=12)
  parser.add_argument("--json")
  host_malloc.add_argument(parser)
  args = parser.parse_args(argv)
  allocator = host_malloc.apply(args.host_malloc)
  with tempfile.TemporaryDirectory() as trace_dir:
    hlo = trace_step(args.model, args.batch, args.frames, args.crop, trace_dir)
    times = thunk_times(trace_dir)
  steps = 2
  kinds = collections.Counter()
  for name, us in times.items():
    kinds[re.sub(r"\.\d+$", "", name)] += us
  total = sum(times.values())
  print(f"# {args.model}, batch {args.batch}, {args.frames}x{args.crop}x{args.crop}: "
        f"{total / steps / 1e3:.0f} ms of XLA operations per step (host malloc {allocator})")
  print(f"{'ms/step':>8} {'share':>6}  kind of operation")
  for kind, us in kinds.most_common(args.top):
    print(f"{us / steps / 1e3:8.1f} {100 * us / total:5.1f}%  {kind}")
  print(f"\n{'ms/step':>8}  slowest operations (output, origin)")
  slowest = times.most_common(args.top)
  for name, us in slowest:
    print(f"{us / steps / 1e3:8.1f}  {name}: {describe(name, hlo)}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"model": args.model, "ms_per_step": total / steps / 1e3,
                 "kinds_ms": {k: v / steps / 1e3 for k, v in kinds.most_common()},
                 "slowest_ms": {n: [v / steps / 1e3, describe(n, hlo)] for n, v in slowest}},
                f, indent=1)


if __name__ == "__main__":
  main()
