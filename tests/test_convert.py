"""Converters: PyTorch models built here, saved in each framework's format, converted, compared.

Every reference model gets random weights and random BN statistics; the
converted model must reproduce its outputs within 5e-3 in float32 and 1e-5
in float64 (jax x64).
"""

import json
import os
import pickle
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from benchmarks.torch_video_resnet import VideoResNet as TorchVideoResNet
from nonlocal_jax import checkpoints, convert
from nonlocal_jax.convert.__main__ import main as convert_main
from nonlocal_jax.models import create_model, eval_mode
from tests import torch_references

TOLERANCE = {"float32": 5e-3, "float64": 1e-5}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
TINY_R50 = dict(width=8)  # full ResNet-50 depth and NL placement, narrow


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
  """Runs the test in float32, and in float64 with jax x64 on."""
  if request.param == "float64":
    jax.config.update("jax_enable_x64", True)
    yield request.param
    jax.config.update("jax_enable_x64", False)
  else:
    yield request.param


def randomize(model: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> torch.nn.Module:
  """Random BN weights and statistics, near the statistics each BN really sees on `x`.

  Each BN's running mean / variance is set, in execution order and in eval
  mode, from its input on `x` and then perturbed, so activations stay O(1)
  through the whole network while every statistic is random.
  """
  g = torch.Generator().manual_seed(seed)

  def calibrate(module, inputs):
    (h,) = inputs
    dims = [0, *range(2, h.dim())]
    mean, var = h.mean(dims), h.var(dims)
    noise = torch.randn(mean.shape, generator=g, dtype=mean.dtype)
    module.running_mean.copy_(mean + 0.1 * var.sqrt() * noise)
    module.running_var.copy_(var * torch.empty_like(var).uniform_(0.8, 1.2, generator=g))
    module.weight.copy_(torch.empty_like(var).uniform_(0.6, 1.4, generator=g))
    module.bias.copy_(torch.randn(mean.shape, generator=g, dtype=mean.dtype) * 0.2)

  norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  hooks = [m.register_forward_pre_hook(calibrate) for m in norms]
  with torch.no_grad():
    model.eval()(x)
  for hook in hooks:
    hook.remove()
  return model


def state_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in model.state_dict().items()}


def run_ours(model: nnx.Module, x: np.ndarray):
  return eval_mode(model)(jnp.asarray(x))


def close(ours, theirs, dtype: str) -> None:
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0,
                             atol=TOLERANCE[dtype])


def run_cli(tmp_path, source: str, model: str, input_file, *extra) -> str:
  output = str(tmp_path / "converted")
  convert_main(["--from", source, "--model", model, "--input", str(input_file), "--output",
                output, *extra])
  return output


def video_input(dtype: str, frames: int = 8, size: int = 64, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(2, frames, size, size, 3)).astype(dtype)


def to_torch(x: np.ndarray) -> torch.Tensor:
  """(B, *positions, C) -> (B, C, *positions)."""
  return torch.from_numpy(np.moveaxis(x, -1, 1).copy())


# ---------------------------------------------------------------- PySlowFast


def test_pyslowfast_i3d_nl5(tmp_path, dtype):
  x = video_input(dtype)
  net = TorchVideoResNet("i3d", 50, 7, stem_pool_padding=1, dropout=0.0, **TINY_R50)
  net = randomize(net.to(TORCH_DTYPES[dtype]), to_torch(x))
  path = tmp_path / "I3D_NLN_8x8_R50.pyth"
  torch.save({"epoch": 196, "model_state": net.state_dict(), "cfg": "MODEL:\n  ARCH: i3d\n"}, path)
  output = run_cli(tmp_path, "pyslowfast", "i3d_nl5_r50", path, "--model_kwargs",
                   json.dumps(TINY_R50))
  model = checkpoints.load_model(output, param_dtype=jnp.dtype(dtype))
  assert model.stem_pool_padding == ((0, 0), (1, 1), (1, 1))  # PySlowFast's pool1
  with torch.no_grad():
    probabilities = net(to_torch(x))  # eval mode: PySlowFast's head returns softmax
  close(jax.nn.log_softmax(run_ours(model, x)), probabilities.log(), dtype)
  if dtype == "float32":  # the same weights with the official code's pool1 padding differ
    official = checkpoints.load_model(output, stem_pool_padding="caffe2")
    gap = np.abs(jax.nn.log_softmax(run_ours(official, x)) - probabilities.log().numpy()).max()
    assert gap > 10 * TOLERANCE[dtype]


# ---------------------------------------------------------------- Caffe2

_CAFFE2_RULES = [  # PySlowFast -> Caffe2 (PySlowFast c2_model_loading, spec 5.2)
    (r"s1\.pathway0_stem\.conv\.weight", "conv1_w"),
    (r"s1\.pathway0_stem\.bn\.", "res_conv1_bn_"),
    (r"s(\d)\.pathway0_res(\d+)\.branch2\.([abc])\.weight", r"res\1_\2_branch2\3_w"),
    (r"s(\d)\.pathway0_res(\d+)\.branch2\.([abc])_bn\.", r"res\1_\2_branch2\3_bn_"),
    (r"s(\d)\.pathway0_res(\d+)\.branch1\.weight", r"res\1_\2_branch1_w"),
    (r"s(\d)\.pathway0_res(\d+)\.branch1_bn\.", r"res\1_\2_branch1_bn_"),
    (r"s(\d)\.pathway0_nonlocal(\d+)\.conv_(\w+)\.weight", r"nonlocal_conv\1_\2_\3_w"),
    (r"s(\d)\.pathway0_nonlocal(\d+)\.conv_(\w+)\.bias", r"nonlocal_conv\1_\2_\3_b"),
    (r"s(\d)\.pathway0_nonlocal(\d+)\.bn\.", r"nonlocal_conv\1_\2_bn_"),
    (r"head\.projection\.weight", "pred_w"),
    (r"head\.projection\.bias", "pred_b"),
]
_CAFFE2_BN = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}


def caffe2_blobs(net: torch.nn.Module, *, fold_bn: bool = False) -> dict[str, np.ndarray]:
  """The official blob names and layouts of a PySlowFast-structured model.

  With ``fold_bn`` every BN becomes the scale and bias of a frozen-BN
  checkpoint (``convert_to_finetune.remove_spatial_bn_layers``, eps 1e-5).
  """
  state = {k: v for k, v in state_arrays(net).items() if not k.endswith("num_batches_tracked")}
  blobs = {}
  for key, value in state.items():
    for pattern, replacement in _CAFFE2_RULES:
      name, hits = re.subn(f"^{pattern}", replacement, key)
      if hits:
        break
    else:
      raise AssertionError(f"no Caffe2 name for {key}")
    if name.endswith("_bn_" + key.rsplit(".", 1)[-1]):
      name = name[:-len(key.rsplit(".", 1)[-1])] + _CAFFE2_BN[key.rsplit(".", 1)[-1]]
    blobs[name] = value
  if fold_bn:
    for prefix in sorted({k[:-len("_rm")] for k in blobs if k.endswith("_bn_rm")}):
      scale = blobs[prefix + "_s"] / np.sqrt(blobs.pop(prefix + "_riv") + 1e-5)
      blobs[prefix + "_b"] = blobs[prefix + "_b"] - blobs.pop(prefix + "_rm") * scale
      blobs[prefix + "_s"] = scale
  return blobs


def python2_pickle(content: dict) -> bytes:
  """Pickles {str: dict | ndarray | int | float} the way Python 2's cPickle wrote the zoo files.

  Protocol 2 with byte strings as (SHORT_)BINSTRING and ``numpy.core``
  globals, which Python 3 reads only with ``encoding='latin1'``.
  """
  def string(s: bytes) -> bytes:
    return (b"U" + bytes([len(s)]) + s) if len(s) < 256 else b"T" + struct.pack("<I", len(s)) + s

  def integer(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)

  def array(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a)
    dtype = string(a.dtype.str[1:].encode())
    shape = b"(" + b"".join(integer(d) for d in a.shape) + b"t"
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + b"(" + integer(0) + b"t"
            + string(b"b") + b"\x87R"  # _reconstruct(ndarray, (0,), 'b')
            + b"(" + integer(1) + shape
            + b"cnumpy\ndtype\n" + dtype + integer(0) + integer(1) + b"\x87R"
            + b"(" + integer(3) + string(b"<") + b"NNN" + integer(-1) + integer(-1) + integer(0)
            + b"tb"  # dtype.__setstate__
            + b"\x89" + string(a.tobytes()) + b"tb")  # ndarray.__setstate__

  def value(v) -> bytes:
    if isinstance(v, dict):
      return b"}(" + b"".join(string(k.encode()) + value(x) for k, x in v.items()) + b"u"
    if isinstance(v, np.ndarray):
      return array(v)
    if isinstance(v, float):
      return b"G" + struct.pack(">d", v)
    return integer(v)

  return b"\x80\x02" + value(content) + b"."


def write_caffe2_pkl(path, blobs: dict[str, np.ndarray]) -> None:
  content = dict(blobs)
  content["conv1_w_momentum"] = np.zeros_like(blobs["conv1_w"])  # optimizer state in the files
  content["lr"] = np.array([0.0001], np.float32)
  with open(path, "wb") as f:
    f.write(python2_pickle({"blobs": content, "model_iter": 400000}))


def test_python2_pickle_is_what_python3_reads_with_latin1(tmp_path):
  blobs = {"a_w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(300, np.float64)}
  data = python2_pickle({"blobs": blobs, "model_iter": 7})
  loaded = pickle.loads(data, encoding="latin1")
  assert loaded["model_iter"] == 7
  for k, v in blobs.items():
    np.testing.assert_array_equal(loaded["blobs"][k], v)
    assert loaded["blobs"][k].dtype == v.dtype


# Official placements (spec 2.3): R50 res3 1, 3 and res4 1, 3, 5; R101 res4 6, 13, 20.
OFFICIAL_NL5 = {50: ((), (1, 3), (1, 3, 5), ()), 101: ((), (1, 3), (6, 13, 20), ())}


@pytest.mark.parametrize("arch,clip,depth,nonlocal_", [
    ("i3d", "8x8", 50, True), ("c2d", "32x2", 50, True), ("c2d", "8x8", 101, True),
    ("i3d", "8x8", 50, False)])
def test_caffe2(tmp_path, dtype, arch, clip, depth, nonlocal_):
  frames = 8 if clip == "8x8" else 16
  x = video_input(dtype, frames=frames)
  placement = OFFICIAL_NL5[depth] if nonlocal_ else ((), (), (), ())
  net = TorchVideoResNet(arch, depth, 5, placement, dropout=0.0, clip=clip, **TINY_R50)
  net = randomize(net.to(TORCH_DTYPES[dtype]), to_torch(x))
  path = tmp_path / "model.pkl"
  write_caffe2_pkl(path, caffe2_blobs(net))
  name = (f"{arch}_nl5_r{depth}" if nonlocal_ else f"{arch}_r{depth}") + (
      "_32x2" if clip == "32x2" else "")
  output = run_cli(tmp_path, "caffe2", name, path, "--model_kwargs", json.dumps(TINY_R50))
  model = checkpoints.load_model(output, param_dtype=jnp.dtype(dtype))
  with torch.no_grad():
    probabilities = net(to_torch(x))
  close(jax.nn.log_softmax(run_ours(model, x)), probabilities.log(), dtype)


def test_caffe2_frozen_bn_long_clip(tmp_path):
  """32x4 "affine" I3D-NL: folded BN, NL blocks without BN, res3 attention in groups of 4 frames."""
  x = video_input("float32", frames=32)
  net = TorchVideoResNet("i3d", 50, 5, dropout=0.0, nonlocal_options={"use_bn": False},
                         res3_nonlocal_options={"group_size": 4}, **TINY_R50)
  net = randomize(net, to_torch(x))
  blobs = caffe2_blobs(net, fold_bn=True)
  assert not any(k.endswith(("_rm", "_riv")) for k in blobs)
  path = tmp_path / "i3d_nonlocal_32x4_affine.pkl"
  write_caffe2_pkl(path, blobs)
  output = run_cli(tmp_path, "caffe2", "i3d_nl5_r50", path, "--model_kwargs",
                   json.dumps(TINY_R50))
  model = checkpoints.load_model(output)
  assert type(model.stem.norm).__name__ == "FrozenAffine"
  assert model.stages[1].nonlocal_blocks["1"].temporal_group_size == 4
  with torch.no_grad():
    probabilities = net(to_torch(x))
  close(jax.nn.log_softmax(run_ours(model, x)), probabilities.log(), "float32")


class MakesDirectory:
  """Pickles as a call to os.mkdir: what a malicious checkpoint could run when loaded."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return (os.mkdir, (self.path,))


def test_caffe2_pickle_with_other_globals_is_refused(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps({"blobs": {"conv1_w": MakesDirectory(marker)}}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.mkdir"):
    convert.read_caffe2_blobs(str(path))
  assert not marker.exists()


def test_torch_file_with_code_is_refused(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pyth"
  torch.save({"model_state": {"w": torch.zeros(1)}, "extra": MakesDirectory(marker)}, path)
  with pytest.raises(pickle.UnpicklingError, match="weights_only=True"):
    convert.read_torch_state_dict(str(path))
  assert not marker.exists()


# ---------------------------------------------------------------- torchvision


def test_torchvision_resnet50(tmp_path, dtype):
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(dtype)
  net = torch_references.TorchvisionResNet(width=8, num_classes=6).to(TORCH_DTYPES[dtype])
  net = randomize(net, to_torch(x))
  path = tmp_path / "resnet50.pth"
  torch.save(net.state_dict(), path)
  output = run_cli(tmp_path, "torchvision", "resnet50", path, "--model_kwargs",
                   json.dumps(TINY_R50))
  model = checkpoints.load_model(output, param_dtype=jnp.dtype(dtype))
  with torch.no_grad():
    close(run_ours(model, x), net(to_torch(x)), dtype)


_PYSLOWFAST_OF_TORCHVISION = {
    "conv1": "branch2.a", "conv2": "branch2.b", "conv3": "branch2.c", "bn1": "branch2.a_bn",
    "bn2": "branch2.b_bn", "bn3": "branch2.c_bn", "downsample.0": "branch1",
    "downsample.1": "branch1_bn"}


def pyslowfast_key_of_torchvision(key: str) -> str:
  """torchvision -> PySlowFast names (spec 5.4 and 5.2 tables)."""
  if key.startswith(("conv1.", "bn1.")):
    module, rest = key.split(".", 1)
    return f"s1.pathway0_stem.{'conv' if module == 'conv1' else 'bn'}.{rest}"
  layer, block, module, rest = re.match(r"layer(\d)\.(\d+)\.(\w+(?:\.\d)?)\.(\w+)$",
                                        key).groups()
  return f"s{int(layer) + 1}.pathway0_res{block}.{_PYSLOWFAST_OF_TORCHVISION[module]}.{rest}"


def test_torchvision_inflated_into_i3d_nl(tmp_path):
  """ImageNet weights inflated (repeat over T, / T) as PySlowFast's inflate_weight, fresh NL."""
  x = video_input("float32")
  image_net = torch_references.TorchvisionResNet(width=8, num_classes=6)
  image_net = randomize(image_net, to_torch(x[:, 0]))
  path = tmp_path / "resnet50.pth"
  torch.save(image_net.state_dict(), path)
  output = run_cli(tmp_path, "torchvision", "i3d_nl5_r50", path, "--model_kwargs",
                   json.dumps(TINY_R50), "--drop_head", "--fresh_nonlocal")

  video_net = TorchVideoResNet("i3d", 50, 6, **TINY_R50).eval()
  target = video_net.state_dict()
  with torch.no_grad():
    for key, value in image_net.state_dict().items():
      if key.startswith("fc."):
        continue
      new = pyslowfast_key_of_torchvision(key)
      if value.dim() == 4:  # PySlowFast inflate_weight
        taps = target[new].shape[2]
        value = value.unsqueeze(2).repeat(1, 1, taps, 1, 1) / taps
      target[new].copy_(value)
    for key in target:
      if re.match(r"s\d\.pathway0_nonlocal\d+\.bn\.weight", key):
        target[key].zero_()  # a fresh NL block is the identity (gamma = 0), as ours
  video_net.load_state_dict(target)

  model = checkpoints.load_model(output)
  with torch.no_grad():
    t = video_net.s5(video_net.s4(video_net.s3(video_net.pathway0_pool(
        video_net.s2(video_net.s1(to_torch(x)))))))
  features = eval_mode(model).features(x)
  close(features, np.moveaxis(t.numpy(), 1, -1), "float32")


# ---------------------------------------------------------------- mmsegmentation


def test_mmseg_nonlocalnet(tmp_path, dtype):
  x = np.random.default_rng(2).normal(size=(1, 64, 64, 3)).astype(dtype)
  sizes = dict(stage_depths=(2, 2, 2, 2), width=8, head_channels=16, aux_channels=8)
  net = torch_references.NonLocalNet(num_classes=5, **sizes).to(TORCH_DTYPES[dtype])
  net = randomize(net, to_torch(x))
  path = tmp_path / "nonlocal_r50-d8_512x1024_40k_cityscapes.pth"
  torch.save({"meta": {"mmseg_version": "1.2.2", "iter": 40000},
              "state_dict": net.state_dict()}, path)
  output = run_cli(tmp_path, "mmseg", "nonlocalnet_r50_d8", path, "--model_kwargs",
                   json.dumps(sizes))
  model = checkpoints.load_model(output, param_dtype=jnp.dtype(dtype))
  with torch.no_grad():
    logits, aux = net(to_torch(x))
  ours, _ = run_ours(model, x)
  close(ours, np.moveaxis(logits.numpy(), 1, -1), dtype)
  eval_model = eval_mode(model)
  stage3, _ = eval_model.backbone(jnp.asarray(x))
  ours_aux = jax.image.resize(eval_model.aux_classifier(eval_model.aux_in(stage3)),
                              (1, 64, 64, 5), "bilinear", antialias=False)
  close(ours_aux, np.moveaxis(aux.numpy(), 1, -1), dtype)


# ---------------------------------------------------------------- checks and options


def _tiny_source():
  net = TorchVideoResNet("c2d", 50, 3, stage_depths=(1, 1, 1, 1), width=8,
                         nonlocal_blocks=((), (0,), (0,), ()))
  return {k: v.numpy() for k, v in net.state_dict().items()}


def test_mismatches_are_listed_together_and_nothing_is_written(tmp_path):
  weights = _tiny_source()
  del weights["s3.pathway0_res0.branch2.a.weight"]
  weights["s4.pathway0_res0.branch2.b.weight"] = np.zeros((1, 2, 3, 4, 5), np.float32)
  weights["s9.extra.weight"] = np.zeros(3, np.float32)
  path = tmp_path / "bad.pyth"
  torch.save({"model_state": {k: torch.from_numpy(v) for k, v in weights.items()}}, path)
  with pytest.raises(SystemExit) as error:
    run_cli(tmp_path, "pyslowfast", "c2d_nl_tiny", path)
  message = str(error.value)
  assert "3 weights" in message
  assert "missing: stages/1/blocks/0/a/conv/kernel" in message
  assert "shape mismatch: stages/2/blocks/0/b/conv/kernel" in message
  assert "not in the model: 's9.extra.weight'" in message
  assert not (tmp_path / "converted").exists()


def test_drop_head_fine_tunes_on_other_classes(tmp_path):
  weights = _tiny_source()
  path = tmp_path / "tiny.pyth"
  torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
  output = run_cli(tmp_path, "pyslowfast", "c2d_nl_tiny", path, "--drop_head")
  stored = checkpoints.load_weights(output)
  assert not any(k[0] == "head" for k in stored)
  model = create_model("c2d_nl_tiny", num_classes=11, rngs=nnx.Rngs(0),
                                   stem_pool_padding="pyslowfast")
  fresh = checkpoints.restore_weights(model, output, init_head=False)
  assert ("head", "projection", "kernel") in fresh
  np.testing.assert_array_equal(model.stem.conv.kernel[...],
                                weights["s1.pathway0_stem.conv.weight"].transpose(2, 3, 4, 1, 0))
  with pytest.raises(ValueError, match="missing in checkpoint: head/projection/bias"):
    checkpoints.restore_weights(create_model(
        "c2d_nl_tiny", num_classes=11, rngs=nnx.Rngs(0)), output)


def test_existing_output_and_unknown_source_are_refused(tmp_path):
  (tmp_path / "converted").mkdir()
  (tmp_path / "converted" / "keep.txt").write_text("mine")
  with pytest.raises(SystemExit, match="refusing to overwrite"):
    run_cli(tmp_path, "caffe2", "c2d_nl_tiny", tmp_path / "missing.pkl")
  assert (tmp_path / "converted" / "keep.txt").read_text() == "mine"
  with pytest.raises(ValueError, match="unknown source 'keras'"):
    convert.convert("keras", {}, "c2d_nl_tiny")
  with pytest.raises(FileNotFoundError, match="missing.pkl"):
    convert.read_caffe2_blobs(str(tmp_path / "missing.pkl"))
  with pytest.raises(FileNotFoundError, match="model.json"):
    checkpoints.load_model(str(tmp_path / "converted"))
