"""Every experiment config builds its model and its input pipeline.

Our builders read tiny files generated here in the layout users download;
TFDS catalog data sets (imagenet2012, cifar10, ucf101) use
``tfds.testing.mock_data``. Each config's real preprocessing produces one
train and one eval batch, and the model accepts them (checked abstractly
with ``jax.eval_shape``, so ResNet-101s cost no compute).
"""

import csv
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx
from PIL import Image

from nonlocal_jax import config_validation, input_pipeline, train
from nonlocal_jax.data import video_decode
from nonlocal_jax.models import eval_mode, get_spec, list_models
from nonlocal_jax.tasks import create_task

CONFIGS = [
    ("default", ""), ("default", "baseline"),
    ("kinetics", "i3d_nl5_r50_8x8"), ("kinetics", "c2d_nl10_r101_32x2"),
    ("kinetics", "c2d_baseline_r50_8x8"), ("kinetics", "i3d_nl1_r101_8x8"),
    ("kinetics", "i3d_nl5_r50_32x4_affine"),
    ("charades", "i3d_nl5_r101"), ("ucf101", "i3d_nl5_r50"),
    ("imagenet", "resnet50_nl5"), ("cifar10", ""), ("cifar10", "baseline"),
    ("segmentation", "cityscapes_r50_512x1024_40k"), ("segmentation", "cityscapes_r101_769x769_80k"),
    ("segmentation", "ade20k_r50_512x512_80k"), ("segmentation", "voc12aug_r101_512x512_20k"),
    ("image_folder", "resnet50_nl5"), ("video_folder", "i3d_nl5_r50"),
    ("image_folder", "resnet_nl_tiny"), ("video_folder", "c2d_nl_tiny"),
    ("cifar10", "lrnet_tiny"), ("imagenet", "lrnet50"),
    ("coco", "shapes"), ("coco", "figures"),
]
# Generated data sets: the small config of the config's data set.
SMALL_GENERATED = {"long_range_video": lambda name: "long_range_video/small",
                   "shapes_detection": lambda name: f"{name}_small"}


def write_video(path, num_frames=24, size=(40, 56)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  frames = np.random.default_rng(len(path)).integers(0, 255, (num_frames, *size, 3), np.uint8)
  with open(path, "wb") as f:
    f.write(video_decode.encode_video(frames))


def write_image(path, size=(40, 56), label=False, values=(0, 1, 2)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(len(path))
  array = (rng.choice(values, size).astype(np.uint8) if label
           else rng.integers(0, 255, (*size, 3), np.uint8))
  Image.fromarray(array).save(path)


def make_files(dataset: str, root: str) -> None:
  """Two tiny examples per split in the layout of the real download."""
  os.makedirs(root, exist_ok=True)
  if dataset == "kinetics":
    for csv_name, folder in (("train.csv", "train"), ("validate.csv", "val")):
      rows = [("abseiling", f"{folder}A", 0, 10), ("zumba", f"{folder}B", 5, 15)]
      os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
      with open(os.path.join(root, "annotations", csv_name), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
        for label, vid, start, end in rows:
          writer.writerow([label, vid, start, end, folder])
          write_video(os.path.join(root, folder, label, f"{vid}_{start:06d}_{end:06d}.mp4"))
  elif dataset == "charades":
    for split in ("train", "test"):
      with open(os.path.join(root, f"Charades_v1_{split}.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "actions"])
        for i, actions in enumerate(["c000 0.0 3.1;c156 1.0 2.0", ""]):
          writer.writerow([f"{split}{i}", actions])
          write_video(os.path.join(root, "Charades_v1_480", f"{split}{i}.mp4"))
  elif dataset in ("video_class_folder", "image_class_folder"):
    for split in ("train", "test"):
      for label in ("cats", "dogs"):
        if dataset == "video_class_folder":
          write_video(os.path.join(root, split, label, f"{split}.mp4"))
        else:
          write_image(os.path.join(root, split, label, f"{split}.png"))
  elif dataset == "cityscapes19":
    for folder in ("train", "val"):
      for i in range(2):
        write_image(os.path.join(root, "leftImg8bit", folder, "city", f"c_{i}_leftImg8bit.png"))
        write_image(os.path.join(root, "gtFine", folder, "city", f"c_{i}_gtFine_labelIds.png"),
                    label=True, values=(0, 7, 26))
  elif dataset == "ade20k":
    for folder in ("training", "validation"):
      for i in range(2):
        base = os.path.join(root, "ADEChallengeData2016")
        write_image(os.path.join(base, "images", folder, f"a{i}.jpg"))
        write_image(os.path.join(base, "annotations", folder, f"a{i}.png"), label=True,
                    values=(0, 1, 150))
  elif dataset == "voc12_aug":
    base = os.path.join(root, "VOC2012")
    os.makedirs(os.path.join(base, "ImageSets", "Segmentation"))
    for list_name, ids in (("train_aug.txt", ["t0", "t1"]), ("val.txt", ["v0"])):
      with open(os.path.join(base, "ImageSets", "Segmentation", list_name), "w") as f:
        f.write("\n".join(ids) + "\n")
      for i in ids:
        write_image(os.path.join(base, "JPEGImages", f"{i}.jpg"))
        write_image(os.path.join(base, "SegmentationClassAug", f"{i}.png"), label=True,
                    values=(0, 20, 255))
  else:
    raise AssertionError(f"no generator for {dataset}")


def load_config(name, variant):
  module = importlib.import_module(f"configs.{name}")
  return module.get_config(variant) if variant else module.get_config()


def shrink(config):
  """Batch sizes of 2 / 1 so a batch is cheap; everything else as configured."""
  config.batch_size = 2
  config.eval_batch_size = 1
  return config


@pytest.mark.parametrize("name,variant", CONFIGS)
def test_config_builds_model_and_pipeline(name, variant, tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  config = shrink(load_config(name, variant))
  config.data_dir = str(tmp_path / "tfds")
  dataset = config.dataset.split("/")[0]
  if dataset in SMALL_GENERATED:
    config.dataset = SMALL_GENERATED[dataset](config.dataset)
  elif dataset in input_pipeline.LOCAL_BUILDERS:
    config.manual_dir = str(tmp_path / "files")
    make_files(dataset, config.manual_dir)

  def batches():
    builder = input_pipeline.get_builder(config)
    return (next(input_pipeline.train_iterator(builder, config)),
            next(input_pipeline.eval_iterator(builder, config)), builder)

  if dataset in input_pipeline.LOCAL_BUILDERS:
    train_batch, eval_batch, builder = batches()
  else:  # mock_data fakes the records, but neither the 'prepared' marker nor split sizes
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    monkeypatch.setattr(input_pipeline, "num_eval_batches", lambda *args: 1)
    with tfds.testing.mock_data(num_examples=2):
      train_batch, eval_batch, builder = batches()
  if not config.num_classes:
    config.num_classes = builder.info.features["label"].num_classes
    assert config.num_classes == 2  # two class folders

  assert train_batch["inputs"].dtype == np.float32 and np.isfinite(train_batch["inputs"]).all()
  # The shapes the config promises before any data is read (validation, AOT) are the real ones.
  for batch, is_train in ((train_batch, True), (eval_batch, False)):
    spec = input_pipeline.batch_spec(config, builder.info.features, train=is_train)
    assert jax.tree.map(lambda v: v.shape[1:], spec) == jax.tree.map(lambda v: v.shape[1:], batch)
  assert eval_batch["mask"].any()
  # The model takes both batches through its task (abstract evaluation: shapes only).
  config_validation.check_model_takes_inputs(config, builder.info.features)
  if config.task == "detection":
    return
  if config.task == "multilabel":
    assert train_batch["label"].shape == (2, config.num_classes)
  if config.task == "segmentation":
    assert train_batch["inputs"].shape[1:3] == tuple(config.input.crop_size)
    assert train_batch["label"].shape == train_batch["inputs"].shape[:3]
    assert set(np.unique(train_batch["label"])) <= set(range(config.num_classes)) | {255}

  # The model accepts both batches (abstract evaluation: shapes and dtypes only).
  model = nnx.eval_shape(lambda: train.build_model(config, nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  outputs = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                           jax.ShapeDtypeStruct(train_batch["inputs"].shape, jnp.float32))
  logits = outputs[0] if isinstance(outputs, tuple) else outputs
  assert logits.shape[-1] == config.num_classes
  forward = train.eval_forward_fn(config, create_task(config))
  eval_model = eval_mode(model)
  graphdef, state = nnx.split(eval_model)
  outputs = jax.eval_shape(lambda s, x: forward(nnx.merge(graphdef, s), x), state,
                           jax.ShapeDtypeStruct(eval_batch["inputs"].shape, jnp.float32))
  logits = outputs[0] if isinstance(outputs, tuple) else outputs
  assert logits.shape[0] == eval_batch["label"].shape[0]


@pytest.mark.parametrize("name,variant,match", [
    ("kinetics", "i3d_nl7_r50_8x8", "i3d_nl7_r50_8x8"),
    ("kinetics", "i3d_nl5_r50_8x8_frozen", "i3d_nl5_r50_8x8_frozen"),
    ("segmentation", "cityscapes_r50_512x512_40k", "cityscapes_r50_512x512_40k"),
    ("default", "big", "'big'"),
    ("charades", "i3d_nl10_r101", "i3d_nl10_r101"),
])
def test_unknown_variants_raise(name, variant, match):
  with pytest.raises(ValueError, match=match):
    load_config(name, variant)


def test_missing_download_gives_a_clear_error(tmp_path):
  config = shrink(load_config("kinetics", "i3d_nl5_r50_8x8"))
  config.data_dir, config.manual_dir = str(tmp_path / "tfds"), str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="kinetics files not found at .*nothing"):
    input_pipeline.get_builder(config)
  config.dataset, config.data_dir = "imagenet2012", str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="'imagenet2012' is not prepared"):
    input_pipeline.get_builder(config)


def all_variants():
  from configs import coco, kinetics, segmentation
  video = [f"{a}_{p}_{d}_{c}" for a in kinetics.ARCHS for p in kinetics.PLACEMENTS
           for d in kinetics.DEPTHS for c in kinetics.CLIPS]
  segment = [f"{name}_{r}_{crop}_{i}" for name, crops in segmentation.RUNS.items()
             for r in ("r50", "r101") for crop, iters in crops.items() for i in iters]
  return ([("kinetics", v) for v in video] + [("segmentation", v) for v in segment]
          + [("charades", f"{a}_{p}_{d}") for a in ("c2d", "i3d") for p in ("baseline", "nl5")
             for d in ("r50", "r101")]
          + [("ucf101", v[:-4]) for v in video if v.endswith("8x8")]
          + [("video_folder", v[:-4]) for v in video if v.endswith("8x8")]
          + [("imagenet", m) for m in list_models() if m.startswith("resnet")]
          + [("coco", v) for v in (*coco.GENERATED_RUNS, *coco.COCO_RUNS, *coco.RELATION_RUNS)])


def test_every_variant_names_a_registered_model():
  variants = all_variants()
  assert len(variants) == 64 + 16 + 8 + 16 + 16 + 10 + 2 + 10 + 3
  for name, variant in variants:
    config = load_config(name, variant)
    get_spec(config.model.name)  # raises for an unknown model
    assert config.num_train_steps > 0
