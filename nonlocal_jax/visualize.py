"""Draw what the non-local blocks attend to (the paper's Figure 3), for classifiers and detectors.

    python -m nonlocal_jax.visualize --workdir workdirs/default --output attention.png
    python -m nonlocal_jax.visualize --config configs/kinetics.py:i3d_nl5_r50_8x8 \
        --weights /ckpt/i3d_nl5_r50 --input clip.mp4 --query 3,100,120 --output attention.png
    python -m nonlocal_jax.visualize --config configs/coco.py:figures --weights CKPT \
        --input photo.jpg --output det.png

Classifiers (video, image and segmentation models): for each query position
(t, y, x in input pixels) and each chosen non-local block, the frames of the
clip are drawn side by side with the query (red x) and its ``--top_k`` most
attended keys: the pixels each key cell covers (yellow boxes in every frame
the cell spans, opacity by weight, arrows from the query). Keys are cells of
the block's subsampled feature map, so one box can span several frames and
many pixels. ``--input`` is a video file (mp4, avi, ... decoded with PyAV),
an image file, or ``dataset:N`` for example N of the config's evaluation
split (default). Without ``--query`` the most salient positions are used:
those whose input differs most from their frame's mean colour.

Detectors (``config.modality='detection'``, Mask / Keypoint R-CNN): the
detections scoring at least ``--score_threshold`` and the attention of every
non-local block, with ``--query y,x`` in image pixels; see
:mod:`nonlocal_jax.visualize_detection`.

Each modality is one entry of :data:`FIGURES`: how its input is read, which
model method runs on it and how the figure is drawn. The attention weights are
captured the same way for all (:func:`captured_attention`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from flax import nnx  # noqa: E402
from matplotlib.patches import ConnectionPatch  # noqa: E402
from PIL import Image  # noqa: E402

from nonlocal_jax import checkpoints, config_validation, input_pipeline, train  # noqa: E402
from nonlocal_jax import visualize_detection  # noqa: E402
from nonlocal_jax.data import video_decode  # noqa: E402
from nonlocal_jax.models import eval_mode  # noqa: E402
from nonlocal_jax.nonlocal_block import NonLocalBlock  # noqa: E402
from nonlocal_jax.preprocessing import image as image_ops  # noqa: E402
from nonlocal_jax.preprocessing import modalities  # noqa: E402
from nonlocal_jax.preprocessing import video as video_ops  # noqa: E402

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


@dataclasses.dataclass(frozen=True)
class Options:
  """What to draw (the command line's flags); each figure reads the fields that apply to it.

  Attributes:
    queries: query positions in the input's pixels: (t, y, x) for classifiers,
      (y, x) in the image for detectors; empty: chosen automatically.
    blocks: paths of the non-local blocks to draw; empty: all.
    top_k: attended key cells drawn per query (classifiers).
    num_queries: automatic queries (classifiers).
    score_threshold: detections scoring at least this are drawn (detectors).
  """

  queries: tuple[tuple[int, ...], ...] = ()
  blocks: tuple[str, ...] = ()
  top_k: int = 20
  num_queries: int = 2
  score_threshold: float = 0.5

  def __post_init__(self):
    if not 0 <= self.score_threshold <= 1:
      raise ValueError(f"--score_threshold={self.score_threshold} is outside [0, 1]: the "
                       "detections scoring at least this are drawn (default 0.5)")


@dataclasses.dataclass(frozen=True)
class Figure:
  """How :func:`visualize` reads, runs and draws the models of one modality.

  ``from_example`` and ``from_file`` return ``(model inputs, display, pixels)``:
  the arguments of the model's `method` (numpy, batch of one), what `draw`
  draws the input as, and {query axis: size} of the pixels ``--query`` is given
  in (e.g. {'t': 8, 'y': 32, 'x': 32}).
  """

  # (stored example of the config's evaluation split, config) -> (inputs, display, pixels).
  from_example: Callable[[dict, ml_collections.ConfigDict], tuple[tuple, Any, dict[str, int]]]
  # (path of an existing file, config) -> (inputs, display, pixels); ValueError for other files.
  from_file: Callable[[str, ml_collections.ConfigDict], tuple[tuple, Any, dict[str, int]]]
  # (display, the method's outputs as numpy, {block path: attention weights}, options) -> figure.
  draw: Callable[[Any, Any, dict[str, np.ndarray], Options], plt.Figure]
  # The model method run on the inputs.
  method: str = "__call__"
  # True: a model without non-local blocks is an error (there is nothing else to draw).
  needs_attention: bool = True


def has_nonlocal_blocks(model: nnx.Module) -> bool:
  """Whether any submodule of `model` is a NonLocalBlock."""
  return any(isinstance(m, NonLocalBlock) for _, m in nnx.iter_graph(model))


def captured_attention(model: nnx.Module, method: str,
                       *inputs: jax.Array | np.ndarray) -> tuple[Any, dict[str, np.ndarray]]:
  """Runs ``model.<method>(*inputs)`` in eval mode, jitted, capturing every block's attention.

  Each NonLocalBlock sows its weights when viewed with ``capture_attention=True``
  (``nnx.view``); ``nnx.capture`` collects them from a function whose first
  argument is the module, here one calling `method` ('__call__', or a
  detector's 'detect'), so any method's intermediates are captured.

  Returns:
    (the method's outputs as numpy, {block path: weights (B, *query grid,
    *key grid)}); no entries for a model without non-local blocks.
  """
  view = nnx.view(eval_mode(model), capture_attention=True, raise_if_not_found=False)
  run = nnx.jit(nnx.capture(lambda module, *args: getattr(module, method)(*args),
                            nnx.Intermediate))
  outputs, intermediates = run(view, *inputs)
  maps = {".".join(str(p) for p in path[:-1]): np.asarray(value.get_value()[0])
          for path, value in nnx.to_flat_state(intermediates) if path[-1] == "attention_weights"}
  return jax.tree.map(np.asarray, outputs), maps


def _no_blocks_error(model: nnx.Module) -> ValueError:
  return ValueError(f"{type(model).__name__} has no non-local blocks, so there is no attention "
                    "to draw; use a model with non-local blocks (e.g. c2d_nl_tiny, "
                    "i3d_nl5_r50, or set config.model.kwargs.nonlocal_blocks)")


def attention_maps(model: nnx.Module, inputs: jnp.ndarray) -> dict[str, np.ndarray]:
  """{block path: weights (B, *query grid, *key grid)} of every non-local block, eval mode."""
  if not has_nonlocal_blocks(model):
    raise _no_blocks_error(model)
  _, maps = captured_attention(model, "__call__", inputs)
  if not maps:
    raise ValueError("the model has no non-local block with spacetime attention to draw")
  return maps


def select_blocks(maps: dict[str, np.ndarray], blocks: Sequence[str]) -> dict[str, np.ndarray]:
  """The maps of `blocks` (all without); ValueError naming unknown blocks and the model's."""
  if not blocks:
    return maps
  unknown = sorted(set(blocks) - set(maps))
  if unknown:
    raise ValueError(f"--block {unknown} not found; the model's blocks are {sorted(maps)}")
  return {name: maps[name] for name in blocks}


def check_queries(queries: Sequence[Sequence[int]], pixels: dict[str, int]) -> None:
  """ValueError naming a query outside `pixels` ({axis: size}) and what ``--query`` accepts."""
  for query in queries:
    if len(query) != len(pixels) or not all(0 <= q < n for q, n in zip(query, pixels.values())):
      bounds = ", ".join(f"0 <= {axis} < {size}" for axis, size in pixels.items())
      raise ValueError(f"query {tuple(query)} is outside the input: --query takes "
                       f"{','.join(pixels)} with {bounds}")


def _classifier_input(inputs: np.ndarray, config: ml_collections.ConfigDict
                      ) -> tuple[tuple[np.ndarray], np.ndarray, dict[str, int]]:
  """One view's inputs -> ((inputs (1, ...) float32,), frames (T, H, W, 3) uint8, pixels)."""
  frames = modalities.get(config.modality).to_display(inputs, config.input)
  return (inputs[None].astype(np.float32),), frames, dict(zip("tyx", frames.shape[:3]))


def _classifier_example(example: dict, config: ml_collections.ConfigDict):
  """A stored example as the evaluation sees it (its first view)."""
  inputs = input_pipeline.preprocess_fn(config, train=False)(example)["inputs"]
  if input_pipeline.num_eval_views(config) > 1:
    inputs = inputs[0]
  return _classifier_input(inputs, config)


def _classifier_file(source: str, config: ml_collections.ConfigDict):
  """A video file (video models) or an image file (image models), as evaluated."""
  modality = config.modality
  ext = os.path.splitext(source)[1].lower()
  if ext in VIDEO_EXTENSIONS and modality == "video":
    num_frames, fps = video_decode.probe(source)
    length = config.input.num_frames or num_frames
    indices = video_ops.clip_indices(num_frames, length, config.input.frame_stride, 0)
    frames = video_decode.decode_frames(source, indices, fps)
    inputs = video_ops.eval_views({"video": frames}, config.input)[0]  # the first view
  elif ext in IMAGE_EXTENSIONS and modality == "image":
    inputs = image_ops.eval_image(np.asarray(Image.open(source).convert("RGB")), config.input)
  else:
    raise ValueError(f"--input {source!r}: expected a {modality} file "
                     f"({VIDEO_EXTENSIONS if modality == 'video' else IMAGE_EXTENSIONS}) "
                     "or dataset:N")
  return _classifier_input(inputs, config)


def load_input(source: str, config: ml_collections.ConfigDict) -> tuple[tuple, Any, dict[str, int]]:
  """(model inputs, display, pixels) of `source` ('dataset:N' or a file), see :class:`Figure`."""
  figure = FIGURES[config.modality]
  if source.startswith("dataset"):
    index = int(source.partition(":")[2] or 0)
    builder = input_pipeline.get_builder(config)
    return figure.from_example(input_pipeline.data_source(builder, config.eval_split)[index],
                               config)
  if not os.path.exists(source):
    raise FileNotFoundError(f"--input {source!r} does not exist")
  return figure.from_file(source, config)


def salient_queries(frames: np.ndarray, count: int) -> list[tuple[int, int, int]]:
  """`count` (t, y, x) pixels that differ most from their frame's mean colour, spread apart."""
  pixels = frames.astype(np.float32)
  saliency = np.linalg.norm(pixels - pixels.mean(axis=(1, 2), keepdims=True), axis=-1)
  queries = []
  radius = max(frames.shape[1], frames.shape[2]) // 8
  for _ in range(count):
    t, y, x = np.unravel_index(np.argmax(saliency), saliency.shape)
    queries.append((int(t), int(y), int(x)))
    saliency[:, max(y - radius, 0):y + radius + 1, max(x - radius, 0):x + radius + 1] = -1
    saliency[t] = -1  # one query per frame at most
  return queries


def _cell(position: Sequence[int], pixels: Sequence[int], grid: Sequence[int]) -> tuple[int, ...]:
  """Grid cell containing a pixel position (each axis scaled by grid / pixels)."""
  return tuple(min(int(p * g / n), g - 1) for p, n, g in zip(position, pixels, grid))


def _extent(cell: Sequence[int], pixels: Sequence[int], grid: Sequence[int]) -> list[tuple]:
  """Pixel range [start, stop) covered by a grid cell along each axis."""
  return [(c * n / g, (c + 1) * n / g) for c, n, g in zip(cell, pixels, grid)]


def top_keys(weights: np.ndarray, query: Sequence[int], pixels: Sequence[int], top_k: int):
  """[(pixel extent per axis of the key cell, weight)] of the `top_k` strongest keys of a query.

  weights: one example's (*query grid, *key grid) map (video: 3 + 3 axes);
  query and pixels are (t, y, x) positions / sizes in input pixels.
  """
  ndim = weights.ndim // 2
  query_grid, key_grid = weights.shape[:ndim], weights.shape[ndim:]
  row = weights[_cell(query, pixels, query_grid)]
  order = np.argsort(row, axis=None)[::-1][:top_k]
  return [(_extent(np.unravel_index(i, key_grid), pixels, key_grid), float(row.flat[i]))
          for i in order]


def attention_figure(frames: np.ndarray, maps: dict[str, np.ndarray],
                     queries: Sequence[Sequence[int]], top_k: int = 20) -> plt.Figure:
  """One row per (block, query): the frames with the query and its most attended keys."""
  if frames.ndim == 3:
    frames = frames[None]
  num_frames = frames.shape[0]
  pixels = frames.shape[:3]
  rows = [(name, q) for name in maps for q in queries]
  fig, axes = plt.subplots(len(rows), num_frames, squeeze=False,
                           figsize=(1.6 * num_frames + 0.5, 1.8 * len(rows) + 0.3))
  for r, (name, query) in enumerate(rows):
    weights = maps[name][0]
    if weights.ndim == 4:  # image block: add the time axes
      weights = weights[None, :, :, None]
    for t in range(num_frames):
      ax = axes[r, t]
      ax.imshow(frames[t], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(f"t={t}", fontsize=8)
    axes[r, 0].set_ylabel(f"{name}\nquery {tuple(query)}", fontsize=6)
    qt, qy, qx = query
    axes[r, qt].plot(qx, qy, "rx", markersize=9, markeredgewidth=2)
    keys = top_keys(weights, query, pixels, top_k)
    strongest = keys[0][1] or 1.0
    for ((t0, t1), (y0, y1), (x0, x1)), w in keys:
      alpha = max(w / strongest, 0.05)
      frames_covered = range(int(t0), max(int(np.ceil(t1)), int(t0) + 1))
      for t in frames_covered:  # the key cell spans these frames (temporal pooling)
        axes[r, t].add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0,
                                           edgecolor="yellow", facecolor="none", alpha=alpha,
                                           linewidth=1.5))
      target = axes[r, frames_covered[0]]
      fig.add_artist(ConnectionPatch((qx, qy), ((x0 + x1) / 2, (y0 + y1) / 2), "data", "data",
                                     axesA=axes[r, qt], axesB=target, color="yellow",
                                     alpha=0.6 * alpha, arrowstyle="->", linewidth=0.8))
  fig.suptitle(f"query (red x) and its {top_k} most attended key cells (yellow, opacity = "
               "weight) in each non-local block",
               fontsize=9)
  fig.tight_layout()
  return fig


def save(fig: plt.Figure, output: str) -> None:
  """Writes `fig` to the PNG `output` (its folder made if needed) and closes it."""
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  fig.savefig(output, dpi=110)
  plt.close(fig)


def draw(frames: np.ndarray, maps: dict[str, np.ndarray], queries: Sequence[Sequence[int]],
         output: str, top_k: int = 20) -> None:
  """Writes :func:`attention_figure` to the PNG `output`."""
  save(attention_figure(frames, maps, queries, top_k), output)


def _classifier_figure(frames: np.ndarray, outputs: Any, maps: dict[str, np.ndarray],
                       options: Options) -> plt.Figure:
  """:func:`attention_figure` of the queries, or of the most salient pixels without."""
  del outputs  # the class scores are not drawn
  queries = list(options.queries) or salient_queries(frames, options.num_queries)
  return attention_figure(frames, maps, queries, options.top_k)


_CLASSIFIER = Figure(from_example=_classifier_example, from_file=_classifier_file,
                     draw=_classifier_figure)
# config.modality -> its figure (every modality of nonlocal_jax.preprocessing.modalities).
FIGURES: dict[str, Figure] = {
    "video": _CLASSIFIER,
    "image": _CLASSIFIER,
    "segmentation": _CLASSIFIER,
    "detection": Figure(from_example=visualize_detection.from_example,
                        from_file=visualize_detection.from_file,
                        draw=visualize_detection.draw_figure, method="detect",
                        needs_attention=False),
}


def visualize(config: ml_collections.ConfigDict, weights: str, output: str, *,
              source: str = "dataset:0", queries: Sequence[Sequence[int]] | None = None,
              blocks: Sequence[str] | None = None, top_k: int = 20, num_queries: int = 2,
              score_threshold: float = 0.5) -> dict[str, np.ndarray]:
  """Builds the model, loads `weights` (workdir or weights checkpoint) and draws `output`.

  See :class:`Options` for the arguments after `source`. Returns the drawn
  blocks' attention weights {block path: (B, *query grid, *key grid)}.
  """
  options = Options(queries=tuple(tuple(q) for q in queries or ()), blocks=tuple(blocks or ()),
                    top_k=top_k, num_queries=num_queries, score_threshold=score_threshold)
  config_validation.validate_config(config)  # every field, before any weight is read
  if not config.num_classes:  # own class folders: the classes found there
    features = input_pipeline.create_builder(config).info.features
    config = config_validation.resolve_num_classes(config, features)
  figure = FIGURES[config.modality]
  model = train.build_model(config, nnx.Rngs(0))
  checkpoints.restore_weights(model, weights)
  if not has_nonlocal_blocks(model):
    if figure.needs_attention:
      raise _no_blocks_error(model)
    logging.info("%s has no non-local blocks: there is no attention to draw, only its outputs",
                 type(model).__name__)
  inputs, display, pixels = load_input(source, config)
  check_queries(options.queries, pixels)
  outputs, maps = captured_attention(model, figure.method, *inputs)
  maps = select_blocks(maps, options.blocks)
  save(figure.draw(display, outputs, maps, options), output)
  return maps


def main(argv) -> None:
  del argv
  queries = [tuple(int(v) for v in q.split(",")) for q in FLAGS.query] if FLAGS.query else None
  visualize(FLAGS.config, FLAGS.weights or FLAGS.workdir, FLAGS.output, source=FLAGS.input,
            queries=queries, blocks=FLAGS.block, top_k=FLAGS.top_k,
            score_threshold=FLAGS.score_threshold)
  print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  FLAGS = flags.FLAGS
  _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config_flags.DEFINE_config_file("config", os.path.join(_ROOT, "configs", "default.py"),
                                  "Config the model was trained with.", lock_config=False)
  flags.DEFINE_string("workdir", "workdirs/default", "Training workdir to read weights from.")
  flags.DEFINE_string("weights", None, "A weights checkpoint instead of --workdir.")
  flags.DEFINE_string("input", "dataset:0", "Video / image file, or dataset:N.")
  flags.DEFINE_multi_string("query", None, "t,y,x in input pixels (detectors: y,x in image "
                            "pixels; repeatable); default: auto.")
  flags.DEFINE_multi_string("block", None, "Non-local block path (repeatable); default: all.")
  flags.DEFINE_integer("top_k", 20, "Attended positions drawn per query.")
  flags.DEFINE_float("score_threshold", 0.5, "Detectors: draw the detections scoring at least "
                     "this, in [0, 1].")
  flags.DEFINE_string("output", "attention.png", "PNG to write.")
  app.run(main)
