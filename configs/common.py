"""Every field a config can set, with neutral defaults; experiment configs override them.

Keeping them in one place means every ``--config.<field>=...`` override works
on every config (configs are locked: a typo in a field name is an error).
"""

import inspect

import ml_collections
from ml_collections import config_dict

from nonlocal_jax.models import get_spec
from nonlocal_jax.nonlocal_block import NonLocalBlock
from nonlocal_jax.relation_module import RelationModule

# Constructor arguments set elsewhere: by config.num_classes, config.compute_dtype,
# config.remat, config.seed, or by the model itself for its non-local blocks.
_NOT_MODEL_KWARGS = ("self", "rngs", "num_classes", "dtype", "param_dtype", "remat",
                     "in_features", "capture_attention")
# Model arguments that are the keyword arguments of a sub-module, listed option by option.
_SUBMODULE_OPTIONS = {"nonlocal_options": NonLocalBlock, "relation_options": RelationModule}


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Data.
  config.dataset = ""  # TFDS name, or one of ours (nonlocal_jax.input_pipeline.LOCAL_BUILDERS)
  config.data_dir = "~/tensorflow_datasets"
  config.manual_dir = ""  # the downloaded files our builders read
  config.train_split = "train"
  config.eval_split = "test"
  config.num_classes = 0  # 0: from the data set's label feature
  config.task = "classification"  # or 'multilabel', 'segmentation', 'detection'
  config.modality = "video"  # or 'image', 'segmentation', 'detection'
  config.input = ml_collections.ConfigDict()  # preprocessing of the modality
  config.data_workers = 0  # decoding processes (grain); 0: threads of the trainer, -1: one per core
  config.ignore_label = 255
  config.skip_bad_files = False  # own-data builders: skip unreadable files (listed) or fail
  config.pad_short_clips = False  # videos shorter than a clip: repeat the last frame or fail
  config.aux_loss_weight = 0.4
  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.name = ""
  config.model.kwargs = ml_collections.ConfigDict()
  config.init_from = ""  # weights checkpoint or workdir to start from
  config.init_head = True  # False: fresh classifier (other classes)
  config.compute_dtype = "float32"  # or 'bfloat16'
  config.remat = "none"  # or 'blocks' (recompute each block in the backward pass), 'full'
  # Optimisation.
  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_train_steps = 1000
  config.schedule = "step"  # 'step', 'cosine', 'poly' or 'constant'
  config.learning_rate = 0.01
  config.lr_steps = ()
  config.lr_decay_factor = 0.1
  config.end_learning_rate = 0.0
  config.poly_power = 0.9
  config.warmup_steps = 0
  config.warmup_init_lr = 0.0
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4
  config.decay_norm_and_bias = False
  config.frozen_params = ""  # regex on '/'-joined parameter paths that are not trained
  config.grad_clip_norm = 0.0
  config.label_smoothing = 0.0
  # Bookkeeping.
  config.log_every_steps = 100
  config.eval_every_steps = 0  # 0: only at the end
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.seed = 0
  return config


def _arguments(constructor, given: dict) -> ml_collections.ConfigDict:
  """Every keyword argument of `constructor`: the given value or its default, any type."""
  values = ml_collections.ConfigDict()
  for name, parameter in inspect.signature(constructor.__init__).parameters.items():
    if name in _NOT_MODEL_KWARGS:
      continue
    value = given.get(name, parameter.default)
    values[name] = config_dict.FieldReference(value, field_type=object)
  return values


def expose_model_arguments(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Lists every constructor argument of ``config.model.name`` in ``config.model.kwargs``.

  The preset's values and the config's own settings are kept; the rest get
  the constructor's defaults. Each entry takes any Python literal from the
  command line (``--config.model.kwargs.width=32``,
  ``--config.model.kwargs.head_pool_window=None`` for global pooling), and
  ``nonlocal_options`` lists every NonLocalBlock option
  (``--config.model.kwargs.nonlocal_options.instantiation=gaussian``), and
  ``relation_options`` every RelationModule option.
  Call it last in ``get_config``, once the model is chosen.
  """
  spec = get_spec(config.model.name)
  given = {**spec.kwargs, **config.model.kwargs.to_dict()}
  kwargs = _arguments(spec.constructor, given)
  for name, module in _SUBMODULE_OPTIONS.items():
    if name in kwargs:
      kwargs[name] = _arguments(module, dict(given.get(name) or {}))
  config.model.kwargs = kwargs
  return config
