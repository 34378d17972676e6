"""Ahead-of-time compilation for TPU slices on CPU: names, memory report, shardings, fit, CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import default as default_config
from nonlocal_jax import aot, memory_fit, train
from nonlocal_jax.models import create_model
from nonlocal_jax.tpu_chips import GiB, parse_slice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu is not installed "
                                  "(pip install -r requirements-tpu.txt)")


@pytest.mark.parametrize("name, topology, chips", [
    ("v4-8", "v4:2x2x1", 4),  # v4-N counts TensorCores: 2 per chip
    ("v4-32", "v4:2x2x4", 16),
    ("v5p-8", "v5p:2x2x1", 4),
    ("v5e-8", "v5e:2x4", 8),  # v5e-N counts chips
    ("v5litepod-8", "v5e:2x4", 8),
    ("v5e-16", "v5e:4x4", 16),
    ("v6e-8", "v6e:2x4", 8),
    ("v5e:2x2", "v5e:2x2", 4),
    ("v5e:1x1", "v5e:1x1", 1),
    ("V4:2x2x1", "v4:2x2x1", 4),
])
def test_slice_names(name, topology, chips):
  tpu_slice = parse_slice(name)
  assert (tpu_slice.topology_name, tpu_slice.num_chips) == (topology, chips)


@pytest.mark.parametrize("name", ["v3-8", "v5e-3", "v4-6", "v5e:2x2x1", "tpu", "v4:2x2"])
def test_unknown_slice_names_the_supported_ones(name):
  with pytest.raises(ValueError, match=rf"unknown TPU slice '{name}'.*v5e-N.*v4:2x2x1"):
    parse_slice(name)


def test_find_max_batch_doubles_then_bisects():
  probes = []

  def fits(batch):
    probes.append(batch)
    return batch <= 13

  assert aot.find_max_batch(fits) == (13, len(probes))
  assert probes == [1, 2, 4, 8, 16, 12, 14, 13]
  assert aot.find_max_batch(lambda b: b <= 13, start=64)[0] == 13
  assert aot.find_max_batch(lambda b: False) == (0, 1)


class FakeDevice:
  """What check_fits_on_devices reads from a jax.Device."""

  def __init__(self, platform, limit):
    self.platform, self.id, self.device_kind, self._limit = platform, 0, "TPU v5 lite", limit

  def memory_stats(self):
    return None if self._limit is None else {"bytes_limit": self._limit, "bytes_in_use": 0}


def test_check_fits_on_devices():
  compiled = jax.jit(lambda x: jnp.tanh(x @ x).sum()).lower(jnp.ones((256, 256))).compile()
  need = memory_fit.required_bytes(compiled.memory_analysis())
  assert need >= 256 * 256 * 4
  memory_fit.check_fits_on_devices(compiled, [FakeDevice("tpu", need)])
  memory_fit.check_fits_on_devices(compiled, [FakeDevice("cpu", 1)])  # host memory: not checked
  memory_fit.check_fits_on_devices(compiled, [FakeDevice("tpu", None)])  # no statistics
  memory_fit.check_fits_on_devices(compiled, jax.devices())  # the CPU devices of the tests
  with pytest.raises(memory_fit.StepDoesNotFitError,
                     match=r"needs 0\.00 GiB per device.*has 0\.00 GiB.*smaller per-chip batch.*"
                           r"config\.remat='blocks'.*config\.compute_dtype='bfloat16'"):
    memory_fit.check_fits_on_devices(compiled, [FakeDevice("tpu", need), FakeDevice("tpu", need - 1)])


@pytest.fixture(scope="module")
def default_on_v5e_2x2():
  """The built-in default config compiled for a 4-chip v5e: (config, slice, steps, compiled)."""
  tpu_slice = parse_slice("v5e:2x2")
  config = aot.with_batch(default_config.get_config(), tpu_slice.num_chips, 8, 8)
  steps, compiled = aot.compile_steps(config, tpu_slice)
  return config, tpu_slice, steps, compiled


@needs_libtpu
@pytest.mark.slow  # two TPU compiles, ~15 s on 2 cores
def test_default_config_memory_report_is_memory_analysis(default_on_v5e_2x2):
  config, tpu_slice, steps, compiled = default_on_v5e_2x2
  for name in ("train", "eval"):
    executable, batch, seconds = compiled[name]
    devices = jax.tree.leaves(executable.input_shardings)[0].device_set
    assert {d.device_kind for d in devices} == {"TPU v5 lite"} and len(devices) == 4
    report = aot._step_report(name, executable, steps.abstract_state, batch, tpu_slice, seconds)
    memory = executable.memory_analysis()
    assert report.argument_bytes == memory.argument_size_in_bytes
    assert report.temp_bytes == memory.temp_size_in_bytes
    assert report.total_bytes == (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                  - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                                  + memory.generated_code_size_in_bytes)
    # State replicated, batch split: the arguments are the whole state and a quarter of the batch.
    assert report.argument_bytes >= report.state_bytes + report.batch_bytes
    assert report.batch_bytes == aot.tree_bytes(batch) // 4
    assert report.flops > 0 and report.bytes_accessed > 0
  # The new state is written over the donated old one.
  assert compiled["train"][0].memory_analysis().alias_size_in_bytes > 0


@needs_libtpu
@pytest.mark.slow
def test_tpu_train_step_has_the_shardings_of_a_cpu_run(default_on_v5e_2x2):
  config, tpu_slice, steps, compiled = default_on_v5e_2x2
  cpu_steps = train.create_steps(config, train.create_mesh(jax.devices()[:4]))
  cpu_batch = aot.batch_specs(config, aot.dataset_features(config), cpu_steps.data_sharding)[0]
  cpu_compiled = cpu_steps.train_step.lower(cpu_steps.abstract_state, cpu_batch).compile()

  def layout(shardings):
    return [(s.spec, tuple(s.mesh.axis_names), tuple(s.mesh.devices.shape))
            for s in jax.tree.leaves(shardings)]

  tpu_layout = layout(compiled["train"][0].input_shardings)
  assert tpu_layout == layout(cpu_compiled.input_shardings)
  state_specs = {spec for spec, _, _ in layout(compiled["train"][0].input_shardings[0][0])}
  batch_specs = {spec for spec, _, _ in layout(compiled["train"][0].input_shardings[0][1])}
  assert state_specs == {jax.sharding.PartitionSpec()}  # replicated
  assert batch_specs == {jax.sharding.PartitionSpec("data")}  # split over the chips


def run_cli(*args, tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-m", "nonlocal_jax.aot", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


@needs_libtpu
@pytest.mark.slow
def test_cli_config_that_cannot_fit_says_no_and_exits_1(tmp_path):
  """c2d_tiny at width 1024: ~2 x 7.6 GiB of weights and momentum per chip cannot fit in 16 GiB."""
  out = tmp_path / "report.json"
  result = run_cli("--config", "configs/default.py:baseline", "--topology", "v5e:1x1",
                   "--config.model.kwargs.width=1024", "--batch_size", "2", "--eval_batch_size",
                   "2", "--json", str(out), tmp_path=tmp_path)
  assert result.returncode == 1, result.stderr[-3000:]
  verdict = result.stdout.strip().splitlines()[-1]
  assert verdict.startswith("fits: no (") and verdict.endswith(" of 16 GiB)"), result.stdout
  report = json.loads(out.read_text())
  assert report["fits"] is False and report["total_bytes"] > 16 * GiB
  model = nnx.eval_shape(lambda: create_model("c2d_tiny", num_classes=2, width=1024,
                                              rngs=nnx.Rngs(0)))
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert report["train"]["state_bytes"] >= 2 * 4 * num_params  # float32 weights + momentum
  assert "parameters + optimizer state" in result.stdout and "roofline lower bound" in result.stdout


def test_cli_unknown_topology_names_the_supported_ones(tmp_path):
  result = run_cli("--topology", "v9-8", tmp_path=tmp_path)
  assert result.returncode == 2
  assert "unknown TPU slice 'v9-8'" in result.stderr and "v5e:2x2" in result.stderr
