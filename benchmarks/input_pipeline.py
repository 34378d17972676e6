"""Input-pipeline throughput (clips/s decoded and augmented) against what the train step consumes.

    python -m benchmarks.input_pipeline                       # Kinetics 8x8 recipe, 224 crops
    python -m benchmarks.input_pipeline --videos 32 --seconds 10 --json out.json
    python -m benchmarks.input_pipeline --resume_check        # first batch at step 0 / 100,000

Writes generated videos in the Kinetics layout of our ``video_class_folder``
builder (H.264, 340x256 like the resized Kinetics copies most labs train on,
30 fps, 10 s), prepares the builder, then times our real training iterator
(``input_pipeline.train_iterator`` with the Kinetics config: PyAV seek +
decode of the sampled frames, short-side jitter 256-320, 224 crop, flip,
normalisation, batching) after a warm-up, with the decoding in this
process's threads (0 workers) and in 1 and 2 worker processes
(``--workers``); and ImageNet-recipe images/s (random-resized crop of
generated 500x375 JPEGs in our ``image_class_folder`` builder). In the same
run it times ``train.train_step`` of the model on batches of the same shape,
so the table says whether the pipeline keeps up with the step on this
machine. ``--resume_check`` prints the time to the first batch of a fresh
iterator at step 0 and at step 100,000 (index-based: the same).
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
from configs import image_folder
from nonlocal_jax import input_pipeline
from nonlocal_jax.data import video_decode

# The tf.data pipeline this replaced, same command and machine (docs/benchmarks.md).
TF_DATA_CLIPS_PER_S = 7.92  # 2 cores, its parallel map on every core


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


def write_images(root: str, count: int, size: tuple[int, int]) -> None:
  """`count` JPEGs of noise in two class folders (a split 'train')."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for i in range(count):
    folder = os.path.join(root, "train", f"class{i % 2}")
    os.makedirs(folder, exist_ok=True)
    pixels = rng.integers(0, 255, (*size, 3), np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f"image{i:03d}.jpg"), quality=90)


def with_workers(config, workers: int):
  with config.unlocked():
    config.data_workers = workers
  return config


def pipeline_config(data_dir: str, manual_dir: str, batch: int, crop: int):
  config = kinetics.get_config("i3d_nl5_r50_8x8")
  config.dataset, config.data_dir, config.manual_dir = "video_class_folder", data_dir, manual_dir
  config.train_split = "train"
  config.batch_size = batch
  config.input.crop_size = crop
  config.input.train_scale = (int(crop * 256 / 224), int(crop * 320 / 224))
  return config


def image_config(data_dir: str, manual_dir: str, batch: int):
  config = image_folder.get_config("resnet50_nl5")
  config.dataset, config.data_dir, config.manual_dir = "image_class_folder", data_dir, manual_dir
  config.train_split = "train"
  config.batch_size = batch
  return config


def pipeline_throughput(config, batches: int) -> float:
  """Examples/s of the training iterator, after two warm-up batches (workers started)."""
  iterator = input_pipeline.train_iterator(input_pipeline.get_builder(config), config)
  for _ in range(2):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  seconds = time.perf_counter() - start
  iterator.close()
  return batches * config.batch_size / seconds


def first_batch_seconds(config, start_step: int) -> float:
  """Seconds from creating a training iterator at `start_step` to its first batch."""
  builder = input_pipeline.get_builder(config)
  start = time.perf_counter()
  iterator = input_pipeline.train_iterator(builder, config, start_step=start_step)
  next(iterator)
  seconds = time.perf_counter() - start
  iterator.close()
  return seconds


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
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                      help="worker processes to time (0: threads of this process)")
  parser.add_argument("--images", type=int, default=64, help="generated JPEGs ('0' to skip)")
  parser.add_argument("--resume_check", action="store_true",
                      help="time the first batch at step 0 and at step 100,000")
  parser.add_argument("--json")
  host_malloc.add_argument(parser)
  args = parser.parse_args(argv)
  allocator = host_malloc.apply(args.host_malloc)
  row = {"clip": [0, args.crop, args.crop], "source": "340x256 H.264, 30 fps",
         "cores": os.cpu_count(), "host_malloc": allocator,
         "tf_data_clips_per_s": TF_DATA_CLIPS_PER_S, "clips_per_s": {}, "images_per_s": {}}
  with tempfile.TemporaryDirectory() as tmp:
    manual_dir = os.path.join(tmp, "videos")
    write_videos(manual_dir, args.videos, args.seconds, (256, 340), 30)
    config = pipeline_config(os.path.join(tmp, "tfds"), manual_dir, args.batch, args.crop)
    row["clip"][0] = config.input.num_frames
    if args.resume_check:
      with_workers(config, 0)
      first_batch_seconds(config, 0)  # builds the data set; warms the caches
      at_zero, at_far = first_batch_seconds(config, 0), first_batch_seconds(config, 100_000)
      row["resume_first_batch_seconds"] = {"step0": at_zero, "step100000": at_far}
      print(f"resume first-batch seconds: step0={at_zero:.2f} step100000={at_far:.2f}")
    for workers in args.workers:
      row["clips_per_s"][workers] = pipeline_throughput(with_workers(config, workers),
                                                        args.batches)
    if args.images:
      image_dir = os.path.join(tmp, "images")
      write_images(image_dir, args.images, (375, 500))
      images = image_config(os.path.join(tmp, "tfds"), image_dir, 32)
      for workers in args.workers:
        row["images_per_s"][workers] = pipeline_throughput(with_workers(images, workers),
                                                           max(args.batches // 2, 2))
  if args.model:
    row["model"] = args.model
    row["train_step_clips_per_s"] = train_step_throughput(config, args.model, args.step_batch, 3)
  print(f"# input pipeline, Kinetics recipe ({config.input.num_frames}x{config.input.frame_stride}"
        f" frames, {args.crop} crops) and ImageNet recipe (500x375 JPEG, 224 crops) on "
        f"{os.cpu_count()} cores, host malloc {allocator}; tf.data before: "
        f"{TF_DATA_CLIPS_PER_S} clips/s (docs/benchmarks.md, 2 cores)")
  print(f"{'workers':>8} {'clips/s':>8} {'images/s':>9}")
  for workers in args.workers:
    print(f"{workers:>8} {row['clips_per_s'][workers]:8.2f} "
          f"{row['images_per_s'].get(workers, float('nan')):9.1f}")
  if args.model:
    print(f"train step {args.model}: {row['train_step_clips_per_s']:.2f} clips/s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(row, f, indent=1)


if __name__ == "__main__":
  main()
