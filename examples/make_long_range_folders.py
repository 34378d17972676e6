"""Writes the long-range tasks as own-data class folders, the way users bring their data.

    python examples/make_long_range_folders.py --output /tmp/long_range

* ``<output>/videos/{train,test}/{same,different}/NNNNN.mp4``: the synthetic
  clips of ``nonlocal_jax.data.long_range_video`` (two coloured squares in
  distant frames; same colour or not), upscaled to 64x48 and H.264-encoded;
  2048 train / 512 test. For ``configs/video_folder.py:c2d_nl_tiny``.
* ``<output>/images/{train,test}/{same,different}/NNNNN.png``: 48x48 noise
  with one square in the left third and one in the right third; 4096 train /
  1024 test. For ``configs/image_folder.py:{resnet_tiny,resnet_nl_tiny,lrnet_tiny}``.

Fixed seeds: the same files on every machine (README's numbers come from them).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from nonlocal_jax.data.long_range_video import PALETTE, make_clip
from nonlocal_jax.data.video_decode import encode_video

LABELS = ("different", "same")


def _path(root: str, split: str, label: int, index: int, ext: str) -> str:
  folder = os.path.join(root, split, LABELS[label])
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, f"{index:05d}{ext}")


def write_videos(root: str, sizes=(("train", 2048), ("test", 512))) -> None:
  rng = np.random.default_rng(7)
  for split, count in sizes:
    for i in range(count):
      clip, label, _ = make_clip(rng, 8, 32, 6)
      frames = np.stack([np.asarray(Image.fromarray(f).resize((64, 48), Image.NEAREST))
                         for f in clip])
      with open(_path(root, split, label, i, ".mp4"), "wb") as f:
        f.write(encode_video(frames, fps=8))


def write_images(root: str, sizes=(("train", 4096), ("test", 1024)), size: int = 48,
                 mark: int = 8) -> None:
  rng = np.random.default_rng(11)
  for split, count in sizes:
    for i in range(count):
      image = rng.integers(0, 24, size=(size, size, 3), dtype=np.uint8)
      label = int(rng.integers(0, 2))
      first = int(rng.integers(0, len(PALETTE)))
      second = first if label else int((first + rng.integers(1, len(PALETTE))) % len(PALETTE))
      for colour, (x_min, x_max) in ((first, (0, size // 3 - mark)),
                                     (second, (2 * size // 3, size - mark))):
        y, x = int(rng.integers(0, size - mark + 1)), int(rng.integers(x_min, x_max + 1))
        image[y:y + mark, x:x + mark] = PALETTE[colour]
      Image.fromarray(image).save(_path(root, split, label, i, ".png"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", required=True, help="folder to write videos/ and images/ into")
  args = parser.parse_args()
  if os.path.exists(args.output) and os.listdir(args.output):
    raise SystemExit(f"--output {args.output!r} is not empty; choose a new folder")
  write_videos(os.path.join(args.output, "videos"))
  write_images(os.path.join(args.output, "images"))
  print(f"wrote {args.output}/videos and {args.output}/images")


if __name__ == "__main__":
  main()
