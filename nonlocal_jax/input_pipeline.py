"""tf.data input pipelines over TFDS, sharded per process, deterministic given seed and step.

Train: this process's slice of the split (``tfds.split_for_jax_process``),
repeated, shuffled with a fixed seed, augmented with stateless random ops
seeded by (seed, example position), batched to the per-process batch and
advanced by the step a resumed run starts from: a resumed run sees the same
batches as an uninterrupted one. Eval: one pass in order; the last batch is
padded and masked, so every example counts exactly once.

``config.modality`` picks the preprocessing: ``'video'``
(:mod:`~nonlocal_jax.preprocessing.video`), ``'image'`` or
``'segmentation'``; ``config.input`` holds its settings. Batches are numpy
dicts ``{'inputs', 'label', 'mask'}``; :func:`to_global` makes global arrays.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from nonlocal_jax.data.image_folder import ImageClassFolder
from nonlocal_jax.data.long_range_video import LongRangeVideo
from nonlocal_jax.data.segmentation_files import Ade20k, Cityscapes19, Voc12Aug
from nonlocal_jax.data.video_files import Charades, Kinetics, VideoClassFolder
from nonlocal_jax.preprocessing import image as image_ops
from nonlocal_jax.preprocessing import segmentation as segmentation_ops
from nonlocal_jax.preprocessing import video as video_ops

# Builders of ours, prepared on first use into the data dir. Those that read
# downloaded files take them from config.manual_dir.
LOCAL_BUILDERS = {
    "long_range_video": LongRangeVideo,
    "kinetics": Kinetics,
    "charades": Charades,
    "video_class_folder": VideoClassFolder,
    "image_class_folder": ImageClassFolder,
    "cityscapes19": Cityscapes19,
    "ade20k": Ade20k,
    "voc12_aug": Voc12Aug,
}
_READS_FILES = (Kinetics, Charades, VideoClassFolder, ImageClassFolder, Cityscapes19, Ade20k,
                Voc12Aug)
# Per modality: the shape of one example's inputs from its settings and the stored shape.
INPUT_SHAPES = {
    "video": video_ops.input_shape,
    "image": image_ops.input_shape,
    "segmentation": segmentation_ops.input_shape,
}
MODALITIES = tuple(INPUT_SHAPES)


def create_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder named by ``config.dataset`` ('name' or 'name/config'), not yet prepared.

  Its ``info.features`` are known without any data (see :func:`batch_spec`).
  Catalog builders must already be prepared in ``config.data_dir``.
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
    return cls(data_dir=data_dir, **kwargs)
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


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Builds our own data sets on first use (process 0; the others wait for it)."""
  if jax.process_index() == 0 and not builder.is_prepared():
    builder.download_and_prepare()
  multihost_utils.sync_global_devices(f"prepared {builder.name}")
  return builder


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of ``config.dataset`` (ours are built on first use)."""
  return prepare(create_builder(config))


def _label(example: dict) -> tf.Tensor:
  return tf.cast(example["label"], tf.int32)


def preprocess_fn(config: ml_collections.ConfigDict, train: bool) -> Callable[..., dict]:
  """(example, seed) -> {'inputs', 'label', 'mask'} for the configured modality."""
  modality, settings = config.modality, config.input
  if modality not in MODALITIES:
    raise ValueError(f"config.modality={modality!r} is not one of {MODALITIES}")

  def fn(example: dict, seed: tf.Tensor) -> dict:
    if modality == "video":
      if train:
        inputs = video_ops.train_clip(example, seed, settings)
      else:
        views = video_ops.eval_views(example, settings)
        inputs = views[0] if video_ops.num_views(settings) == 1 else views
      label = _label(example)
    elif modality == "image":
      image = example[settings.image_key]
      inputs = (image_ops.train_image(image, seed, settings) if train
                else image_ops.eval_image(image, settings))
      label = _label(example)
    else:
      image, label = example["image"], example["label"][..., 0]
      inputs, label = (segmentation_ops.train_pair(image, label, seed, settings) if train
                       else segmentation_ops.eval_pair(image, label, settings))
    return {"inputs": inputs, "label": label, "mask": tf.ones((), tf.bool)}

  return fn


def batch_spec(config: ml_collections.ConfigDict, features: tfds.features.FeaturesDict, *,
               train: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """Global batch shapes without reading any data: {'inputs', 'label', 'mask'}.

  inputs (B, ...) float32 as the modality's ``input_shape`` gives it; label
  (B,) int32 for classes, (B, K) for multi-hot labels, (B, H, W) for
  segmentation; mask (B,) bool. `features` are the data set's
  (``builder.info.features``), which need not be prepared.
  """
  modality = config.modality
  if modality not in INPUT_SHAPES:
    raise ValueError(f"config.modality={modality!r} is not one of {MODALITIES}")
  stored_key = config.input.image_key if modality == "image" else {
      "video": "video", "segmentation": "image"}[modality]
  stored = tuple(features[stored_key].shape)
  if modality == "video" and len(stored) != 4:  # encoded files: sizes known only when decoded
    stored = (None,) * 4
  inputs = INPUT_SHAPES[modality](config.input, stored, train)
  label = inputs[:2] if modality == "segmentation" else tuple(features["label"].shape)
  size = config.batch_size if train else config.eval_batch_size
  return {"inputs": jax.ShapeDtypeStruct((size, *inputs), np.float32),
          "label": jax.ShapeDtypeStruct((size, *label), np.int32),
          "mask": jax.ShapeDtypeStruct((size,), np.bool_)}


def num_eval_views(config: ml_collections.ConfigDict) -> int:
  """Views per evaluation example (1: the eval inputs have no views axis)."""
  if config.modality != "video":
    return 1
  return video_ops.num_views(config.input)


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


def train_iterator(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict, *,
                   start_step: int = 0) -> Iterator[dict]:
  """Endless shuffled per-process batches of ``config.batch_size // processes``, from `start_step`."""
  split = tfds.split_for_jax_process(config.train_split, drop_remainder=True)
  ds = builder.as_dataset(split=split, shuffle_files=False).with_options(_options())
  if config.cache_train:
    ds = ds.cache()
  ds = ds.repeat().shuffle(config.shuffle_buffer, seed=config.seed,
                           reshuffle_each_iteration=True)
  preprocess = preprocess_fn(config, train=True)
  seed = config.seed * jax.process_count() + jax.process_index()
  ds = ds.enumerate().map(
      lambda i, ex: preprocess(ex, tf.stack([tf.cast(seed, tf.int64), i])),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size(config.batch_size), drop_remainder=True)
  return ds.skip(start_step).prefetch(2).as_numpy_iterator()


def num_eval_batches(builder: tfds.core.DatasetBuilder, split: str, global_batch_size: int) -> int:
  """Batches every process runs in one eval pass (enough for the largest process slice)."""
  num_examples = builder.info.splits[split].num_examples
  per_process = -(-num_examples // jax.process_count())
  return -(-per_process // local_batch_size(global_batch_size))


def eval_iterator(builder: tfds.core.DatasetBuilder,
                  config: ml_collections.ConfigDict) -> Iterator[dict]:
  """One ordered pass of exactly `num_eval_batches` batches on every process.

  Short batches are padded, and missing batches filled, with mask=False examples.
  """
  num_batches = num_eval_batches(builder, config.eval_split, config.eval_batch_size)
  split = tfds.split_for_jax_process(config.eval_split, drop_remainder=False)
  ds = builder.as_dataset(split=split, shuffle_files=False).with_options(_options())
  preprocess = preprocess_fn(config, train=False)
  ds = ds.map(functools.partial(preprocess, seed=None), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  batch = local_batch_size(config.eval_batch_size)
  ds = ds.batch(batch)
  empty = jax.tree.map(lambda s: np.zeros((0, *s.shape[1:]), s.dtype.as_numpy_dtype),
                       ds.element_spec)
  examples = ds.prefetch(2).as_numpy_iterator()
  for _ in range(num_batches):
    # Once this process' slice is exhausted: all-padding batches.
    current = next(examples, empty)
    n = current["mask"].shape[0]
    yield {k: np.concatenate([v, np.zeros((batch - n, *v.shape[1:]), v.dtype)])
           for k, v in current.items()}


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Per-process numpy batch -> global jax arrays sharded along the batch axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
