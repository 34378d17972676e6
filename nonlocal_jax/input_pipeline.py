"""tf.data input pipelines over TFDS, sharded per process, deterministic given seed and step.

Train: this process's slice of the split (``tfds.split_for_jax_process``),
shuffled with a fixed seed, repeated, batched to the per-process batch and
advanced by the step a resumed run starts from, so a resumed run sees the
same batches as an uninterrupted one. Eval: one pass in order, the last batch
padded and masked so every example counts exactly once.

Batches are numpy dicts ``{'inputs': (b, ...) float32, 'label': (b,) int32,
'mask': (b,) bool}``; :func:`to_global` turns them into global jax arrays.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from nonlocal_jax.data.long_range_video import LongRangeVideo

# Builders of ours, prepared on first use into the data dir (no download).
LOCAL_BUILDERS = {"long_range_video": LongRangeVideo}

# Kinetics normalisation of the official code (114.75 / 57.375 on 0-255 RGB).
VIDEO_MEAN, VIDEO_STD = 0.45, 0.225


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder named by ``config.dataset`` ('name' or 'name/config'), in ``config.data_dir``.

  Our own builders (LOCAL_BUILDERS) are prepared on first use by process 0;
  catalog builders must already be prepared there.
  """
  data_dir = os.path.expanduser(config.data_dir) if config.get("data_dir") else None
  name, _, builder_config = config.dataset.partition("/")
  if name in LOCAL_BUILDERS:
    cls = LOCAL_BUILDERS[name]
    configs = [c.name for c in cls.BUILDER_CONFIGS]
    if builder_config and builder_config not in configs:
      raise ValueError(f"dataset {config.dataset!r}: {name} has configs {configs}")
    builder = cls(config=builder_config or None, data_dir=data_dir)
    if jax.process_index() == 0:
      builder.download_and_prepare()
    multihost_utils.sync_global_devices(f"prepared {config.dataset}")
    return builder
  try:
    builder = tfds.builder(config.dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown dataset {config.dataset!r}: not one of ours "
                     f"{sorted(LOCAL_BUILDERS)} nor a TFDS catalog builder") from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"dataset {config.dataset!r} is not prepared in data_dir={builder.data_dir!r}; prepare "
        "it there first (e.g. `tfds build` with the manual files), or set config.data_dir")
  return builder


def _preprocess(example: dict) -> dict:
  video = tf.cast(example["video"], tf.float32) / 255.0
  return {"inputs": (video - VIDEO_MEAN) / VIDEO_STD,
          "label": tf.cast(example["label"], tf.int32),
          "mask": tf.ones((), tf.bool)}


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = max(os.cpu_count() or 1, 1)
  return options


def local_batch_size(global_batch_size: int) -> int:
  if global_batch_size % jax.process_count():
    raise ValueError(f"batch_size={global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  return global_batch_size // jax.process_count()


def train_iterator(builder: tfds.core.DatasetBuilder, split: str, *, global_batch_size: int,
                   seed: int, start_step: int = 0) -> Iterator[dict]:
  """Endless shuffled per-process batches, starting at batch `start_step`."""
  split = tfds.split_for_jax_process(split, drop_remainder=True)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.with_options(_options()).cache().repeat()
  ds = ds.shuffle(4096, seed=seed, reshuffle_each_iteration=True)
  ds = ds.map(_preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size(global_batch_size), drop_remainder=True)
  ds = ds.skip(start_step).prefetch(2)
  return ds.as_numpy_iterator()


def num_eval_batches(builder: tfds.core.DatasetBuilder, split: str, global_batch_size: int) -> int:
  """Batches every process runs in one eval pass (enough for the largest process slice)."""
  num_examples = builder.info.splits[split].num_examples
  per_process = -(-num_examples // jax.process_count())
  return -(-per_process // local_batch_size(global_batch_size))


def eval_iterator(builder: tfds.core.DatasetBuilder, split: str, *,
                  global_batch_size: int) -> Iterator[dict]:
  """One ordered pass of exactly `num_eval_batches` batches on every process.

  Short batches are padded, and missing batches filled, with mask=False examples.
  """
  num_batches = num_eval_batches(builder, split, global_batch_size)
  split = tfds.split_for_jax_process(split, drop_remainder=False)
  ds = builder.as_dataset(split=split, shuffle_files=False).with_options(_options())
  ds = ds.map(_preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  batch = local_batch_size(global_batch_size)
  examples = ds.batch(batch).as_numpy_iterator()
  template = None
  for _ in range(num_batches):
    current = next(examples, None)
    if current is None:  # this process' slice is exhausted: an all-padding batch
      current = jax.tree.map(lambda v: v[:0], template)
    template = current
    n = current["mask"].shape[0]
    yield {k: np.concatenate([v, np.zeros((batch - n, *v.shape[1:]), v.dtype)])
           for k, v in current.items()}


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Per-process numpy batch -> global jax arrays sharded along the batch axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
