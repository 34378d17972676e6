"""Index-based input pipelines: grain over TFDS random-access data sources (ArrayRecord).

Train: the position in the input stream is the training step. Global batch
``k`` holds the examples at positions ``[k * B, (k + 1) * B)`` of the
concatenated per-epoch permutations of the split (epoch ``e`` is a fixed
permutation of its ``N`` examples drawn from ``(seed, e)``); process ``p``
of ``P`` takes the ``p``-th slice of ``B / P`` of every global batch. An
example's augmentation draws from ``numpy.random.default_rng([seed, index,
epoch])``. So batch ``k`` of a process is a pure function of
``(config.seed, k, process index)``: resuming at step ``S`` starts reading
at batch ``S`` by random access (constant time, nothing is skipped) and
yields the batches of an uninterrupted run. The checkpointed step is the
iterator's whole state. The global batches do not depend on the number of
processes.

Eval: every example of the split exactly once, in order; process ``p``
takes a contiguous ``1 / P`` of it, and every process runs
:func:`num_eval_batches` batches, padded with ``mask=False`` examples.

Decoding and augmentation (:mod:`nonlocal_jax.preprocessing.modalities`,
chosen by ``config.modality``; settings in ``config.input``) run in
``data_workers`` worker processes (grain ``mp_prefetch``) with a few threads
each, or in threads of this process when it is 0. Any error in a worker
reaches the consumer as the exception of its ``next()``; workers exit when
their parent does, even after SIGKILL. Batches are numpy dicts
``{'inputs', 'label', 'mask'}`` (``label`` a dict of arrays for detection);
:func:`to_global` makes global arrays.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from jax.experimental import multihost_utils

from nonlocal_jax.data.coco_detection import CocoDetection
from nonlocal_jax.data.image_folder import ImageClassFolder
from nonlocal_jax.data.long_range_video import LongRangeVideo
from nonlocal_jax.data.segmentation_files import Ade20k, Cityscapes19, Voc12Aug
from nonlocal_jax.data.shapes_detection import ShapesDetection
from nonlocal_jax.data.video_files import Charades, Kinetics, VideoClassFolder
from nonlocal_jax.preprocessing import modalities

# Builders of ours, prepared on first use into the data dir (ArrayRecord files).
# Those that read downloaded files take them from config.manual_dir.
LOCAL_BUILDERS = {
    "long_range_video": LongRangeVideo,
    "kinetics": Kinetics,
    "charades": Charades,
    "video_class_folder": VideoClassFolder,
    "image_class_folder": ImageClassFolder,
    "cityscapes19": Cityscapes19,
    "ade20k": Ade20k,
    "voc12_aug": Voc12Aug,
    "shapes_detection": ShapesDetection,
    "coco_detection": CocoDetection,
}
_READS_FILES = (Kinetics, Charades, VideoClassFolder, ImageClassFolder, Cityscapes19, Ade20k,
                Voc12Aug, CocoDetection)
MODALITIES = tuple(modalities.MODALITIES)
FILE_FORMAT = "array_record"  # random access: what grain reads
# Never reached: the train stream is endless in practice (2**62 examples).
_ENDLESS = 2**62


def create_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder named by ``config.dataset`` ('name' or 'name/config'), not yet prepared.

  Its ``info.features`` are known without any data (see :func:`batch_spec`).
  Catalog builders must already be prepared in ``config.data_dir`` (as
  ArrayRecord files: see :func:`data_source`).
  """
  data_dir = os.path.expanduser(config.data_dir) if config.data_dir else None
  name, _, builder_config = config.dataset.partition("/")
  if name in LOCAL_BUILDERS:
    cls = LOCAL_BUILDERS[name]
    kwargs = {}
    if builder_config:
      configs = [c.name for c in cls.BUILDER_CONFIGS]
      if builder_config not in configs:
        raise ValueError(f"dataset {config.dataset!r}: {name} has configs {configs}")
      kwargs["config"] = builder_config
    if issubclass(cls, _READS_FILES):
      kwargs["root_dir"] = config.manual_dir or None
      kwargs["skip_bad_files"] = config.skip_bad_files
    return cls(data_dir=data_dir, **kwargs)
  try:
    builder = tfds.builder(config.dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown dataset {config.dataset!r}: not one of ours "
                     f"{sorted(LOCAL_BUILDERS)} nor a TFDS catalog builder") from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"dataset {config.dataset!r} is not prepared in data_dir={builder.data_dir!r}; prepare "
        f"it there first (`tfds build {config.dataset} --file_format={FILE_FORMAT}` with the "
        "manual files), or set config.data_dir")
  return builder


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Builds our own data sets on first use (process 0; the others wait for it)."""
  if jax.process_index() == 0 and not builder.is_prepared():
    builder.download_and_prepare(file_format=FILE_FORMAT)
  multihost_utils.sync_global_devices(f"prepared {builder.name}")
  return builder


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of ``config.dataset`` (ours are built on first use)."""
  return prepare(create_builder(config))


def data_source(builder: tfds.core.DatasetBuilder, split: str):
  """Random-access source of a split: ``len(source)``, ``source[i]`` -> dict of numpy values.

  A data set prepared as TFRecord (``tfds build``'s default) cannot be read
  by index: the error names the data set and how to write ArrayRecord files.
  """
  try:
    return builder.as_data_source(split=split)
  except (NotImplementedError, ValueError, FileNotFoundError) as e:
    file_format = getattr(builder.info, "file_format", None)
    if file_format is not None and str(getattr(file_format, "value", file_format)) == FILE_FORMAT:
      raise
    name = f"{builder.name}/{builder.builder_config.name}" if builder.builder_config else \
        builder.name
    if builder.name in LOCAL_BUILDERS:
      fix = (f"delete {builder.data_dir!r} so that it is prepared again as {FILE_FORMAT} on the "
             "next run")
    else:
      fix = (f"run `tfds build {name} --data_dir=<data_dir> --file_format={FILE_FORMAT}` "
             f"(or convert it: `tfds convert_format --dataset_version_dir={builder.data_dir} "
             f"--out_file_format={FILE_FORMAT}`)")
    raise ValueError(
        f"dataset {name!r} in {builder.data_dir!r} is stored as {file_format}, which cannot be "
        f"read by index; the input pipeline needs {FILE_FORMAT} files: {fix}") from e


def _modality(config: ml_collections.ConfigDict) -> modalities.Modality:
  return modalities.get(config.modality)


def preprocess_fn(config: ml_collections.ConfigDict,
                  train: bool) -> Callable[[dict, np.random.Generator | None], dict]:
  """(example, rng) -> {'inputs', 'label', 'mask'} for the configured modality (rng: train only).

  The label is an int32 array, or the modality's dict of arrays when it has a
  ``label_spec`` (detection targets).
  """
  modality, settings = _modality(config), config.input

  def fn(example: dict, rng: np.random.Generator | None = None) -> dict:
    inputs, label = (modality.train(example, rng, settings) if train
                     else modality.eval(example, settings))
    if modality.label_spec is None:
      label = np.asarray(label, np.int32)
    return {"inputs": inputs, "label": label, "mask": np.True_}

  return fn


def batch_spec(config: ml_collections.ConfigDict, features: tfds.features.FeaturesDict, *,
               train: bool) -> dict[str, Any]:
  """Global batch shapes without reading any data: {'inputs', 'label', 'mask'} ShapeDtypeStructs.

  inputs (B, ...) float32 as the modality's ``input_shape`` gives it; label
  (B,) int32 for classes, (B, K) for multi-hot labels, (B, H, W) for
  segmentation, a dict {name: (B, ...)} for a modality with a
  ``label_spec`` (detection targets); mask (B,) bool. `features` are the
  data set's (``builder.info.features``), which need not be prepared.
  """
  modality = _modality(config)
  stored = tuple(features[modality.stored_key(config.input)].shape)
  if config.modality == "video" and len(stored) != 4:  # encoded files: sizes known when decoded
    stored = (None,) * 4
  inputs = modality.input_shape(config.input, stored, train)
  size = config.batch_size if train else config.eval_batch_size
  if modality.label_spec is None:
    views = 0 if train else int(modality.num_eval_views(config.input) > 1)
    label = inputs[views:views + 2] if modality.dense_label else tuple(features["label"].shape)
    label_spec = jax.ShapeDtypeStruct((size, *label), np.int32)
  else:
    label_spec = {name: jax.ShapeDtypeStruct((size, *shape), dtype)
                  for name, (shape, dtype) in modality.label_spec(config.input, train).items()}
  return {"inputs": jax.ShapeDtypeStruct((size, *inputs), np.float32), "label": label_spec,
          "mask": jax.ShapeDtypeStruct((size,), np.bool_)}


def num_eval_views(config: ml_collections.ConfigDict) -> int:
  """Views per evaluation example (1: the eval inputs have no views axis)."""
  return _modality(config).num_eval_views(config.input)


def local_batch_size(global_batch_size: int) -> int:
  if global_batch_size % jax.process_count():
    raise ValueError(f"batch_size={global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  return global_batch_size // jax.process_count()


def num_workers(config: ml_collections.ConfigDict) -> int:
  """Worker processes decoding and augmenting: ``config.data_workers`` (-1: one per core).

  0 decodes in threads of this process (PyAV and PIL release the GIL). A
  worker is a spawned interpreter that imports the main module and the data
  stack again (seconds and ~1 GB each), so workers pay off for long runs on
  many cores, not for short ones.
  """
  workers = config.data_workers
  return max(os.cpu_count() or 1, 1) if workers < 0 else int(workers)


def epoch_permutation(position: int, num_examples: int, seed: int, epoch: int) -> int:
  """Example at `position` of epoch `epoch`'s permutation of the split (O(1), no table)."""
  epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
  return int(grain.experimental.index_shuffle(position, max_index=num_examples - 1,
                                              seed=epoch_seed, rounds=4))


class _TrainExample:
  """Local stream position -> this process's preprocessed training example (picklable)."""

  def __init__(self, source, config: ml_collections.ConfigDict, process_index: int,
               process_count: int):
    self.source = source
    self.num_examples = len(source)
    self.preprocess = preprocess_fn(config, train=True)
    self.seed = int(config.seed)
    self.global_batch = config.batch_size
    self.local_batch = config.batch_size // process_count
    self.process_index = process_index

  def locate(self, position: int) -> tuple[int, int]:
    """(example index, epoch) at this process's `position`."""
    step, offset = divmod(position, self.local_batch)
    global_position = step * self.global_batch + self.process_index * self.local_batch + offset
    epoch, in_epoch = divmod(global_position, self.num_examples)
    return epoch_permutation(in_epoch, self.num_examples, self.seed, epoch), epoch

  def __call__(self, position: int) -> dict:
    index, epoch = self.locate(position)
    rng = np.random.default_rng([self.seed, index, epoch])
    return self.preprocess(self.source[index], rng)


class _EvalExample:
  """Position in this process's padded eval slice -> preprocessed example, mask=False past the end."""

  def __init__(self, source, config: ml_collections.ConfigDict, start: int, count: int):
    self.source = source
    self.preprocess = preprocess_fn(config, train=False)
    self.start, self.count = start, count

  def __call__(self, position: int) -> dict:
    real = position < self.count
    # Padding repeats a real example (right shapes), masked out.
    example = self.preprocess(self.source[self.start + position if real else 0])
    example["mask"] = np.bool_(real)
    return example


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """In a worker process: exit as soon as the process that started it is gone (even SIGKILLed)."""
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      threading.Event().wait(0.5)
    os._exit(1)

  threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _loader(dataset: grain.MapDataset, batch_size: int, workers: int) -> grain.IterDataset:
  """Examples -> batches of `batch_size`, decoded in `workers` processes (0: threads here)."""
  threads = 2 if workers else max(os.cpu_count() or 1, 2)
  ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                 prefetch_buffer_size=2 * batch_size))
  if workers:
    if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads this flag unguarded when starting workers
      flags.FLAGS["grain_enable_multiprocess_worker_profiling"].present = True
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=batch_size),
                        worker_init_fn=_exit_with_parent)
  return ds.batch(batch_size, drop_remainder=True)


def _iterate(ds: grain.IterDataset, num_batches: int | None = None) -> Iterator[dict]:
  """Batches of `ds` (all, or `num_batches`); its worker processes end with the generator."""
  iterator = iter(ds)
  try:
    count = 0
    while num_batches is None or count < num_batches:
      yield next(iterator)
      count += 1
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()


def train_iterator(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict, *,
                   start_step: int = 0) -> Iterator[dict]:
  """Endless per-process batches of ``config.batch_size // processes``, from `start_step` (O(1))."""
  local_batch_size(config.batch_size)  # divisible by the processes
  source = data_source(builder, config.train_split)
  if not len(source):
    raise ValueError(f"split {config.train_split!r} of {config.dataset!r} has no examples")
  read = _TrainExample(source, config, jax.process_index(), jax.process_count())
  local = read.local_batch
  examples = grain.MapDataset.range(start_step * local, _ENDLESS).map(read)
  return _iterate(_loader(examples, local, num_workers(config)))


def num_eval_batches(builder: tfds.core.DatasetBuilder, split: str, global_batch_size: int) -> int:
  """Batches every process runs in one eval pass (enough for the largest process slice)."""
  num_examples = builder.info.splits[split].num_examples
  per_process = -(-num_examples // jax.process_count())
  return -(-per_process // local_batch_size(global_batch_size))


def eval_iterator(builder: tfds.core.DatasetBuilder,
                  config: ml_collections.ConfigDict) -> Iterator[dict]:
  """One ordered pass of exactly `num_eval_batches` batches on every process.

  Process p reads examples [p * N // P, (p + 1) * N // P); the rest of its
  batches are mask=False padding.
  """
  num_batches = num_eval_batches(builder, config.eval_split, config.eval_batch_size)
  batch = local_batch_size(config.eval_batch_size)
  source = data_source(builder, config.eval_split)
  n, p, count = len(source), jax.process_index(), jax.process_count()
  if not n:
    raise ValueError(f"split {config.eval_split!r} of {config.dataset!r} has no examples")
  start, stop = p * n // count, (p + 1) * n // count
  read = _EvalExample(source, config, start, stop - start)
  examples = grain.MapDataset.range(num_batches * batch).map(read)
  workers = min(num_workers(config), num_batches)
  return _iterate(_loader(examples, batch, workers), num_batches)


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Per-process numpy batch -> global jax arrays sharded along the batch axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
