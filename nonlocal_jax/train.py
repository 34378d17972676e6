"""Training and evaluation loop: ``train_and_evaluate(config, workdir)``.

Data flows one way: config -> input pipeline -> sharded jit step -> metrics /
checkpoints. The model and optimizer (Flax NNX) are split into a static
graph and a state pytree; ``train_step`` is a pure function of (state, batch)
compiled once with ``jax.jit`` over a ``('data',)`` mesh: the batch is
sharded, the state replicated and donated. BatchNorm statistics are computed
over the global batch (GSPMD reduces across devices and hosts).
"""


import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, metrics, periodic_actions
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nonlocal_jax import (checkpoints, config_validation, input_pipeline, memory_fit, progress,
                          run_checkpoints, workdir_lock)
from nonlocal_jax.models import create_model, eval_mode
from nonlocal_jax.models.segmentation import slide_inference
from nonlocal_jax.tasks import Task, create_task

State = Any  # nnx.State of (model, optimizer)


def create_learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
  """optax schedule: 'step' (x decay_factor at each of lr_steps), 'cosine', 'poly' or 'constant'.

  Linear warmup from warmup_init_lr over warmup_steps comes first if set.
  """
  lr, steps, warmup = config.learning_rate, config.num_train_steps, config.warmup_steps
  kind = config.schedule
  if kind == "step":
    main = optax.piecewise_constant_schedule(
        lr, {int(s) - warmup: config.lr_decay_factor for s in config.lr_steps})
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, max(steps - warmup, 1))
  elif kind == "poly":
    main = optax.polynomial_schedule(lr, config.end_learning_rate,
                                     config.poly_power, max(steps - warmup, 1))
  elif kind == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"config.schedule={kind!r} is not one of 'step', 'cosine', 'poly', 'constant'")
  if not warmup:
    return main
  ramp = optax.linear_schedule(config.warmup_init_lr, lr, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def decay_mask(params: nnx.State) -> Any:
  """True for weights that get weight decay: not norm parameters, not biases."""
  def is_decayed(path, _):
    names = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
    return not (names[-1] in ("bias", "scale") or any(n in ("norm", "bn") for n in names))
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def frozen_labels(pattern: str) -> Callable[[nnx.State], Any]:
  """Params tree -> 'frozen' where the '/'-joined path matches `pattern` (re.search), else 'train'."""
  regex = re.compile(pattern)

  def labels(params: nnx.State) -> Any:
    def label(path, _):
      name = "/".join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))
      return "frozen" if regex.search(name) else "train"
    return jax.tree_util.tree_map_with_path(label, params)
  return labels


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """Optional clipping, weight decay, SGD with (Nesterov) momentum.

  Weight decay skips norm parameters and biases unless
  ``config.decay_norm_and_bias`` (mmseg decays everything). Parameters whose
  path matches ``config.frozen_params`` are not updated (e.g. a detector's
  frozen BN and first stages, as torchvision's ``trainable_backbone_layers``).
  """
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.weight_decay:
    mask = None if config.decay_norm_and_bias else decay_mask
    parts.append(optax.add_decayed_weights(config.weight_decay, mask=mask))
  parts.append(optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov))
  if not config.frozen_params:
    return optax.chain(*parts)
  return optax.multi_transform({"train": optax.chain(*parts), "frozen": optax.set_to_zero()},
                               frozen_labels(config.frozen_params))


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  kwargs = config.model.kwargs.to_dict()
  if config.compute_dtype != "float32":
    kwargs["dtype"] = jnp.dtype(config.compute_dtype)
  if config.remat != "none":  # 'none' is every model's default
    kwargs["remat"] = config.remat
  return create_model(config.model.name, num_classes=config.num_classes, rngs=rngs, **kwargs)


def train_step(graphdef: nnx.GraphDef, task: Task, learning_rate_fn: optax.Schedule,
               state: State, batch: dict) -> tuple[State, metrics.Collection]:
  """One SGD step on a global batch. Pure: (state, batch) -> (new state, metrics)."""
  model, optimizer = nnx.merge(graphdef, state)

  def loss_fn(model):
    outputs = task.train_outputs(model, batch)
    return task.loss(outputs, batch), outputs

  (loss, outputs), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  learning_rate = learning_rate_fn(optimizer.step[...])
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), task.train_metrics(outputs, batch, loss, learning_rate)


def eval_forward_fn(config: ml_collections.ConfigDict, task: Task) -> Callable[[nnx.Module,
                                                                               jax.Array], Any]:
  """How the eval step applies the model: plain, multi-view averaged, or sliding windows."""
  views = input_pipeline.num_eval_views(config)
  if config.modality == "segmentation" and config.input.eval_mode == "slide":
    crop, stride = config.input.eval_crop_size, config.input.eval_stride
    return lambda model, x: slide_inference(model, x, crop, stride)
  if views > 1:  # inputs (B, V, ...): every view, predictions averaged per example
    return lambda model, x: task.combine_views(model(x.reshape(-1, *x.shape[2:])), views)
  return lambda model, x: model(x)


def eval_step(graphdef: nnx.GraphDef, task: Task, forward: Callable, state: State,
              batch: dict) -> tuple[metrics.Collection, dict]:
  """Masked metrics of one eval batch with running BN statistics and no dropout."""
  model, _ = nnx.merge(graphdef, state)
  model = eval_mode(model)
  return task.eval_metrics(task.eval_outputs(forward, model, batch), batch)


def create_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over `devices` (default: every device of every process).

  The axis is 'Auto' (GSPMD propagates shardings from the jit in/out specs).
  """
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def _make_model_and_optimizer(config: ml_collections.ConfigDict,
                              learning_rate_fn: optax.Schedule) -> tuple[nnx.Module, nnx.Optimizer]:
  model = build_model(config, nnx.Rngs(config.seed))
  return model, nnx.Optimizer(model, create_optimizer(config, learning_rate_fn), wrt=nnx.Param)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The compiled-to-be train and eval steps of a config over a mesh, and their layouts.

  Built from shapes only (``nnx.eval_shape``), so the same object serves a
  real run and ahead-of-time compilation for another platform
  (``train_step.lower(abstract_state, batch_spec).compile()``).
  """
  graphdef: nnx.GraphDef
  abstract_state: State  # jax.ShapeDtypeStruct leaves
  state_shardings: Any  # replicated NamedShardings, same tree as the state
  data_sharding: NamedSharding  # batch axis split over 'data'
  task: Task
  learning_rate_fn: optax.Schedule
  train_step: Callable  # jitted (state, batch) -> (state, metrics); donates the state
  eval_step: Callable  # jitted (state, batch) -> (metrics, host outputs)


def create_steps(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Steps:
  """The jitted steps of `config` on `mesh`: state replicated, batches split over 'data'."""
  learning_rate_fn = create_learning_rate_fn(config)
  make = functools.partial(_make_model_and_optimizer, config, learning_rate_fn)
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
  state_shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_state)
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract_state, state_shardings)
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  task = create_task(config)
  jitted_train = jax.jit(
      functools.partial(train_step, graphdef, task, learning_rate_fn),
      in_shardings=(state_shardings, data_sharding), out_shardings=(state_shardings, replicated),
      donate_argnums=0)
  jitted_eval = jax.jit(
      functools.partial(eval_step, graphdef, task, eval_forward_fn(config, task)),
      in_shardings=(state_shardings, data_sharding), out_shardings=replicated)
  return Steps(graphdef, abstract_state, state_shardings, data_sharding, task, learning_rate_fn,
               jitted_train, jitted_eval)


def init_state(config: ml_collections.ConfigDict, steps: Steps) -> State:
  """Fresh (model, optimizer) state of `config`, created directly as replicated global arrays."""
  make = functools.partial(_make_model_and_optimizer, config, steps.learning_rate_fn)
  return jax.jit(lambda: nnx.state(make()), out_shardings=steps.state_shardings)()


# Exit code of main.py when SIGTERM stopped the run early (EX_TEMPFAIL in sysexits.h):
# the checkpoint is saved and running the same command again resumes.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """SIGTERM stopped the run after saving a checkpoint; run it again to resume."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"stopped by SIGTERM at step {step} after saving a checkpoint in {workdir}; "
                     "run the same command again to resume")
    self.step = step


class _Preemption(contextlib.AbstractContextManager):
  """Remembers a SIGTERM so the loop can save before the process is killed.

  Installed for the whole run (data preparation and compilation included), so
  a SIGTERM at any moment ends in a saved checkpoint and :class:`Preempted`.
  """

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.requested = True

  def __exit__(self, *exc_info):
    signal.signal(signal.SIGTERM, self._previous)


def _check_finite_metrics(values: dict, step: int, manager: ocp.CheckpointManager) -> None:
  bad = {k: float(v) for k, v in values.items() if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"non-finite training metrics {bad} by step {step}; stopping. The last good checkpoint "
        f"(step {manager.latest_step()}) is left untouched. Lower config.learning_rate or set "
        "config.grad_clip_norm.")


def _check_finite_state(state: State, step: int, manager: ocp.CheckpointManager) -> None:
  bad = run_checkpoints.nonfinite_arrays(state)
  if bad:
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise FloatingPointError(
        f"non-finite train state at step {step}: {len(bad)} of "
        f"{len(jax.tree.leaves(state))} arrays hold NaN or Inf ({shown}); stopping without "
        f"saving it. The last good checkpoint (step {manager.latest_step()}) is left untouched. "
        "Lower config.learning_rate or set config.grad_clip_norm.")


def initialize_from(graphdef: nnx.GraphDef, state: State, shardings: Any,
                    config: ml_collections.ConfigDict) -> State:
  """Loads ``config.init_from`` weights into the fresh model (classifier too if init_head)."""
  model, optimizer = nnx.merge(graphdef, state)
  fresh = checkpoints.restore_weights(model, config.init_from,
                                      init_head=config.init_head)
  logging.info("Initialised from %s (left at init: %s)", config.init_from, fresh)
  return jax.device_put(nnx.state((model, optimizer)), shardings)


def parameter_norm(graphdef: nnx.GraphDef, state: State) -> float:
  """Global L2 norm of the model parameters (a cheap fingerprint of the trained state)."""
  model, _ = nnx.merge(graphdef, state)
  return float(optax.global_norm(nnx.state(model, nnx.Param)))


def evaluate(eval_fn: Callable, task: Task, state: State, builder,
             config: ml_collections.ConfigDict, data_sharding: NamedSharding) -> dict[str, float]:
  """Metrics over every example of the eval split exactly once."""
  totals, collected = None, []
  for batch in input_pipeline.eval_iterator(builder, config):
    batch_metrics, outputs = eval_fn(state, input_pipeline.to_global(batch, data_sharding))
    totals = batch_metrics if totals is None else totals.merge(batch_metrics)
    if outputs:
      collected.append(jax.tree.map(np.asarray, outputs))
  values = {**totals.compute(), **task.host_metrics(collected)}
  return {f"eval_{k}": float(v) for k, v in values.items()}


def prepare_run(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, Any]:
  """Validates `config` against its data set and model without reading data or building weights.

  Returns the config with ``num_classes`` resolved from the labels when it
  was 0, and the (not yet prepared) TFDS builder.
  """
  config_validation.validate_config(config, jax.device_count())
  builder = input_pipeline.create_builder(config)
  config = config_validation.resolve_num_classes(config, builder.info.features)
  config_validation.check_model_takes_inputs(config, builder.info.features)
  return config, builder


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and evaluates.

  The config is checked in full first (:func:`prepare_run`); the workdir is
  locked for the run's duration. Writes TensorBoard summaries and
  checkpoints under `workdir` and the final evaluation to
  ``workdir/final_metrics.json``; returns those metrics. Raises
  :class:`Preempted` after SIGTERM (a checkpoint is saved first).
  """
  with _Preemption() as preemption:
    config, builder = prepare_run(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    lock = workdir_lock.hold(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
      run_checkpoints.check_run_spec(workdir, config)
      builder = input_pipeline.prepare(builder)
      config_validation.check_video_lengths(config, builder)
      return _train_and_evaluate(config, workdir, builder, preemption)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, builder,
                        preemption: _Preemption) -> dict[str, float]:
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams({k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
  mesh = create_mesh()
  steps = create_steps(config, mesh)
  data_sharding, task = steps.data_sharding, steps.task
  state = init_state(config, steps)

  manager = run_checkpoints.create_manager(workdir, config)
  state, start_step = run_checkpoints.restore_latest(manager, state, workdir)
  if start_step:
    logging.info("Resuming from %s at step %d", manager.directory, start_step)
  elif config.init_from:
    state = initialize_from(steps.graphdef, state, steps.state_shardings, config)

  started = time.monotonic()
  batch_spec = input_pipeline.batch_spec(config, builder.info.features, train=True)
  batch_spec = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=data_sharding), batch_spec)
  p_train_step = steps.train_step.lower(state, batch_spec).compile()
  logging.info("Compiled the train step in %s.", progress.format_seconds(time.monotonic() - started))
  memory_fit.check_fits_on_devices(p_train_step, jax.local_devices())  # not an OOM later

  train_iter = input_pipeline.train_iterator(builder, config, start_step=start_step)
  report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                                    writer=writer)
  train_metrics = None
  progress_line = progress.ProgressLine(
      num_train_steps=config.num_train_steps, start_step=start_step,
      current_loss=lambda: None if train_metrics is None else float(train_metrics.compute()["loss"]))
  step = start_step
  try:
    while step < config.num_train_steps:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        with report_progress.timed("data"):
          batch = input_pipeline.to_global(next(train_iter), data_sharding)
        state, step_metrics = p_train_step(state, batch)
      step += 1
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      report_progress(step)
      progress_line(step)
      is_last = step == config.num_train_steps
      will_save = is_last or preemption.requested or step % config.checkpoint_every_steps == 0
      if step % config.log_every_steps == 0 or will_save:
        values = train_metrics.compute()
        _check_finite_metrics(values, step, manager)
        writer.write_scalars(step, {f"train_{k}": v for k, v in values.items()})
        train_metrics = None
      if (config.eval_every_steps and step % config.eval_every_steps == 0) and not is_last:
        with report_progress.timed("eval"):
          writer.write_scalars(step, evaluate(steps.eval_step, task, state, builder, config,
                                              data_sharding))
      if will_save:
        _check_finite_state(state, step, manager)  # never checkpoint NaN or Inf
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
      if preemption.requested:
        break
  finally:
    manager.wait_until_finished()

  if preemption.requested:
    raise Preempted(step, workdir)
  with report_progress.timed("eval"):
    final = evaluate(steps.eval_step, task, state, builder, config, data_sharding)
  final.update(param_norm=parameter_norm(steps.graphdef, state), step=step)
  writer.write_scalars(step, {k: v for k, v in final.items() if k.startswith("eval_")})
  writer.flush()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(final, f, indent=1)
  logging.info("Final metrics: %s", final)
  return final
