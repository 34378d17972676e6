"""Every check of an experiment config, run before any data is built or any step compiled.

:func:`validate_config` collects all problems of a config into one
ValueError that names each field, its value and what is accepted;
:func:`check_model_takes_inputs` traces the model on the configured batch
shapes with ``jax.eval_shape`` (no data, no weights), so a pooling window
larger than the feature map or a clip too short fails in seconds, not after
data preparation or a whole training run. ``train_and_evaluate``,
``python -m nonlocal_jax.visualize`` and ``python -m nonlocal_jax.aot`` call them.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import tensorflow_datasets as tfds
from flax import nnx

from nonlocal_jax import input_pipeline
from nonlocal_jax.data import clip_lengths
from nonlocal_jax.models import get_spec
from nonlocal_jax.tasks import TASKS, create_task

SCHEDULES = ("step", "cosine", "poly", "constant")
COMPUTE_DTYPES = ("float32", "bfloat16")
REMATS = ("none", "blocks", "full")


def _problems(config: ml_collections.ConfigDict, num_devices: int | None) -> list[str]:
  problems = []

  def need(ok: bool, field: str, accepted: str) -> None:
    if not ok:
      problems.append(f"config.{field}={config[field]!r}: {accepted}")

  for field, accepted in (("modality", input_pipeline.MODALITIES), ("task", tuple(TASKS)),
                          ("schedule", SCHEDULES), ("compute_dtype", COMPUTE_DTYPES),
                          ("remat", REMATS)):
    need(config[field] in accepted, field, f"must be one of {accepted}")
  for field in ("batch_size", "eval_batch_size", "num_train_steps", "log_every_steps",
                "checkpoint_every_steps", "keep_checkpoints"):
    need(isinstance(config[field], int) and config[field] > 0, field, "must be a positive int")
  for field in ("batch_size", "eval_batch_size"):
    if num_devices and isinstance(config[field], int) and config[field] > 0:
      need(config[field] % num_devices == 0, field,
           f"must be divisible by the {num_devices} devices")
  need(config.eval_every_steps >= 0, "eval_every_steps", "must be >= 0 (0: only at the end)")
  need(0 <= config.warmup_steps < max(config.num_train_steps, 1), "warmup_steps",
       f"must be in [0, num_train_steps={config.num_train_steps})")
  need(config.learning_rate > 0, "learning_rate", "must be > 0")
  need(0 <= config.warmup_init_lr, "warmup_init_lr", "must be >= 0")
  need(0 <= config.momentum < 1, "momentum", "must be in [0, 1)")
  need(config.weight_decay >= 0, "weight_decay", "must be >= 0")
  need(config.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0 (0: no clipping)")
  need(0 <= config.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
  need(config.num_classes >= 0, "num_classes", "must be >= 0 (0: from the data set's labels)")
  if config.schedule == "step":
    need(0 < config.lr_decay_factor <= 1, "lr_decay_factor", "must be in (0, 1]")
    steps = list(config.lr_steps)
    need(steps == sorted(steps) and all(config.warmup_steps < s < config.num_train_steps
                                        for s in steps), "lr_steps",
         f"must increase and lie in (warmup_steps={config.warmup_steps}, "
         f"num_train_steps={config.num_train_steps})")
  if not config.dataset:
    problems.append("config.dataset is empty: name a TFDS data set or one of ours "
                    f"{sorted(input_pipeline.LOCAL_BUILDERS)}")
  if config.init_from and not os.path.exists(os.path.expanduser(config.init_from)):
    problems.append(f"config.init_from={config.init_from!r}: no such file or directory")
  try:
    get_spec(config.model.name)
  except ValueError as e:
    problems.append(f"config.model.name: {e}")
  return problems


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises one ValueError listing every invalid field of `config` (nothing is read or built).

  With `num_devices` (a training run), batch sizes must also divide over them.
  """
  problems = _problems(config, num_devices)
  if problems:
    raise ValueError(f"{len(problems)} problem(s) in the config:\n  " + "\n  ".join(problems))


def resolve_num_classes(config: ml_collections.ConfigDict,
                        features: tfds.features.FeaturesDict) -> ml_collections.ConfigDict:
  """`config` with ``num_classes`` from the data set's labels when it is 0; checked otherwise.

  A config whose ``num_classes`` disagrees with the labels found in the data
  (class folders, a ClassLabel, multi-hot vectors) is an error naming both.
  """
  if not TASKS[config.task].num_classes_from_labels:
    return config
  label = features["label"]
  if isinstance(label, tfds.features.ClassLabel):
    found, what = label.num_classes, "classes"
  elif len(label.shape) == 1 and label.shape[0]:
    found, what = label.shape[0], "entries per multi-hot label"
  else:
    found, what = None, ""
  if not config.num_classes:
    if found is None:
      raise ValueError(f"config.num_classes=0 takes the classes from the data set, but its label "
                       f"feature {label!r} does not say how many; set config.num_classes")
    config = config.copy_and_resolve_references()
    config.num_classes = found
  elif found is not None and found != config.num_classes:
    raise ValueError(f"config.num_classes={config.num_classes} but the data set "
                     f"{config.dataset!r} has {found} {what}; set config.num_classes={found} "
                     "(or 0 to take it from the data)")
  return config


def check_model_takes_inputs(config: ml_collections.ConfigDict,
                             features: tfds.features.FeaturesDict) -> None:
  """Traces the model (abstractly) on the train and eval batch shapes of `config`.

  Raises ValueError naming the model, the input shape and the model's error
  when the model cannot take them (e.g. a head pooling window larger than the
  res5 feature map, or a clip too short for the temporal pool).
  """
  from nonlocal_jax import train  # train imports this module

  model = nnx.eval_shape(lambda: train.build_model(config, nnx.Rngs(0)))
  task = create_task(config)
  forward = train.eval_forward_fn(config, task)
  for kind, is_train in (("training", True), ("evaluation", False)):
    batch = input_pipeline.batch_spec(config, features, train=is_train)
    graphdef, state = nnx.split(model if is_train else train.eval_mode(model))
    apply = (lambda s, b: task.train_outputs(nnx.merge(graphdef, s), b)) if is_train else (
        lambda s, b: task.eval_outputs(forward, nnx.merge(graphdef, s), b))
    try:
      jax.eval_shape(apply, state, batch)
    except (ValueError, TypeError) as e:
      raise ValueError(
          f"model {config.model.name!r} cannot take the {kind} inputs of this config, shape "
          f"{batch['inputs'].shape} (config.input: {config.input.to_dict()}): {e}") from None


def check_video_lengths(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder) -> None:
  """Videos of the prepared data set shorter than a clip: an error naming them, or a warning
  when ``config.pad_short_clips`` (their last frame is repeated)."""
  if config.modality != "video" or "num_frames" not in builder.info.features:
    return  # decoded clips of a fixed length (e.g. our synthetic set)
  needed = clip_lengths.frames_needed(config.input.num_frames, config.input.frame_stride)
  for split in dict.fromkeys((config.train_split, config.eval_split)):
    counts = clip_lengths.stored_frame_counts(builder.info.metadata, split)
    if counts is not None:  # None: prepared by a builder that does not record them
      clip_lengths.check_clip_lengths(counts, needed, config.pad_short_clips, split=split)
