"""Detection builders: COCO-format files read as pycocotools reads them, synthetic sets as drawn.

A tiny COCO 2017 folder (a few JPEGs, instances and person_keypoints JSON
with polygons, a multi-polygon object, crowd RLE, an image without
annotations and category ids with gaps) is written to a temporary folder,
built as ArrayRecord and read back with ``tfds.data_source``; every object is
compared with pycocotools' COCO API on the same JSON. The synthetic sets are
checked against what their masks say (tight boxes, visibility, occlusion).
"""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from nonlocal_jax.data import shapes_detection
from nonlocal_jax.data.coco_detection import CocoDetection
from nonlocal_jax.data.detection_features import (DetectionMetadata, decode_masks,
                                                  flip_permutation, objects_as_arrays)
from nonlocal_jax.data.shapes_detection import ShapesDetection
from nonlocal_jax.data.user_files import BadFileError

# COCO's person keypoints and 1-indexed skeleton (Detectron utils/keypoints.py, the JSON's
# person category).
COCO_KEYPOINTS = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                  "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                  "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]
COCO_SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7],
                 [6, 8], [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6],
                 [5, 7]]
# Listed out of id order, with gaps, as COCO's ids have them.
CATEGORIES = [{"id": 90, "name": "toothbrush", "supercategory": "indoor"},
              {"id": 1, "name": "person", "supercategory": "person"},
              {"id": 3, "name": "car", "supercategory": "vehicle"}]
# (split folder, image id, height, width, PIL mode)
IMAGES = [("train2017", 1, 40, 56, "RGB"), ("train2017", 2, 32, 24, "RGB"),
          ("train2017", 3, 24, 40, "RGB"), ("val2017", 10, 36, 36, "RGB"),
          ("val2017", 11, 30, 20, "L"), ("val2017", 12, 20, 30, "CMYK")]


def file_name(image_id):
  return f"{image_id:012d}.jpg"


def uncompressed_rle(mask):
  """COCO's uncompressed RLE of an (H, W) 0/1 mask: column-major run lengths, zeros first."""
  flat = mask.flatten(order="F")
  changes = np.flatnonzero(np.diff(flat)) + 1
  runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
  return {"counts": ([0] if flat[0] else []) + runs, "size": list(mask.shape)}


def crowd_mask(height, width):
  mask = np.zeros((height, width), np.uint8)
  mask[2:12, 30:50] = 1
  mask[20:38, 44:54] = 1
  return mask


def annotation(ann_id, image_id, category_id, segmentation, bbox, area, iscrowd=0, **extra):
  return {"id": ann_id, "image_id": image_id, "category_id": category_id,
          "segmentation": segmentation, "bbox": bbox, "area": area, "iscrowd": iscrowd, **extra}


def instances_annotations():
  """{folder: annotations}: polygons, a multi-polygon, crowd / compressed RLE, a 2-point polygon."""
  rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((6, 9), np.uint8), ((3, 15), (20, 11)))))
  return {
      "train2017": [
          annotation(101, 1, 3, [[5.5, 5, 30, 6.5, 28, 25, 6, 22]], [5.5, 5.0, 24.5, 20.0], 409.75),
          annotation(102, 1, 1, [[30, 10, 50, 10, 50, 30], [10, 28, 20, 28, 20, 38, 10, 38]],
                     [10.0, 10.0, 40.0, 28.0], 300.0),
          annotation(103, 1, 90, uncompressed_rle(crowd_mask(40, 56)), [30.0, 2.0, 24.0, 36.0],
                     380.0, iscrowd=1),
          annotation(104, 3, 90, {"counts": rle["counts"].decode(), "size": [24, 40]},
                     [20.0, 3.0, 9.0, 6.0], 54.0),
          annotation(105, 3, 3, [[4, 4, 10, 10]], [4.0, 4.0, 6.0, 6.0], 0.0),
      ],
      "val2017": [
          annotation(201, 10, 1, [[2, 2, 20, 3, 18, 30, 3, 25]], [2.0, 2.0, 18.0, 28.0], 470.0),
          annotation(202, 10, 3, [[15, 15, 34, 15, 34, 34, 15, 34]], [15.0, 15.0, 19.0, 19.0],
                     361.0),
          annotation(203, 11, 90, [[1, 1, 18, 1, 18, 28]], [1.0, 1.0, 17.0, 27.0], 229.5),
          annotation(204, 12, 1, [[3, 3, 25, 4, 12, 17]], [3.0, 3.0, 22.0, 14.0], 140.0),
      ],
  }


def keypoints(*labelled):
  """COCO's flat 51 numbers: (index, x, y, v) for the labelled ones, zeros elsewhere."""
  values = np.zeros((17, 3))
  for index, x, y, v in labelled:
    values[index] = (x, y, v)
  return values.flatten().tolist()


def keypoint_annotations():
  return {
      "train2017": [
          annotation(301, 1, 1, [[30, 10, 50, 10, 50, 30]], [30.0, 10.0, 20.0, 20.0], 200.0,
                     keypoints=keypoints((0, 40, 12, 2), (5, 35, 20, 1), (16, 49, 29, 2)),
                     num_keypoints=3),
          annotation(302, 1, 1, uncompressed_rle(crowd_mask(40, 56)), [30.0, 2.0, 24.0, 36.0],
                     380.0, iscrowd=1, keypoints=keypoints(), num_keypoints=0),
      ],
      "val2017": [
          annotation(401, 10, 1, [[2, 2, 20, 3, 18, 30, 3, 25]], [2.0, 2.0, 18.0, 28.0], 470.0,
                     keypoints=keypoints((1, 10, 5, 2), (2, 6, 5, 2), (12, 9, 27, 1)),
                     num_keypoints=3),
      ],
  }


def write_json(path, content):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(content, f)


def write_coco(root):
  """A COCO 2017 folder of IMAGES with both annotation files; returns the root."""
  rng = np.random.default_rng(0)
  images = {"train2017": [], "val2017": []}
  for folder, image_id, height, width, mode in IMAGES:
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    pixels = rng.integers(0, 255, (height, width, 3), np.uint8)
    if mode == "CMYK":  # smooth: it is re-encoded, and JPEG keeps smooth colours
      columns, rows = np.meshgrid(np.arange(width) * 8, np.arange(height) * 12)
      pixels = np.stack([columns, rows, np.full_like(rows, 128)], -1).astype(np.uint8)
    picture = Image.fromarray(pixels)
    picture = picture.convert("L") if mode == "L" else picture.convert(mode)
    picture.save(os.path.join(root, folder, file_name(image_id)), format="JPEG")
    images[folder].append({"id": image_id, "file_name": file_name(image_id), "height": height,
                           "width": width, "license": 1})
  person = {**CATEGORIES[1], "keypoints": COCO_KEYPOINTS, "skeleton": COCO_SKELETON}
  for prefix, annotations, categories in (("instances", instances_annotations(), CATEGORIES),
                                          ("person_keypoints", keypoint_annotations(), [person])):
    for folder in ("train2017", "val2017"):
      write_json(os.path.join(root, "annotations", f"{prefix}_{folder}.json"),
                 {"info": {}, "licenses": [], "images": images[folder],
                  "annotations": annotations[folder], "categories": categories})
  return root


def json_path(root, config, folder):
  return os.path.join(root, "annotations", f"{config}_{folder}.json")


def build_coco(root, data_dir, config="instances", **kwargs):
  builder = CocoDetection(config=config, root_dir=str(root), data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(file_format="array_record")
  return builder


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
  """(root, data_dir) with both configs built from the tiny COCO folder."""
  root = write_coco(str(tmp_path_factory.mktemp("coco")))
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for config in ("instances", "person_keypoints"):
    build_coco(root, data_dir, config)
  return root, data_dir


def by_image_id(source):
  return {int(source[i]["image_id"]): source[i] for i in range(len(source))}


@pytest.mark.parametrize("config", ["instances", "person_keypoints"])
def test_coco_objects_match_pycocotools(coco, config):
  root, data_dir = coco
  sources = tfds.data_source(f"coco_detection/{config}", data_dir=data_dir)
  metadata = DetectionMetadata.from_info(tfds.builder(f"coco_detection/{config}",
                                                      data_dir=data_dir).info)
  compared = 0
  for split, folder in (("train", "train2017"), ("validation", "val2017")):
    reference = COCO(json_path(root, config, folder))
    examples = by_image_id(sources[split])
    assert sorted(examples) == sorted(reference.getImgIds())  # every image, annotated or not
    category_ids = sorted(reference.getCatIds())
    assert list(metadata.category_ids) == category_ids
    assert list(metadata.class_names) == [c["name"] for c in reference.loadCats(category_ids)]
    for image_id, example in examples.items():
      info = reference.loadImgs(image_id)[0]
      anns = reference.loadAnns(reference.getAnnIds(imgIds=image_id, iscrowd=None))
      objects = objects_as_arrays(example["objects"], metadata.num_keypoints)
      assert example["image"].shape == (info["height"], info["width"], 3)
      assert len(objects["label"]) == len(anns)
      np.testing.assert_array_equal(objects["bbox"], np.asarray(
          [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
          np.float32).reshape(-1, 4))
      np.testing.assert_array_equal(objects["category_id"], [a["category_id"] for a in anns])
      np.testing.assert_array_equal(objects["label"],
                                    [category_ids.index(a["category_id"]) for a in anns])
      np.testing.assert_array_equal(objects["is_crowd"], [a["iscrowd"] == 1 for a in anns])
      np.testing.assert_array_equal(objects["area"], np.float32([a["area"] for a in anns]))
      masks = decode_masks(objects["mask"], info["height"], info["width"])
      assert masks.shape == (len(anns), info["height"], info["width"])
      for mask, ann in zip(masks, anns):
        expected = np.zeros_like(mask) if ann["id"] == 105 else reference.annToMask(ann)
        np.testing.assert_array_equal(mask, expected, err_msg=f"annotation {ann['id']}")
        compared += 1
      if metadata.num_keypoints:
        np.testing.assert_array_equal(objects["keypoints"], np.float32(
            [a["keypoints"] for a in anns]).reshape(-1, 17, 3))
  assert compared == {"instances": 9, "person_keypoints": 3}[config]


def test_coco_masks_are_what_they_should_be(coco):
  """Independent of annToMask: the crowd RLE round-trips, a 2-point polygon has no area."""
  root, data_dir = coco
  examples = by_image_id(tfds.data_source("coco_detection/instances", data_dir=data_dir)["train"])
  first = objects_as_arrays(examples[1]["objects"])
  masks = decode_masks(first["mask"], 40, 56)
  np.testing.assert_array_equal(masks[2], crowd_mask(40, 56))
  assert masks[1][11:14, 40:48].all() and masks[1][29:37, 11:19].all()  # both polygons
  assert not masks[1][20:26, 11:19].any()  # between them
  third = objects_as_arrays(examples[3]["objects"])
  masks = decode_masks(third["mask"], 24, 40)
  assert masks[0].sum() == 54 and masks[0][3:9, 20:29].all()
  assert masks[1].sum() == 0  # annotation 105: its only polygon has 2 points


def test_coco_image_without_annotations_has_zero_objects(coco):
  _, data_dir = coco
  example = by_image_id(tfds.data_source("coco_detection/instances",
                                         data_dir=data_dir)["train"])[2]
  objects = objects_as_arrays(example["objects"])
  assert example["image"].shape == (32, 24, 3)
  assert objects["bbox"].shape == (0, 4) and objects["label"].shape == (0,)
  assert objects["mask"].shape == (0,)
  assert decode_masks(objects["mask"], 32, 24).shape == (0, 32, 24)
  keypoint_example = by_image_id(tfds.data_source("coco_detection/person_keypoints",
                                                  data_dir=data_dir)["train"])[3]
  assert objects_as_arrays(keypoint_example["objects"], 17)["keypoints"].shape == (0, 17, 3)


def test_coco_images_are_the_files_pixels(coco):
  root, data_dir = coco
  examples = by_image_id(tfds.data_source("coco_detection/instances",
                                          data_dir=data_dir)["validation"])
  for folder, image_id, height, width, mode in IMAGES:
    if folder != "val2017":
      continue
    expected = np.asarray(Image.open(os.path.join(root, folder, file_name(image_id)))
                          .convert("RGB"), np.float32)
    difference = np.abs(examples[image_id]["image"].astype(np.float32) - expected)
    if mode == "CMYK":  # stored again as an RGB JPEG
      assert difference.mean() < 3
    else:  # the file's own bytes (grey decoded to three equal channels)
      assert difference.max() == 0


def test_coco_metadata_names_keypoints_flip_and_annotation_files(coco):
  root, data_dir = coco
  builder = tfds.builder("coco_detection/person_keypoints", data_dir=data_dir)
  metadata = DetectionMetadata.from_info(builder.info)
  assert list(metadata.keypoint_names) == COCO_KEYPOINTS
  assert [list(edge) for edge in metadata.skeleton] == [[a - 1, b - 1] for a, b in COCO_SKELETON]
  flip = metadata.keypoint_flip
  assert [flip[k] for k in flip] == list(range(17))
  for k, name in enumerate(COCO_KEYPOINTS):
    mirror = name.replace("left_", "right_") if "left_" in name else name.replace("right_", "left_")
    assert COCO_KEYPOINTS[flip[k]] == mirror
  assert metadata.annotation_files == {
      "train": os.path.abspath(json_path(root, "person_keypoints", "train2017")),
      "validation": os.path.abspath(json_path(root, "person_keypoints", "val2017"))}
  assert builder.info.features["objects"]["label"].names == ["person"]
  built = CocoDetection(config="instances", root_dir=root, data_dir=data_dir)
  assert os.path.abspath(json_path(root, "instances", "val2017")) in built.info.description


def test_coco_missing_folder_or_annotation_file_is_named_with_the_layout(tmp_path):
  root = write_coco(str(tmp_path / "coco"))
  shutil.rmtree(os.path.join(root, "val2017"))
  with pytest.raises(FileNotFoundError, match=r"val2017' not found; expected COCO 2017 .*"
                     r"annotations/instances_\{train,val\}2017\.json"):
    build_coco(root, tmp_path / "tfds")
  os.remove(json_path(root, "person_keypoints", "val2017"))
  with pytest.raises(FileNotFoundError, match=r"person_keypoints_val2017\.json' not found"):
    CocoDetection(config="person_keypoints", root_dir=root, data_dir=str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError, match=r"nowhere' not found; expected COCO 2017"):
    CocoDetection(root_dir=str(tmp_path / "nowhere"), data_dir=str(tmp_path / "tfds"))


def test_coco_missing_image_is_named_or_skipped(tmp_path):
  root = write_coco(str(tmp_path / "coco"))
  missing = os.path.join(root, "val2017", file_name(10))
  os.remove(missing)
  with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .*instances_val2017\.json "
                     r"are missing .*000000000010\.jpg \(image 10 of instances_val2017\.json, "
                     r"2 annotation\(s\)\).*skip_bad_files=True"):
    build_coco(root, tmp_path / "strict")
  builder = build_coco(root, tmp_path / "skip", skip_bad_files=True)
  assert builder.info.splits["validation"].num_examples == 2
  assert [path for path, _ in builder.bad_files["validation"]] == [missing]


def test_coco_annotation_of_an_unlisted_image_or_category_is_named(tmp_path):
  root = write_coco(str(tmp_path / "coco"))
  path = json_path(root, "instances", "train2017")
  with open(path) as f:
    content = json.load(f)
  content["annotations"][0]["image_id"] = 77
  write_json(path, content)
  with pytest.raises(ValueError, match=r"instances_train2017\.json: 1 annotation\(s\) refer to an "
                     r"image the file does not list.*annotation 101 \(image_id 77\)"):
    build_coco(root, tmp_path / "tfds")
  content["annotations"][0]["image_id"] = 1
  content["annotations"][1]["category_id"] = 2
  write_json(path, content)
  with pytest.raises(ValueError, match=r"annotation 102 \(image 1\): category_id 2 is not one of "
                     r"the file's categories \[1, 3, 90\]"):
    build_coco(root, tmp_path / "tfds")


def test_coco_bad_box_keypoints_or_image_size_are_named(tmp_path):
  root = write_coco(str(tmp_path / "coco"))
  path = json_path(root, "person_keypoints", "val2017")
  with open(path) as f:
    content = json.load(f)
  good = json.loads(json.dumps(content))
  content["annotations"][0]["keypoints"] = content["annotations"][0]["keypoints"][:48]
  write_json(path, content)
  with pytest.raises(ValueError, match=r"person_keypoints_val2017\.json annotation 401 \(image "
                     r"10\): 'keypoints' should be 51 numbers .* got 48"):
    build_coco(root, tmp_path / "a", "person_keypoints")
  content = json.loads(json.dumps(good))
  content["annotations"][0]["bbox"] = [2.0, 2.0, -1.0, 28.0]
  write_json(path, content)
  with pytest.raises(ValueError, match=r"annotation 401 .*bbox \[2\.0, 2\.0, -1\.0, 28\.0\] is "
                     r"not \[x, y, width, height\]"):
    build_coco(root, tmp_path / "b", "person_keypoints")
  good["images"][0]["width"] = 37
  write_json(path, good)
  with pytest.raises(BadFileError, match=r"(?s)split 'validation'.*val2017/000000000010\.jpg: is "
                     r"36x36 pixels but person_keypoints_val2017\.json gives 37x36"):
    build_coco(root, tmp_path / "c", "person_keypoints")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  """data_dir with shapes_small and figures_small built."""
  data_dir = str(tmp_path_factory.mktemp("synthetic"))
  for config in ("shapes_small", "figures_small"):
    ShapesDetection(config=config, data_dir=data_dir).download_and_prepare(
        file_format="array_record")
  return data_dir


def all_examples(data_dir, config, split):
  source = tfds.data_source(f"shapes_detection/{config}", data_dir=data_dir)[split]
  return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("config", ["shapes_small", "figures_small"])
def test_synthetic_masks_boxes_and_labels_agree(synthetic, config):
  metadata = DetectionMetadata.from_info(
      tfds.builder(f"shapes_detection/{config}", data_dir=synthetic).info)
  examples = all_examples(synthetic, config, "train")
  assert len(examples) == 48
  labels_seen, overlapping, crowded = set(), 0, 0
  for example in examples:
    height, width, _ = example["image"].shape
    assert height in (96, 128) and width in (96, 128)
    objects = objects_as_arrays(example["objects"], metadata.num_keypoints)
    count = len(objects["label"])
    assert 1 <= count <= (4 if config == "shapes_small" else 3)
    masks = decode_masks(objects["mask"], height, width)
    assert (masks.sum(axis=(1, 2)) >= shapes_detection.MIN_VISIBLE_PIXELS).all()
    np.testing.assert_array_equal(objects["area"], masks.sum(axis=(1, 2)))
    assert masks.sum(axis=0).max() <= 1  # what a later object covers is not an earlier one's
    for mask, (x1, y1, x2, y2) in zip(masks, objects["bbox"].astype(int)):
      ys, xs = np.nonzero(mask)
      assert (x1, y1, x2, y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert ((0 <= objects["label"]) & (objects["label"] < len(metadata.class_names))).all()
    np.testing.assert_array_equal(objects["category_id"], objects["label"] + 1)
    assert not objects["is_crowd"].any()
    labels_seen.update(objects["label"].tolist())
    boxes = objects["bbox"]
    if count > 1:
      crowded += 1
      low = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
      high = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
      intersect = np.prod(np.clip(high - low, 0, None), axis=-1) - np.diag(
          np.prod(boxes[:, 2:] - boxes[:, :2], axis=-1))
      overlapping += bool((intersect > 0).any())
  assert labels_seen == set(range(len(metadata.class_names)))
  assert overlapping >= crowded / 2  # objects overlap in most images with several


def test_figures_keypoints_lie_where_their_visibility_says(synthetic):
  metadata = DetectionMetadata.from_info(
      tfds.builder("shapes_detection/figures_small", data_dir=synthetic).info)
  assert metadata.num_keypoints == 7 and metadata.class_names == ("figure",)
  counts = np.zeros(3, int)
  for example in all_examples(synthetic, "figures_small", "train"):
    height, width, _ = example["image"].shape
    objects = objects_as_arrays(example["objects"], 7)
    masks = decode_masks(objects["mask"], height, width)
    union = masks.sum(axis=0) > 0
    for mask, points in zip(masks, objects["keypoints"]):
      for x, y, v in points:
        counts[int(v)] += 1
        if v == 0:
          assert x == 0 and y == 0
          continue
        assert 0 <= x < width and 0 <= y < height
        on_self = mask[int(y), int(x)]
        # Visible: on the figure's own visible mask; occluded: under another figure.
        assert on_self if v == 2 else (not on_self and union[int(y), int(x)])
  assert (counts > 0).all()  # outside, occluded and visible keypoints all occur


def test_figures_flip_permutation_swaps_left_and_right(synthetic):
  metadata = DetectionMetadata.from_info(
      tfds.builder("shapes_detection/figures_small", data_dir=synthetic).info)
  names, flip = metadata.keypoint_names, metadata.keypoint_flip
  assert [flip[k] for k in flip] == list(range(len(names)))
  for k, name in enumerate(names):
    if name.startswith("left_"):
      assert names[flip[k]] == "right_" + name[5:]
    elif name.startswith("right_"):
      assert names[flip[k]] == "left_" + name[6:]
    else:
      assert flip[k] == k
  assert all(0 <= a < len(names) and 0 <= b < len(names) for a, b in metadata.skeleton)


def test_figures_left_is_on_the_image_right(synthetic):
  """The figures face the viewer: their left hand and foot are right of their right ones."""
  left_of = {"left_hand": "right_hand", "left_hip": "right_hip", "left_foot": "right_foot"}
  names = list(shapes_detection.KEYPOINT_NAMES)
  for example in all_examples(synthetic, "figures_small", "validation"):
    for points in objects_as_arrays(example["objects"], 7)["keypoints"]:
      for left, right in left_of.items():
        a, b = points[names.index(left)], points[names.index(right)]
        if a[2] and b[2]:
          assert a[0] > b[0]


def test_synthetic_builds_are_deterministic(synthetic, tmp_path):
  ShapesDetection(config="figures_small", data_dir=str(tmp_path)).download_and_prepare(
      file_format="array_record")
  for split in ("train", "validation"):
    first = all_examples(synthetic, "figures_small", split)
    second = all_examples(str(tmp_path), "figures_small", split)
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
      assert a["image_id"] == b["image_id"]
      np.testing.assert_array_equal(a["image"], b["image"])
      objects_a, objects_b = (objects_as_arrays(x["objects"], 7) for x in (a, b))
      for name in objects_a:
        np.testing.assert_array_equal(objects_a[name], objects_b[name])


def test_both_builders_write_the_same_schema(coco, synthetic):
  _, coco_dir = coco

  def schema(name, data_dir):
    features = tfds.builder(name, data_dir=data_dir).info.features
    objects = {key: (type(f).__name__, f.shape, f.dtype)
               for key, f in features["objects"].feature.items()}
    return {key: type(f).__name__ for key, f in features.items()}, features["image"].shape, objects

  assert schema("coco_detection/instances", coco_dir) == schema("shapes_detection/shapes_small",
                                                                synthetic)
  coco_top, coco_image, coco_objects = schema("coco_detection/person_keypoints", coco_dir)
  top, image, objects = schema("shapes_detection/figures_small", synthetic)
  assert (coco_top, coco_image) == (top, image) == (top, (None, None, 3))
  assert coco_objects.pop("keypoints") == ("Tensor", (17, 3), np.float32)
  assert objects.pop("keypoints") == ("Tensor", (7, 3), np.float32)
  assert coco_objects == objects


def test_helpers_reject_what_they_cannot_use():
  assert flip_permutation(["nose", "left_eye", "right_eye"]) == (0, 2, 1)
  with pytest.raises(ValueError, match=r"'left_paw' has no mirror keypoint 'right_paw'"):
    flip_permutation(["head", "left_paw"])
  with pytest.raises(ValueError, match=r"not a permutation .* its own inverse"):
    DetectionMetadata(class_names=("a",), category_ids=(1,), keypoint_names=("x", "y", "z"),
                      keypoint_flip=(1, 2, 0))
  with pytest.raises(ValueError, match=r"skeleton edges \[\(0, 3\)\]"):
    DetectionMetadata.create(("a",), (1,), ("x", "y", "z"), [(0, 1), (0, 3)])
  with pytest.raises(ValueError, match=r"2 class names but 1 category ids"):
    DetectionMetadata.create(("a", "b"), (1,))
  with pytest.raises(ValueError, match=r"num_keypoints=0"):
    objects_as_arrays({"bbox": [], "label": [], "category_id": [], "is_crowd": [], "area": [],
                       "mask": [], "keypoints": []})


@pytest.mark.slow
def test_full_synthetic_sets_start_with_the_small_ones(synthetic, tmp_path):
  """The full configs (2000 + 300 images each, well under a minute per build) extend the small."""
  for full, small in (("shapes", "shapes_small"), ("figures", "figures_small")):
    builder = ShapesDetection(config=full, data_dir=str(tmp_path))
    builder.download_and_prepare(file_format="array_record")
    assert builder.info.splits["train"].num_examples == 2000
    assert builder.info.splits["validation"].num_examples == 300
    source = tfds.data_source(f"shapes_detection/{full}", data_dir=str(tmp_path))["validation"]
    images = {int(source[i]["image_id"]): source[i]["image"] for i in range(len(source))}
    for example in all_examples(synthetic, small, "validation"):
      np.testing.assert_array_equal(images[int(example["image_id"])], example["image"])
