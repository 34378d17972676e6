"""A synthetic video data set whose label needs a long-range space-time relation.

Each clip has T frames of small, dim noise. One coloured square ("mark") is
drawn in a frame of the first half of the clip, a second one in a frame of
the second half, at independent random positions. The label is 1 if the two
marks have the same colour and 0 otherwise (balanced).

Why it separates the models: a C2D network processes frames independently
up to its final average pool (its only temporal operation, a 2x1x1 max pool
after res2, never sees both marks because they are in different halves), so
its logit is linear in the *sum* of per-frame features g(c1) + g(c2). The
different-colour pair (a, b) then scores the mean of the same-colour pairs
(a, a) and (b, b), so no such classifier is right on every pair: the best it
can do is flag same-colour pairs within a subset of the colours, at most 2/3
accuracy with 4 colours, and in practice it stays near chance. A non-local
block relates the two marks directly and solves it: the paper's claim in
miniature.

The TFDS builder generates everything from a fixed seed, offline.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

# Red, green, blue and white: the corners of a regular tetrahedron in RGB space,
# so every pair of colours differs in exactly two channels by the same amount
# and no pair is easier to tell apart than another (version 1.0.0 used red,
# green, blue and yellow).
PALETTE = np.array([[240, 40, 40], [40, 240, 40], [40, 40, 240], [240, 240, 240]], np.uint8)


def make_clip(rng: np.random.Generator, num_frames: int, size: int,
              mark_size: int) -> tuple[np.ndarray, int, np.ndarray]:
  """One clip (T, H, W, 3) uint8, its label, and the marks' (t, y, x) top-left corners (2, 3)."""
  clip = rng.integers(0, 24, size=(num_frames, size, size, 3), dtype=np.uint8)
  label = int(rng.integers(0, 2))
  first = int(rng.integers(0, len(PALETTE)))
  second = first if label else int((first + rng.integers(1, len(PALETTE))) % len(PALETTE))
  half = num_frames // 2
  marks = np.array([
      [rng.integers(0, half), *rng.integers(0, size - mark_size + 1, size=2)],
      [rng.integers(half, num_frames), *rng.integers(0, size - mark_size + 1, size=2)],
  ])
  for (t, y, x), colour in zip(marks, (first, second)):
    clip[t, y:y + mark_size, x:x + mark_size] = PALETTE[colour]
  return clip, label, marks


class LongRangeVideoConfig(tfds.core.BuilderConfig):
  """Split sizes of one variant of the data set."""

  def __init__(self, *, train_size: int, test_size: int, **kwargs):
    super().__init__(**kwargs)
    self.split_sizes = {"train": train_size, "test": test_size}


class LongRangeVideo(tfds.core.GeneratorBasedBuilder):
  """Synthetic 'same colour in two distant frames?' clips (see module docstring).

  Configs: ``long_range_video`` (= ``/default``: 4096 train, 1024 test clips)
  and ``long_range_video/small`` (256 / 96, for tests and smoke runs).
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "Equidistant palette (red, green, blue, white)."}
  BUILDER_CONFIGS = [
      LongRangeVideoConfig(name="default", train_size=4096, test_size=1024,
                           description="4096 train and 1024 test clips."),
      LongRangeVideoConfig(name="small", train_size=256, test_size=96,
                           description="256 train and 96 test clips, for tests."),
  ]
  NUM_FRAMES = 8
  FRAME_SIZE = 32
  MARK_SIZE = 6
  SEED = 20180618  # CVPR 2018

  def _info(self) -> tfds.core.DatasetInfo:
    t, s = self.NUM_FRAMES, self.FRAME_SIZE
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(t, s, s, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=["different", "same"]),
            "marks": tfds.features.Tensor(shape=(2, 3), dtype=np.int32),
        }),
        supervised_keys=("video", "label"),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    sizes = self.builder_config.split_sizes
    return {name: self._generate_examples(name, n) for name, n in sizes.items()}

  def _generate_examples(self, split: str, num_examples: int):
    rng = np.random.default_rng([self.SEED, ("train", "test").index(split)])
    for i in range(num_examples):
      clip, label, marks = make_clip(rng, self.NUM_FRAMES, self.FRAME_SIZE, self.MARK_SIZE)
      yield i, {"video": clip, "label": label, "marks": marks.astype(np.int32)}
