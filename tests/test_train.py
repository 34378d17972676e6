"""Training system: sharding equivalence, exact resume, multi-process, end to end."""

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nonlocal_jax import input_pipeline, train
from nonlocal_jax.plot import read_scalars
from tests.small_run import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def to_numpy(tree):
  """Host copy of a state pytree; PRNG keys become their raw key data."""
  def convert(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree.map(convert, tree)


def test_one_step_on_8_devices_equals_1_device(data_dir):
  assert jax.device_count() == 8, "conftest sets 8 CPU devices"
  config = small_config(data_dir)
  builder = input_pipeline.get_builder(config)
  batch = next(input_pipeline.train_iterator(builder, config))
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = train.create_mesh(devices)
    steps = train.create_steps(config, mesh)
    state = train.init_state(config, steps)
    new_state, metrics = steps.train_step(state,
                                          input_pipeline.to_global(batch, steps.data_sharding))
    results.append((to_numpy(new_state), metrics.compute()))
  (state1, m1), (state8, m8) = results
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  leaves1 = jax.tree_util.tree_leaves_with_path(state1)
  leaves8 = dict(jax.tree_util.tree_leaves_with_path(state8))
  checked = 0
  for path, a in leaves1:
    b = leaves8[path]
    if a.dtype.kind == "f":
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
      checked += 1
  assert checked > 50
  # BN statistics moved (so they were compared, not trivially equal to init).
  stem_mean = [v for p, v in leaves1 if "'stem'" in jax.tree_util.keystr(p)
               and "'mean'" in jax.tree_util.keystr(p)]
  assert float(np.abs(stem_mean[0]).sum()) > 0


def run_main(workdir, data_dir, *extra):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}",
         "--config=" + os.path.join(ROOT, "configs", "default.py"),
         "--config.dataset=long_range_video/small", f"--config.data_dir={data_dir}",
         "--config.batch_size=16", "--config.eval_batch_size=32", "--config.num_train_steps=40",
         "--config.warmup_steps=0", "--config.checkpoint_every_steps=10",
         "--config.log_every_steps=10", *extra]
  return cmd, env


def final_params(workdir):
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  restored = manager.restore(manager.latest_step())
  return manager.latest_step(), to_numpy(restored)


def test_killed_and_resumed_run_is_bit_identical(tmp_path, data_dir):
  # Uninterrupted run.
  cmd, env = run_main(tmp_path / "full", data_dir)
  subprocess.run(cmd, env=env, check=True, capture_output=True)
  # Killed (SIGKILL, no chance to save) once the step-10 checkpoint is complete, then resumed.
  cmd, env = run_main(tmp_path / "resumed", data_dir)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = tmp_path / "resumed" / "checkpoints" / "10"
  deadline = time.time() + 300
  while not (ckpt / "_CHECKPOINT_METADATA").exists() and proc.poll() is None:
    assert time.time() < deadline, "no checkpoint after 300 s"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(int(p) for p in os.listdir(tmp_path / "resumed" / "checkpoints") if p.isdigit())
  assert killed_at < 40, "the run finished before it was killed"
  subprocess.run(cmd, env=env, check=True, capture_output=True)

  step_a, full = final_params(tmp_path / "full")
  step_b, resumed = final_params(tmp_path / "resumed")
  assert step_a == step_b == 40
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  full_metrics = json.loads((tmp_path / "full" / "final_metrics.json").read_text())
  resumed_metrics = json.loads((tmp_path / "resumed" / "final_metrics.json").read_text())
  assert full_metrics == resumed_metrics


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, data_dir):
  cmd, env = run_main(tmp_path / "wd", data_dir, "--config.checkpoint_every_steps=1000",
                      "--config.num_train_steps=100000")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  events = tmp_path / "wd"
  while not any(f.startswith("events") for f in os.listdir(events)) if events.exists() else True:
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.1)
  # The events file appears before the train step is compiled: a SIGTERM this
  # early must still end in one saved checkpoint and exit code 75.
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == train.PREEMPTED_EXIT_CODE, stderr[-2000:]
  steps = [int(p) for p in os.listdir(tmp_path / "wd" / "checkpoints") if p.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 1000
  assert "SIGTERM" in stderr


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(cmd: list[str], timeout: float = 600) -> tuple[list[dict], list[str]]:
  """Runs `cmd` (main.py and its flags) as processes 0 and 1 of a 127.0.0.1 job, one CPU device
  each; checks both succeed and returns their final metrics and outputs."""
  port, procs = free_port(), []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs.append(subprocess.Popen(
        [*cmd, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={pid}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True))
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  finals = [ast.literal_eval(out.split("Final metrics: ")[1].splitlines()[0]) for out in outputs]
  return finals, outputs


def test_two_processes_train_and_agree(tmp_path, data_dir):
  cmd, _ = run_main(tmp_path / "wd", data_dir, "--config.num_train_steps=6")
  finals, outputs = run_two_processes(cmd)
  assert finals[0] == finals[1]
  assert finals[0]["step"] == 6 and "JAX process 1 / 2" in outputs[1]


def test_end_to_end_default_config_lowers_the_loss(tmp_path, data_dir):
  config = small_config(data_dir, num_train_steps=60, log_every_steps=10, learning_rate=0.2)
  final = train.train_and_evaluate(config, str(tmp_path))
  assert set(final) >= {"eval_loss", "eval_accuracy", "eval_top5_accuracy", "param_norm", "step"}
  assert json.loads((tmp_path / "final_metrics.json").read_text()) == final
  losses = [loss for _, loss in read_scalars(str(tmp_path))["train_loss"]]
  assert len(losses) == 6
  assert losses[-1] < losses[0] - 0.05, losses


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
  config = small_config(data_dir, num_train_steps=30, checkpoint_every_steps=10,
                        log_every_steps=10)
  train.train_and_evaluate(config, str(tmp_path))  # ends with a good checkpoint at step 30
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  config = small_config(data_dir, num_train_steps=60, checkpoint_every_steps=10,
                        learning_rate=1e30)
  with pytest.raises(FloatingPointError, match="non-finite.*step 30.*untouched"):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_bad_config_values_raise(tmp_path, data_dir):
  with pytest.raises(ValueError, match="unknown dataset 'kinetics9'"):
    train.train_and_evaluate(small_config(data_dir, dataset="kinetics9"), str(tmp_path))
  with pytest.raises(ValueError, match="batch_size=12: must be divisible by the 8 devices"):
    train.train_and_evaluate(small_config(data_dir, batch_size=12), str(tmp_path))
  with pytest.raises(ValueError, match="schedule='linear'"):
    train.create_learning_rate_fn(small_config(data_dir, schedule="linear"))


def test_bfloat16_compute_trains(tmp_path, data_dir):
  config = small_config(data_dir, num_train_steps=4, log_every_steps=2, compute_dtype="bfloat16")
  final = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(final["eval_loss"]) and final["step"] == 4
