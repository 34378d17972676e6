"""Training curves from a workdir's TensorBoard events, as PNG (no TensorBoard needed).

    python -m nonlocal_jax.plot --workdir workdirs/default --output curves.png

One panel per scalar (train_loss, train_accuracy, learning rate, eval metrics,
steps/s, ...), value against step. ``--tags`` picks some of them.
"""

from __future__ import annotations

import argparse
import glob
import os
from collections import defaultdict
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)] sorted by step} from every event file directly in `workdir`."""
  files = sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
  if not files:
    raise FileNotFoundError(f"no TensorBoard event files in {workdir!r}")
  scalars = defaultdict(dict)
  for path in files:
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.HasField("tensor") and value.tensor.dtype in (tf.float32.as_datatype_enum,
                                                               tf.float64.as_datatype_enum):
          array = tf.make_ndarray(value.tensor)
          if array.size == 1:
            scalars[value.tag][event.step] = float(array.reshape(()))
        elif value.HasField("simple_value"):
          scalars[value.tag][event.step] = value.simple_value
  return {tag: sorted(points.items()) for tag, points in scalars.items()}


def plot_curves(scalars: dict[str, list[tuple[int, float]]], output: str,
                tags: Sequence[str] | None = None) -> list[str]:
  """Writes one panel per tag to `output`; returns the tags drawn."""
  tags = sorted(scalars) if not tags else list(tags)
  unknown = [t for t in tags if t not in scalars]
  if unknown:
    raise ValueError(f"tags {unknown} not in the workdir; available: {sorted(scalars)}")
  cols = min(3, len(tags))
  rows = -(-len(tags) // cols)
  fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(4.2 * cols, 2.8 * rows))
  for ax, tag in zip(axes.flat, tags):
    steps, values = np.array(scalars[tag]).T
    ax.plot(steps, values, marker="o" if len(steps) < 5 else None, markersize=3)
    ax.set_title(tag, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(tags):]:
    ax.axis("off")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  fig.savefig(output, dpi=100)
  plt.close(fig)
  return tags


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="workdirs/default")
  parser.add_argument("--output", default="curves.png")
  parser.add_argument("--tags", nargs="*", help="scalars to draw (default: all)")
  args = parser.parse_args(argv)
  drawn = plot_curves(read_scalars(args.workdir), args.output, args.tags)
  print(f"wrote {args.output}: {', '.join(drawn)}")


if __name__ == "__main__":
  main()
