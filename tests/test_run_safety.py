"""Runs that fail safely: workdir lock, finite checkpoints, damaged checkpoints, other models,
config validation before any work, clear CLI errors."""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags
from PIL import Image

from configs import default as default_config
from nonlocal_jax import run_checkpoints, train, workdir_lock
from tests.small_run import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hold_in_subprocess(workdir):
  """A process that holds the workdir lock until killed; returns it once the lock is held."""
  code = textwrap.dedent(f"""
      import time
      from nonlocal_jax import workdir_lock
      with workdir_lock.hold({str(workdir)!r}):
        print("held", flush=True)
        time.sleep(600)
  """)
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


# -- workdir lock ---------------------------------------------------------------


def test_second_run_into_a_locked_workdir_is_refused_naming_the_holder(tmp_path, data_dir):
  holder = _hold_in_subprocess(tmp_path)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"PID {holder.pid} on host"):
      with workdir_lock.hold(str(tmp_path)):
        pass
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"PID {holder.pid}"):
      train.train_and_evaluate(small_config(data_dir), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")  # nothing of the holder's touched
  finally:
    holder.kill()
    holder.wait()


def test_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path):
  holder = _hold_in_subprocess(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with workdir_lock.hold(str(tmp_path)):  # not refused: the lock died with its process
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert (tmp_path / workdir_lock.LOCK_FILE).read_text() == ""


def test_stale_lock_warning_names_the_dead_process(tmp_path, caplog):
  holder = _hold_in_subprocess(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with caplog.at_level("WARNING"):
    with workdir_lock.hold(str(tmp_path)):
      pass
  assert f"PID {holder.pid}" in caplog.text and "no longer running" in caplog.text


# -- checkpoints ----------------------------------------------------------------


def test_nonfinite_state_is_found_and_never_saved(tmp_path):
  state = {"params": {"w": jnp.ones((3, 3)), "b": jnp.zeros(3)},
           "opt": {"momentum": jnp.array([1.0, jnp.nan])}, "count": jnp.array(3)}
  assert run_checkpoints.nonfinite_arrays(state) == ["['opt']['momentum']"]
  state["params"]["w"] = state["params"]["w"].at[0, 0].set(jnp.inf)
  assert len(run_checkpoints.nonfinite_arrays(state)) == 2

  class Manager:
    latest_step = staticmethod(lambda: 10)
  with pytest.raises(FloatingPointError, match=r"step 40: 2 of 4 arrays.*step 10\) is left"):
    train._check_finite_state(state, 40, Manager())


def test_nan_weights_with_a_finite_loss_are_not_checkpointed(tmp_path, data_dir, monkeypatch):
  train.train_and_evaluate(small_config(data_dir, num_train_steps=10), str(tmp_path))
  # A step that keeps the training loss finite but leaves NaN in the state (BN running
  # means, used only in evaluation): the save at step 20 must be refused.
  original = train.train_step

  def poisoned(graphdef, task, lr_fn, state, batch):
    state, metrics = original(graphdef, task, lr_fn, state, batch)
    poison = lambda path, x: x * jnp.nan if "['mean']" in jax.tree_util.keystr(path) else x
    return jax.tree_util.tree_map_with_path(poison, state), metrics
  monkeypatch.setattr(train, "train_step", poisoned)
  with pytest.raises(FloatingPointError, match="non-finite train state at step 20"):
    train.train_and_evaluate(small_config(data_dir, num_train_steps=20), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, data_dir, caplog):
  train.train_and_evaluate(small_config(data_dir, num_train_steps=20), str(tmp_path))
  data_files = glob.glob(str(tmp_path / "checkpoints" / "20" / "**" / "d" / "*"), recursive=True)
  largest = max(data_files, key=os.path.getsize)  # the array data, as a crash mid-copy leaves it
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  with caplog.at_level("WARNING"):
    final = train.train_and_evaluate(small_config(data_dir, num_train_steps=30), str(tmp_path))
  assert final["step"] == 30
  assert "step 20" in caplog.text and "cannot be read" in caplog.text
  kept = os.listdir(tmp_path / run_checkpoints.DAMAGED_DIR)
  assert len(kept) == 1 and kept[0].startswith("20-")


def test_workdir_of_another_model_is_refused_naming_both(tmp_path, data_dir):
  train.train_and_evaluate(small_config(data_dir, num_train_steps=10), str(tmp_path))
  config = small_config(data_dir, num_train_steps=20)
  config.model.name = "c2d_tiny"
  with pytest.raises(ValueError, match="another model.*'c2d_nl_tiny'.*'c2d_tiny'.*--workdir"):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]


# -- validation before any work --------------------------------------------------


def test_every_bad_field_is_named_before_any_data_is_built(tmp_path):
  config = small_config(str(tmp_path / "tfds"), batch_size=0, num_train_steps=-1,
                        learning_rate=-0.1, schedule="linear", momentum=1.5)
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  message = str(error.value)
  for text in ("batch_size=0", "num_train_steps=-1", "learning_rate=-0.1", "schedule='linear'",
               "momentum=1.5"):
    assert text in message
  assert not os.path.exists(tmp_path / "tfds") and not os.path.exists(tmp_path / "wd")


def test_model_that_cannot_take_the_clip_fails_before_data_preparation(tmp_path):
  config = small_config(str(tmp_path / "tfds"))
  config.model.kwargs.head_pool_window = (4, 7, 7)
  with pytest.raises(ValueError, match=r"cannot take the training inputs.*\(16, 8, 32, 32, 3\)"):
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "tfds")


def test_cifar_style_on_images_of_any_size_fails_up_front(tmp_path):
  from configs import image_folder
  root = tmp_path / "images"
  for split in ("train", "test"):
    for label, size in (("a", (40, 30)), ("b", (20, 50))):  # images of different sizes
      (root / split / label).mkdir(parents=True)
      Image.fromarray(np.zeros((*size, 3), np.uint8)).save(root / split / label / "x.png")
  config = image_folder.get_config("resnet_tiny")
  config.manual_dir, config.data_dir = str(root), str(tmp_path / "tfds")
  config.input.style = "cifar"
  with pytest.raises(ValueError, match="style='cifar'.*no fixed size"):
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "tfds")


def _parse(config_file, argv):
  """The config as main.py parses it (locked, command-line overrides applied)."""
  values = flags.FlagValues()
  argv = ["prog", f"--config={config_file}", *argv]
  config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_every_model_argument_is_settable_from_the_command_line():
  config = _parse(f"{ROOT}/configs/default.py", ["--config.model.kwargs.width=32",
                   "--config.model.kwargs.nonlocal_options.instantiation=gaussian",
                   "--config.model.kwargs.head_pool_window=None",
                   "--config.model.kwargs.nonlocal_blocks=((), (0,), (), ())"])
  model = train.build_model(config, nnx.Rngs(0))
  blocks = [m for _, m in nnx.iter_graph(model) if type(m).__name__ == "NonLocalBlock"]
  assert len(blocks) == 1 and blocks[0].instantiation == "gaussian"
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  narrow = train.build_model(default_config.get_config(), nnx.Rngs(0))
  assert params > sum(int(np.prod(p.shape))
                      for p in jax.tree.leaves(nnx.state(narrow, nnx.Param)))
  # The whole option set is visible with its defaults.
  kwargs = default_config.get_config().model.kwargs
  assert {"width", "stem_pool_padding", "zero_init_residual", "head_pool_window"} <= set(kwargs)
  assert kwargs.nonlocal_options.pool_window == "auto"


def test_a_missing_config_file_names_the_configs_and_leaves_nothing(tmp_path):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/nope.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "configs/nope.py" in result.stderr and "default.py" in result.stderr
  assert "Traceback" not in result.stderr
  assert os.listdir(tmp_path) == []


def test_progress_line_and_final_table(tmp_path, data_dir):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={tmp_path}",
       f"--config.data_dir={data_dir}", "--config.dataset=long_range_video/small",
       "--config.num_train_steps=10", "--config.warmup_steps=0", "--config.batch_size=16",
       "--config.checkpoint_every_steps=10", "--config.log_every_steps=5"],
      capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Compiled the train step in" in result.stderr
  assert "eval_accuracy" in result.stdout and "metric" in result.stdout
  assert "step 10/10" in result.stderr  # the progress line ends every run
  info_lines = [line for line in result.stderr.splitlines() if line.startswith("I")]
  assert not [line for line in info_lines if "checkpoint_manager.py" in line]


def test_progress_line_format():
  from nonlocal_jax import progress
  assert progress.format_seconds(3725) == "1h02m05s"
  assert progress.format_seconds(70) == "1m10s"
  assert progress.format_seconds(4.25) == "4.2s"
  table = progress.metrics_table({"eval_accuracy": 0.5, "step": 10})
  assert table.splitlines()[2].split() == ["eval_accuracy", "0.5000"]
  assert table.splitlines()[3].split() == ["step", "10"]


def test_visualize_names_a_model_without_nonlocal_blocks():
  from nonlocal_jax import visualize
  config = default_config.get_config("baseline")
  model = train.build_model(config, nnx.Rngs(0))
  with pytest.raises(ValueError, match="VideoResNet has no non-local blocks.*c2d_nl_tiny"):
    visualize.attention_maps(model, jnp.zeros((1, 8, 32, 32, 3)))


def test_num_classes_that_disagrees_with_the_data_names_both(tmp_path):
  config = small_config(str(tmp_path / "tfds"), num_classes=5)
  with pytest.raises(ValueError, match="num_classes=5 but the data set.*has 2 classes"):
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "tfds")


@pytest.mark.parametrize("name,shape", [("c2d_nl_tiny", (1, 8, 32, 32, 3)),
                                        ("resnet_tiny", (1, 32, 32, 3)),
                                        ("nonlocalnet_tiny", (1, 64, 64, 3))])
def test_uint8_pixels_are_refused_with_what_is_expected(name, shape):
  from nonlocal_jax.models import create_model
  model = create_model(name, num_classes=2, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"takes float .*normalised.*got dtype uint8"):
    model(jnp.zeros(shape, jnp.uint8))
  with pytest.raises(ValueError, match=r"takes \(B, .*got shape"):
    model(jnp.zeros(shape[1:]))
