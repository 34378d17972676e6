"""Train-step throughput (clips/s) and peak memory: our jit step against PyTorch eager.

    python -m benchmarks.train_step                                 # 4 models, 8x112x112, batch 4
    python -m benchmarks.train_step --models i3d_nl5_r50 --crop 160 --json out.json
    python -m benchmarks.train_step --dtype bfloat16 --no_torch   # our bf16 compute alone
    python -m benchmarks.train_step --models i3d_nl5_r50 --rounds 3  # alternate, keep the best

The JAX side is the real ``train.train_step`` (SGD, Nesterov, masked weight
decay, BN in training mode, state donated) on one device; the PyTorch side
is the same network built as PySlowFast builds it
(:mod:`benchmarks.torch_video_resnet`) with ``torch.optim.SGD``, in eager
mode with as many threads as cores. Peak memory for JAX is the compiled
memory analysis; PyTorch runs in a fresh process (so that its timing depends
neither on this process' heap nor on XLA's threads), whose peak RSS is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import host_malloc
from benchmarks.timing import in_fresh_process, median_seconds
from configs import common
from nonlocal_jax import train

MODELS = {  # registry name: (torch arch, NL placement)
    "c2d_r50": ("c2d", ((), (), (), ())),
    "i3d_r50": ("i3d", ((), (), (), ())),
    "c2d_nl5_r50": ("c2d", ((), (1, 3), (1, 3, 5), ())),
    "i3d_nl5_r50": ("i3d", ((), (1, 3), (1, 3, 5), ())),
}


def step_config(model: str, batch: int, dtype: str = "float32") -> ml_collections.ConfigDict:
  config = common.base_config()
  config.model.name = model
  config.compute_dtype = dtype
  config.num_classes = 400
  config.batch_size = batch
  config.learning_rate = 0.01
  return config


def jitted_step(config: ml_collections.ConfigDict, frames: int, crop: int):
  """Our donated, jitted train step on one device, its initial state and a random batch."""
  steps = train.create_steps(config, train.create_mesh(jax.devices()[:1]))
  state = train.init_state(config, steps)
  batch = config.batch_size
  data = {"inputs": jnp.asarray(np.random.default_rng(0).normal(
      size=(batch, frames, crop, crop, 3)), jnp.float32), "label": jnp.zeros((batch,), jnp.int32)}
  return steps.train_step, state, data


def compile_jax_step(model: str, batch: int, frames: int, crop: int, dtype: str = "float32"):
  """Compiles our step once; returns a timer (repeats -> clips/s) and its compiled cost.

  The timer can be called once per round: the donated state is carried over.
  """
  step, state, batch_data = jitted_step(step_config(model, batch, dtype), frames, crop)
  compiled = step.lower(state, batch_data).compile()
  memory = compiled.memory_analysis()
  holder = {"state": state}

  def run():  # the state is donated: keep the newest one
    holder["state"], _ = compiled(holder["state"], batch_data)
    jax.block_until_ready(holder["state"])

  def clips_per_s(repeats: int) -> float:
    return batch / median_seconds(run, repeats)

  peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
  return clips_per_s, {"peak_bytes": int(peak), "step_flops": compiled.cost_analysis()["flops"]}


def torch_throughput(model: str, batch: int, frames: int, crop: int, repeats: int) -> dict:
  import torch

  from benchmarks.torch_video_resnet import VideoResNet

  torch.set_num_threads(os.cpu_count())
  arch, nonlocal_blocks = MODELS[model]
  net = VideoResNet(arch, 50, 400, nonlocal_blocks).train()
  optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                              weight_decay=1e-4)
  x = torch.randn(batch, 3, frames, crop, crop)
  y = torch.zeros(batch, dtype=torch.long)

  def step():
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()

  seconds = median_seconds(step, repeats)
  # Run in a fresh process (in_fresh_process): its peak RSS is PyTorch's whole footprint.
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {"clips_per_s": batch / seconds, "peak_rss_bytes": peak_rss}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--crop", type=int, default=112)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=1,
                      help="alternate ours and PyTorch this many times per model and keep "
                      "each side's fastest round (a shared machine's slow phases then hit both)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="our compute dtype (parameters stay float32)")
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--json")
  host_malloc.add_argument(parser)
  args = parser.parse_args(argv)
  if args.rounds < 1 or args.repeats < 1:
    parser.error(f"--rounds and --repeats must be >= 1; got {args.rounds} and {args.repeats}")
  allocator = host_malloc.apply(args.host_malloc)
  shape = (args.batch, args.frames, args.crop)
  print(f"# train step, batch {args.batch}, clips {args.frames}x{args.crop}x{args.crop}, "
        f"{os.cpu_count()} cores, jax {jax.__version__}, ours in {args.dtype}, "
        f"host malloc {allocator}")
  print(f"{'model':14} {'jax clips/s':>12} {'torch clips/s':>14} {'ratio':>6} "
        f"{'jax peak MB':>12} {'torch RSS MB':>13} {'GFLOP/step':>11} {'jax GFLOP/s':>12} "
        f"{'torch GFLOP/s':>14}")
  rows = []
  for model in args.models:
    jax_clips_per_s, cost = compile_jax_step(model, *shape, args.dtype)
    ours_rounds, theirs_rounds = [], []
    for _ in range(args.rounds):
      ours_rounds.append(jax_clips_per_s(args.repeats))
      theirs_rounds.append(
          {"clips_per_s": float("nan"), "peak_rss_bytes": float("nan")} if args.no_torch
          else in_fresh_process(torch_throughput, model, *shape, args.repeats,
                                host_malloc=args.host_malloc))
    ours = {"clips_per_s": max(ours_rounds), **cost,
            "gflops_per_s": cost["step_flops"] * max(ours_rounds) / args.batch / 1e9}
    theirs = max(theirs_rounds, key=lambda r: r["clips_per_s"])
    ratio = ours["clips_per_s"] / theirs["clips_per_s"]
    rows.append({"model": model, "shape": shape, "dtype": args.dtype, "host_malloc": allocator,
                 "jax": ours, "torch": theirs, "ratio": ratio,
                 "rounds_clips_per_s": {"jax": ours_rounds,
                                        "torch": [r["clips_per_s"] for r in theirs_rounds]}})
    # Both run the same network: XLA's FLOP count of our step measures both rates.
    torch_gflops = ours["step_flops"] * theirs["clips_per_s"] / args.batch / 1e9
    print(f"{model:14} {ours['clips_per_s']:12.2f} {theirs['clips_per_s']:14.2f} {ratio:6.2f} "
          f"{ours['peak_bytes'] / 2**20:12.0f} {theirs['peak_rss_bytes'] / 2**20:13.0f} "
          f"{ours['step_flops'] / 1e9:11.1f} {ours['gflops_per_s']:12.1f} {torch_gflops:14.1f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
