"""Every field a config can set, with neutral defaults; experiment configs override them.

Keeping them in one place means every ``--config.<field>=...`` override works
on every config (configs are locked: a typo in a field name is an error).
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Data.
  config.dataset = ""  # TFDS name, or one of ours (nonlocal_jax.input_pipeline.LOCAL_BUILDERS)
  config.data_dir = "~/tensorflow_datasets"
  config.manual_dir = ""  # the downloaded files our builders read
  config.train_split = "train"
  config.eval_split = "test"
  config.num_classes = 0  # 0: from the data set's label feature
  config.task = "classification"  # or 'multilabel', 'segmentation'
  config.modality = "video"  # or 'image', 'segmentation'
  config.input = ml_collections.ConfigDict()  # preprocessing of the modality
  config.cache_train = False
  config.shuffle_buffer = 4096
  config.ignore_label = 255
  config.aux_loss_weight = 0.4
  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.name = ""
  config.model.kwargs = ml_collections.ConfigDict()
  config.init_from = ""  # weights checkpoint or workdir to start from
  config.init_head = True  # False: fresh classifier (other classes)
  config.compute_dtype = "float32"  # or 'bfloat16'
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
  config.grad_clip_norm = 0.0
  config.label_smoothing = 0.0
  # Bookkeeping.
  config.log_every_steps = 100
  config.eval_every_steps = 0  # 0: only at the end
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.seed = 0
  return config
