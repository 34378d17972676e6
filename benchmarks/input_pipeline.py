"""Input-pipeline throughput (clips/s decoded and augmented) against what the train step consumes.

    python -m benchmarks.input_pipeline                       # Kinetics 8x8 recipe, 224 crops
    python -m benchmarks.input_pipeline --videos 32 --seconds 10 --json out.json

Writes generated videos in the Kinetics layout of our ``video_class_folder``
builder (H.264, 340x256 like the resized Kinetics copies most labs train on,
30 fps, 10 s), prepares the builder, then times our real training iterator
(``input_pipeline.train_iterator`` with the Kinetics config: PyAV seek +
decode of the sampled frames, short-side jitter 256-320, 224 crop, flip,
normalisation, batching) after a warm-up. In the same run it times
``train.train_step`` of the model on batches of the same shape, so the table
says whether the pipeline keeps up with the step on this machine. Both use
every core here; on an accelerator the pipeline has the CPU to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from benchmarks import host_malloc
from benchmarks.timing import median_seconds
from benchmarks.train_step import jitted_step
from configs import kinetics
from nonlocal_jax import input_pipeline
from nonlocal_jax.data import video_decode


def write_videos(root: str, count: int, seconds: float, size: tuple[int, int], fps: int) -> None:
  """`count` videos of moving gradients and noise in two class folders (a split 'train')."""
  rng = np.random.default_rng(0)
  height, width = size
  frames = int(seconds * fps)
  yy, xx = np.mgrid[:height, :width]
  for i in range(count):
    folder = os.path.join(root, "train", f"class{i % 2}")
    os.makedirs(folder, exist_ok=True)
    phase = rng.uniform(0, 2 * np.pi, 3)
    t = np.arange(frames)[:, None, None, None]
    video = 127 + 100 * np.sin(0.03 * (xx + yy)[None, ..., None] + 0.2 * t + phase)
    video = video + rng.normal(0, 8, (frames, height, width, 3))
    with open(os.path.join(folder, f"video{i:03d}.mp4"), "wb") as f:
      f.write(video_decode.encode_video(np.clip(video, 0, 255).astype(np.uint8), fps=fps))


def pipeline_config(data_dir: str, manual_dir: str, batch: int, crop: int):
  config = kinetics.get_config("i3d_nl5_r50_8x8")
  config.dataset, config.data_dir, config.manual_dir = "video_class_folder", data_dir, manual_dir
  config.train_split = "train"
  config.batch_size = batch
  config.shuffle_buffer = 64
  config.input.crop_size = crop
  config.input.train_scale = (int(crop * 256 / 224), int(crop * 320 / 224))
  return config


def pipeline_throughput(config, batches: int) -> float:
  """Clips/s of the training iterator, after two warm-up batches."""
  iterator = input_pipeline.train_iterator(input_pipeline.get_builder(config), config)
  for _ in range(2):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * config.batch_size / (time.perf_counter() - start)


def train_step_throughput(config, model: str, batch: int, repeats: int) -> float:
  """Clips/s of our jit train step on batches of the pipeline's shape."""
  config.model.name = model
  config.model.kwargs.head_pool_window = None
  config.num_classes = 400
  config.batch_size = batch
  step, state, data = jitted_step(config, config.input.num_frames, config.input.crop_size)
  holder = {"state": state}

  def run():
    holder["state"], _ = step(holder["state"], data)
    jax.block_until_ready(holder["state"])

  return batch / median_seconds(run, repeats)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--videos", type=int, default=24)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--batches", type=int, default=6)
  parser.add_argument("--crop", type=int, default=224)
  parser.add_argument("--model", default="i3d_nl5_r50",
                      help="train step to compare with ('' to skip)")
  parser.add_argument("--step_batch", type=int, default=2)
  parser.add_argument("--json")
  host_malloc.add_argument(parser)
  args = parser.parse_args(argv)
  allocator = host_malloc.apply(args.host_malloc)
  with tempfile.TemporaryDirectory() as tmp:
    manual_dir = os.path.join(tmp, "videos")
    write_videos(manual_dir, args.videos, args.seconds, (256, 340), 30)
    config = pipeline_config(os.path.join(tmp, "tfds"), manual_dir, args.batch, args.crop)
    clips = pipeline_throughput(config, args.batches)
  row = {"pipeline_clips_per_s": clips, "clip": [config.input.num_frames, args.crop, args.crop],
         "source": "340x256 H.264, 30 fps", "cores": os.cpu_count(), "host_malloc": allocator}
  if args.model:
    row["model"] = args.model
    row["train_step_clips_per_s"] = train_step_throughput(config, args.model, args.step_batch, 3)
  print(f"# input pipeline, Kinetics recipe ({config.input.num_frames}x{config.input.frame_stride}"
        f" frames, {args.crop} crops) on {os.cpu_count()} cores, host malloc {allocator}")
  print(f"{'pipeline clips/s':>17} {'train step clips/s':>19}  model")
  step = row.get("train_step_clips_per_s", float("nan"))
  print(f"{clips:17.2f} {step:19.2f}  {args.model or '-'}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(row, f, indent=1)


if __name__ == "__main__":
  main()
