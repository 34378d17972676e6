"""Train-step throughput and peak memory: our jit step against PyTorch eager.

    python -m benchmarks.train_step                         # 4 video models, 8x112x112, batch 4
    python -m benchmarks.train_step --models i3d_nl5_r50 --crop 160 --json out.json
    python -m benchmarks.train_step --dtype bfloat16 --no_torch   # our bf16 compute alone
    python -m benchmarks.train_step --models i3d_nl5_r50 --rounds 3  # alternate, keep the best
    python -m benchmarks.train_step --models maskrcnn_r50_fpn maskrcnn_r50_fpn_nl1 \
        keypointrcnn_r50_fpn keypointrcnn_r50_fpn_nl5 --image_size 256 --batch 1 --json det.json

The JAX side is the real ``train.train_step`` (the config's optimizer, BN or
frozen norms as configured, state donated) on one device; the PyTorch side
runs in eager mode with as many threads as cores, in a fresh process (so that
its timing depends neither on this process' heap nor on XLA's threads), whose
peak RSS is reported. Peak memory for JAX is the compiled memory analysis.
Each entry of :data:`MODELS` knows how to build both sides and its unit:

* video classifiers (clips/s; ``--frames``, ``--crop``): ``configs/common.py``'s
  recipe (SGD, Nesterov, masked weight decay, BN in training mode) against
  the same network built as PySlowFast builds it
  (:mod:`benchmarks.torch_video_resnet`) with ``torch.optim.SGD``. Both run
  the same computation, so XLA's FLOP count of our step gives both FLOP rates.
* detectors (images/s; ``--image_size`` S, a multiple of 32): the detection
  train step of ``configs/coco.py``'s variant with its input at S
  (``train_min_sizes=(S,)``, ``max_size=S``, ``pad_size=(S, S)``), on a
  synthetic batch shaped as the detection modality emits it
  (:func:`detection_batch`), against torchvision's Mask R-CNN / Keypoint R-CNN
  R50-FPN (``min_size=max_size=S``: it sees the same pixels, and the same
  objects without our padding) with ``torch.optim.SGD`` (the config's lr,
  momentum 0.9, weight decay 1e-4). torchvision's builders freeze BN and the
  stem + res2 (``trainable_backbone_layers=3``) only when given a backbone
  checkpoint; without one they train every layer with ``BatchNorm2d``
  (``models/detection/backbone_utils.py``, ``_validate_trainable_layers``), so
  the reference is composed as ``maskrcnn_resnet50_fpn`` composes it with a
  checkpoint (``FrozenBatchNorm2d``, ``_resnet_fpn_extractor(backbone, 3)``)
  but from random weights: the layers our config freezes. Both sides start
  with silent residual branches (:meth:`Detector.start`). The non-local
  variants have no torchvision counterpart ('-').

  The two do not do the same work, so XLA's FLOP count gives no PyTorch rate
  ('-'): with static shapes, our mask / keypoint head runs on all
  ``box_batch_size_per_image * box_positive_fraction`` = 128 positive slots
  per image, torchvision's on its positive RoIs only, up to 128 (printed as
  ``head_rois_per_image``, from its last timed step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import sys
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

# torch 2.14.1 here is a CUDA build that imports triton, whose native library crashes the
# process when TensorFlow (imported by nonlocal_jax) is loaded first: make `import triton`
# fail, which torch handles (tests/conftest.py). Set before any import, so it holds in the
# fresh processes too, which import this module to find the PyTorch step.
sys.modules.setdefault("triton", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import host_malloc  # noqa: E402
from benchmarks.timing import in_fresh_process, median_seconds  # noqa: E402
from configs import coco, common  # noqa: E402
from nonlocal_jax import train  # noqa: E402
from nonlocal_jax.models.registry import NONLOCAL_PLACEMENTS  # noqa: E402
from nonlocal_jax.preprocessing import detection, modalities, video  # noqa: E402

# COCO train2017 has 7.3 annotated objects per image on average (860k instances, 118k images).
OBJECTS_PER_IMAGE = 7
# The last norm's scale of each bottleneck of our detectors' backbone (models/resnet_layers.py).
_RESIDUAL_SCALE = re.compile(r"backbone/stages/\d+/blocks/\d+/c/norm/scale")


class Benchmark(Protocol):
  """One kind of row: how to build our step and its PyTorch reference, and the unit."""
  unit: str  # what one example is ('clips', 'images'): rates are <unit>/s
  same_computation: bool  # PyTorch computes what our step does: XLA's FLOPs give its rate too

  def example_shape(self, args: argparse.Namespace) -> tuple[int, ...]:
    """The shape of one example at the flags' sizes (no batch axis, no channels)."""

  def config(self, model: str, args: argparse.Namespace) -> ml_collections.ConfigDict:
    """Our config of `model` at the flags' batch, sizes and compute dtype."""

  def data(self, config: ml_collections.ConfigDict,
           args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """(batch, job): a synthetic batch of `config` and the PyTorch step's view of it.

    The batch is numpy, structured as `config`'s input pipeline emits it in
    training; the job is what the PyTorch step needs to train on the same
    examples (picklable), None when there is no PyTorch counterpart.
    """

  def start(self, state: train.State) -> train.State:
    """Our initial state as the benchmark starts from it (`state`: the config's own)."""

  def torch_step(self, job: Any) -> Callable[[], dict[str, float]]:
    """In the fresh process: one PyTorch train step on `job`, returning {'loss', ...}."""


def step_config(model: str, batch: int, dtype: str = "float32") -> ml_collections.ConfigDict:
  """A video classifier's config: ``configs/common.py``'s recipe, 400 classes, lr 0.01.

  The video modality's default settings make the eval step buildable
  (``train.create_steps`` asks them for the views per clip).
  """
  config = common.base_config()
  config.input = video.default_config()
  config.model.name = model
  config.compute_dtype = dtype
  config.num_classes = 400
  config.batch_size = batch
  config.learning_rate = 0.01
  return config


def video_batch(batch: int, frames: int, crop: int) -> dict[str, np.ndarray]:
  """Random clips (B, T, crop, crop, 3) and class 0."""
  return {"inputs": np.random.default_rng(0).normal(size=(batch, frames, crop, crop, 3)).astype(
      np.float32), "label": np.zeros((batch,), np.int32)}


def jitted_step(config: ml_collections.ConfigDict, frames: int, crop: int):
  """Our donated, jitted video train step on one device, its initial state and a random batch."""
  return jitted_step_on(config, video_batch(config.batch_size, frames, crop))


def jitted_step_on(config: ml_collections.ConfigDict, batch: dict[str, Any],
                   start: Callable[[train.State], train.State] = lambda state: state):
  """Our donated, jitted train step of `config` on one device, its initial state, `batch` on it.

  The state is the config's initial one passed through `start`.
  """
  steps = train.create_steps(config, train.create_mesh(jax.devices()[:1]))
  state = start(train.init_state(config, steps))
  return steps.train_step, state, jax.tree.map(jnp.asarray, batch)


@dataclasses.dataclass(frozen=True)
class VideoClassifier:
  """A C2D / I3D ResNet-50 on --frames x --crop x --crop clips, 400 classes."""
  arch: str  # 'c2d' or 'i3d'
  nonlocal_blocks: tuple[tuple[int, ...], ...]  # per stage, as the registry's placements
  unit: ClassVar[str] = "clips"
  same_computation: ClassVar[bool] = True

  def example_shape(self, args: argparse.Namespace) -> tuple[int, ...]:
    return (args.frames, args.crop, args.crop)

  def config(self, model: str, args: argparse.Namespace) -> ml_collections.ConfigDict:
    return step_config(model, args.batch, args.dtype)

  def data(self, config: ml_collections.ConfigDict,
           args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    batch = video_batch(config.batch_size, args.frames, args.crop)
    return batch, batch

  def start(self, state: train.State) -> train.State:
    return state

  def torch_step(self, job: Any) -> Callable[[], dict[str, float]]:
    import torch

    from benchmarks.torch_video_resnet import VideoResNet

    net = VideoResNet(self.arch, 50, 400, self.nonlocal_blocks).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)
    x = torch.from_numpy(job["inputs"]).permute(0, 4, 1, 2, 3).contiguous()  # (B, 3, T, H, W)
    y = torch.from_numpy(job["label"]).long()

    def step() -> dict[str, float]:
      optimizer.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(net(x), y)
      loss.backward()
      optimizer.step()
      return {"loss": loss.item()}

    return step


def detection_batch(config: ml_collections.ConfigDict,
                    seed: int = 0) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
  """A training batch as the detection modality emits it, for S x S images (S = ``pad_size``).

  Every image fills the whole S x S (``image_size`` = ``original_size`` = (S, S),
  no padding) with random pixels, normalised as the modality does, and has
  :data:`OBJECTS_PER_IMAGE` objects: random boxes 1/8 to 1/2 of S a side, random
  non-background labels, the ellipse inscribed in each box as its mask (as
  'masks', or as 'mask_patches' made by the modality's own
  :func:`~nonlocal_jax.preprocessing.detection.mask_patches` when the config
  sets ``mask_patch_size``), and keypoints uniform in the box, 2/3 visible
  (v = 2), the rest (0, 0, 0) as the modality leaves invisible ones after a
  flip. The targets' names, shapes and dtypes are the modality's
  ``label_spec(config.input, train=True)``, padded to ``max_objects``.

  Returns ({'inputs', 'label', 'mask'}, the images as RGB in [0, 1]
  (B, S, S, 3), what torchvision normalises itself, and the objects'
  full-resolution masks (B, N, S, S) uint8, None without masks).
  """
  settings, size = config.input, config.batch_size
  height, width = settings.pad_size
  rng = np.random.default_rng(seed)
  spec = modalities.get(config.modality).label_spec(settings, True)
  label = {name: np.zeros((size, *shape), dtype) for name, (shape, dtype) in spec.items()}
  unknown = set(label) - {"image_size", "original_size", "image_id", "boxes", "labels", "valid",
                          "is_crowd", "masks", "mask_patches", "keypoints"}
  if unknown:
    raise ValueError(f"the detection modality emits targets {sorted(unknown)} this synthetic "
                     "batch does not fill")
  count = OBJECTS_PER_IMAGE
  label["image_size"][:] = label["original_size"][:] = (height, width)
  label["image_id"][:] = np.arange(size)
  sides = rng.uniform(1 / 8, 1 / 2, (size, count, 2)) * (width, height)
  corners = rng.uniform(0, 1, (size, count, 2)) * ((width, height) - sides)
  boxes = np.concatenate([corners, corners + sides], axis=-1).astype(np.float32)
  label["boxes"][:, :count] = boxes
  label["labels"][:, :count] = rng.integers(1, config.num_classes, (size, count))
  label["valid"][:, :count] = True
  masks = None
  if settings.masks:  # (x - cx)^2 / rx^2 + (y - cy)^2 / ry^2 <= 1 at the pixel centres
    centre, radius = (boxes[..., :2] + boxes[..., 2:]) / 2, (boxes[..., 2:] - boxes[..., :2]) / 2
    x = (np.arange(width) + 0.5 - centre[..., 0, None]) / radius[..., 0, None]
    y = (np.arange(height) + 0.5 - centre[..., 1, None]) / radius[..., 1, None]
    masks = (x[..., None, :] ** 2 + y[..., :, None] ** 2 <= 1).astype(np.uint8)
  if "masks" in label:
    label["masks"][:, :count] = masks
  if "mask_patches" in label:
    label["mask_patches"][:, :count] = [
        detection.mask_patches(image_masks, image_boxes, (height, width),
                               label["mask_patches"].shape[-1])
        for image_masks, image_boxes in zip(masks, boxes)]
  if "keypoints" in label:
    num_keypoints = label["keypoints"].shape[2]
    where = rng.uniform(0, 1, (size, count, num_keypoints, 2))
    points = boxes[..., None, :2] + where * (boxes[..., None, 2:] - boxes[..., None, :2])
    visible = rng.uniform(0, 1, (size, count, num_keypoints, 1)) < 2 / 3
    keypoints = np.concatenate([points, np.full_like(points[..., :1], 2)], axis=-1)
    label["keypoints"][:, :count] = np.where(visible, keypoints, 0)
  pixels = rng.integers(0, 256, (size, height, width, 3), dtype=np.uint8)
  inputs = np.stack([detection.normalize(image, settings) for image in pixels])
  batch = {"inputs": inputs, "label": label, "mask": np.ones((size,), np.bool_)}
  return batch, pixels.astype(np.float32) / np.float32(255), masks


@dataclasses.dataclass(frozen=True)
class Detector:
  """``configs/coco.py``'s `variant` on --image_size squares; `torchvision`: its reference."""
  variant: str  # a COCO variant of configs/coco.py
  torchvision: str | None  # the torchvision.models.detection class, None: no counterpart
  unit: ClassVar[str] = "images"
  same_computation: ClassVar[bool] = False

  def example_shape(self, args: argparse.Namespace) -> tuple[int, ...]:
    return (args.image_size, args.image_size)

  def config(self, model: str, args: argparse.Namespace) -> ml_collections.ConfigDict:
    config = coco.get_config(self.variant)
    size = args.image_size
    config.input.update(train_min_sizes=(size,), max_size=size, test_min_size=size,
                        pad_size=(size, size))
    config.batch_size = config.eval_batch_size = args.batch
    config.compute_dtype = args.dtype
    return config

  def data(self, config: ml_collections.ConfigDict,
           args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Our batch; torchvision's (3, S, S) images in [0, 1] and each image's real objects only."""
    del args  # the sizes are in the config
    batch, pixels, masks = detection_batch(config)
    if self.torchvision is None:
      return batch, None
    label, targets = batch["label"], []
    for i, valid in enumerate(label["valid"]):
      target = {"boxes": label["boxes"][i, valid], "labels": label["labels"][i, valid].astype(
          np.int64)}
      if masks is not None:
        target["masks"] = masks[i]
      if "keypoints" in label:
        target["keypoints"] = label["keypoints"][i, valid]
      targets.append(target)
    heads = {"num_keypoints": config.input.num_keypoints} if config.input.num_keypoints else {}
    images = list(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))  # (3, S, S) each
    return batch, {"images": images, "targets": targets,
                   "size": config.input.max_size, "num_classes": config.num_classes,
                   "heads": heads, "momentum": config.momentum,
                   "weight_decay": config.weight_decay, "learning_rate": config.learning_rate}

  def start(self, state: train.State) -> train.State:
    """`state` with every backbone bottleneck's last norm scale at 0 (its branch silent).

    With the norms frozen at identity, a randomly initialised ResNet-50 grows its
    activations block after block (at 256 pixels, batch 1, the second step's total
    loss was 3e6 ours and 2e13 torchvision's), and torchvision's proposals, hence its
    work, degenerate. Zero-initialised residual branches (Goyal et al., "Accurate,
    Large Minibatch SGD", 2017; torchvision's ``zero_init_residual``) keep both sides
    sane; the step's computation is unchanged.
    """
    def silence(path, value):
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      return jnp.zeros_like(value) if _RESIDUAL_SCALE.search(name) else value
    return jax.tree_util.tree_map_with_path(silence, state)

  def torch_step(self, job: Any) -> Callable[[], dict[str, float]]:
    """torchvision's step; also how many RoIs per image its mask / keypoint head saw."""
    import torch
    import torchvision.models.detection
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    # maskrcnn_resnet50_fpn / keypointrcnn_resnet50_fpn given a backbone checkpoint, minus the
    # checkpoint (see the module docstring): frozen BN, stem and res2 frozen; the residual
    # branches start at zero as ours (Detector.start).
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d,
                                              zero_init_residual=True), 3)
    net = getattr(torchvision.models.detection, self.torchvision)(
        backbone, num_classes=job["num_classes"], min_size=job["size"], max_size=job["size"],
        **job["heads"]).train()
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad],
                                lr=job["learning_rate"], momentum=job["momentum"],
                                weight_decay=job["weight_decay"])
    images = [torch.from_numpy(image) for image in job["images"]]
    targets = [{k: torch.from_numpy(v) for k, v in target.items()} for target in job["targets"]]
    # RoIHeads pools features for its mask / keypoint head from the positive RoIs only.
    head_rois = {}
    pool = net.roi_heads.mask_roi_pool or net.roi_heads.keypoint_roi_pool
    pool.register_forward_hook(lambda module, inputs, output: head_rois.update(n=len(output)))

    def step() -> dict[str, float]:
      optimizer.zero_grad(set_to_none=True)
      loss = sum(net(images, targets).values())
      loss.backward()
      optimizer.step()
      return {"loss": loss.item(), "head_rois_per_image": head_rois["n"] / len(images)}

    return step


_NO_NL = ((), (), (), ())
_NL5 = NONLOCAL_PLACEMENTS[50]["nl5"]
MODELS: dict[str, Benchmark] = {  # registry name: its benchmark
    "c2d_r50": VideoClassifier("c2d", _NO_NL),
    "i3d_r50": VideoClassifier("i3d", _NO_NL),
    "c2d_nl5_r50": VideoClassifier("c2d", _NL5),
    "i3d_nl5_r50": VideoClassifier("i3d", _NL5),
    **{coco.COCO_RUNS[variant]: Detector(variant, torchvision) for variant, torchvision in (
        ("maskrcnn_r50", "MaskRCNN"), ("maskrcnn_r50_nl1", None),
        ("keypointrcnn_r50", "KeypointRCNN"), ("keypointrcnn_r50_nl5", None))},
}
DEFAULT_MODELS = ("c2d_r50", "i3d_r50", "c2d_nl5_r50", "i3d_nl5_r50")


def compile_jax_step(benchmark: Benchmark, config: ml_collections.ConfigDict,
                     batch: dict[str, Any]):
  """Compiles our step once; returns a timer (repeats -> (examples/s, loss)) and its cost.

  The timer can be called once per round: the donated state is carried over.
  """
  step, state, batch_data = jitted_step_on(config, batch, benchmark.start)
  compiled = step.lower(state, batch_data).compile()
  memory = compiled.memory_analysis()
  holder = {"state": state}

  def run():  # the state is donated: keep the newest one
    holder["state"], holder["metrics"] = compiled(holder["state"], batch_data)
    jax.block_until_ready(holder["state"])

  def per_second(repeats: int) -> tuple[float, float]:
    rate = config.batch_size / median_seconds(run, repeats)
    return rate, float(holder["metrics"].compute()["loss"])

  peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
  return per_second, {"peak_bytes": int(peak), "step_flops": compiled.cost_analysis()["flops"]}


def torch_throughput(benchmark: Benchmark, job: Any, batch: int, repeats: int) -> dict:
  """PyTorch's rate (examples/s), peak RSS, and its last step's loss and diagnostics.

  Run it in a fresh process (:func:`~benchmarks.timing.in_fresh_process`).
  """
  import torch

  torch.set_num_threads(os.cpu_count())
  step = benchmark.torch_step(job)
  holder = {}

  def run():
    holder.update(step())

  seconds = median_seconds(run, repeats)
  # Run in a fresh process (in_fresh_process): its peak RSS is PyTorch's whole footprint.
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {"per_s": batch / seconds, "peak_rss_bytes": peak_rss, **holder}


def _cell(value: float | None, width: int, digits: int) -> str:
  return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS), choices=list(MODELS))
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--frames", type=int, default=8, help="video clips' frames")
  parser.add_argument("--crop", type=int, default=112, help="video clips' side")
  parser.add_argument("--image_size", type=int, default=512,
                      help="detectors' image side (a multiple of 32): shorter and longer side "
                      "and padding")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=1,
                      help="alternate ours and PyTorch this many times per model and keep "
                      "each side's fastest round (a shared machine's slow phases then hit both)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="our compute dtype (parameters stay float32)")
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--json")
  host_malloc.add_argument(parser)
  args = parser.parse_args(argv)
  if args.rounds < 1 or args.repeats < 1:
    parser.error(f"--rounds and --repeats must be >= 1; got {args.rounds} and {args.repeats}")
  if args.image_size < 32 or args.image_size % 32:  # torchvision pads to multiples of 32
    parser.error(f"--image_size must be a positive multiple of 32; got {args.image_size}")
  allocator = host_malloc.apply(args.host_malloc)
  sizes = {}  # unit -> one example's shape, for the header
  for model in args.models:
    sizes.setdefault(MODELS[model].unit, MODELS[model].example_shape(args))
  print(f"# train step, batch {args.batch}, "
        + ", ".join(f"{unit} {'x'.join(map(str, shape))}" for unit, shape in sizes.items())
        + f", {os.cpu_count()} cores, jax {jax.__version__}, ours in {args.dtype}, "
        f"host malloc {allocator}")
  print(f"{'model':24} {'unit':>6} {'jax /s':>8} {'torch /s':>9} {'ratio':>6} "
        f"{'jax peak MB':>12} {'torch RSS MB':>13} {'GFLOP/step':>11} {'jax GFLOP/s':>12} "
        f"{'torch GFLOP/s':>14}")
  rows = []
  for model in args.models:
    benchmark = MODELS[model]
    config = benchmark.config(model, args)
    batch, job = benchmark.data(config, args)
    jax_per_s, cost = compile_jax_step(benchmark, config, batch)
    ours_rounds, theirs_rounds = [], []
    for _ in range(args.rounds):
      ours_rounds.append(jax_per_s(args.repeats))
      if job is not None and not args.no_torch:
        theirs_rounds.append(in_fresh_process(torch_throughput, benchmark, job, args.batch,
                                              args.repeats, host_malloc=args.host_malloc))
    per_s = f"{benchmark.unit}_per_s"
    best, loss = max(ours_rounds)
    ours = {per_s: best, **cost, "loss": loss,
            "gflops_per_s": cost["step_flops"] * best / args.batch / 1e9}
    theirs = ratio = torch_gflops = None
    if theirs_rounds:
      fastest = max(theirs_rounds, key=lambda r: r["per_s"])
      theirs = {per_s if k == "per_s" else k: v for k, v in fastest.items()}
      ratio = best / fastest["per_s"]
      if benchmark.same_computation:  # XLA's FLOP count of our step measures both rates
        torch_gflops = cost["step_flops"] * fastest["per_s"] / args.batch / 1e9
    rows.append({"model": model, "unit": benchmark.unit,
                 "shape": (args.batch, *benchmark.example_shape(args)), "dtype": args.dtype,
                 "host_malloc": allocator, "jax": ours, "torch": theirs, "ratio": ratio,
                 f"rounds_{per_s}": {"jax": [r for r, _ in ours_rounds],
                                     "torch": [r["per_s"] for r in theirs_rounds]}})
    print(f"{model:24} {benchmark.unit:>6} {best:8.2f} "
          f"{_cell(theirs and theirs[per_s], 9, 2)} {_cell(ratio, 6, 2)} "
          f"{ours['peak_bytes'] / 2**20:12.0f} "
          f"{_cell(theirs and theirs['peak_rss_bytes'] / 2**20, 13, 0)} "
          f"{ours['step_flops'] / 1e9:11.1f} {ours['gflops_per_s']:12.1f} "
          f"{_cell(torch_gflops, 14, 1)}")
    diagnostics = {k: v for k, v in (theirs or {}).items()
                   if k not in (per_s, "peak_rss_bytes", "loss")}
    if diagnostics:
      print("  torch: " + ", ".join(f"{k} {v:.1f}" for k, v in diagnostics.items()))
    for side, result in (("jax", ours), ("torch", theirs)):
      if result is not None and not math.isfinite(result["loss"]):
        print(f"  warning: {model}'s {side} loss is {result['loss']} after the timed steps; a "
              "diverged step may do less work than a sane one (torchvision drops non-finite "
              "proposals)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
