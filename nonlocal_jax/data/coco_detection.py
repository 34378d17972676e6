"""COCO 2017 boxes, instance masks and person keypoints, as downloaded, as a TFDS builder.

Layout (``root_dir`` = config.manual_dir), as cocodataset.org ships it
(and Detectron2's ``datasets/builtin.py`` expects it)::

  <root_dir>/annotations/instances_{train,val}2017.json          (config instances)
  <root_dir>/annotations/person_keypoints_{train,val}2017.json   (config person_keypoints)
  <root_dir>/train2017/<file_name>.jpg
  <root_dir>/val2017/<file_name>.jpg

Configs: ``instances`` (the 80 categories: boxes and masks) and
``person_keypoints`` (person: boxes, masks and the 17 keypoints named by the
JSON's person category). Splits: ``train`` (train2017) and ``validation``
(val2017). Examples follow :mod:`nonlocal_jax.data.detection_features`:

* every image the JSON lists is an example, in the JSON's order, also those
  without annotations (zero objects: Detectron and torchvision drop them
  for training only; that is the input pipeline's choice);
* the objects are the image's annotations in the JSON's order, crowd ones
  included (``is_crowd``, their RLE mask as given);
* labels are the categories sorted by id, 0..K-1 (Detectron's
  ``json_category_id_to_contiguous_id``), ``category_id`` keeps COCO's id;
* bbox [x, y, w, h] becomes (x, y, x + w, y + h), not clipped;
* polygons become one compressed RLE with pycocotools, as ``COCO.annToRLE``
  does (``frPyObjects`` + ``merge``), after dropping polygons of fewer than
  3 points (Detectron's ``json_dataset.py`` does the same; pycocotools would
  read a 4-number polygon as a box). An object left without polygons has an
  empty mask.

The class names, keypoint names, skeleton (0-indexed), flip permutation and
the paths of the two JSON files are in ``builder.info.metadata``
(:class:`~nonlocal_jax.data.detection_features.DetectionMetadata`):
evaluation runs pycocotools against the original val2017 JSON. The
categories are read from the val2017 JSON when the builder is made; the
train2017 JSON must have the same.

Every image is decoded once while preparing, as training will: a missing
image fails the build naming it (or is skipped with ``skip_bad_files=True``,
like an unreadable one or one whose size differs from the JSON's). An
annotation of an image or category the JSON does not list, or with a
malformed box, segmentation or keypoints, fails the build naming the
annotation and the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils

from nonlocal_jax.data.detection_features import (METADATA_KEY, DetectionMetadata,
                                                  detection_features, encode_mask)
from nonlocal_jax.data.user_files import UnreadableFileError, UserFilesBuilder, name_some

# Split name -> COCO 2017 image folder (and annotation file suffix).
SPLIT_FOLDERS = {"train": "train2017", "validation": "val2017"}
# The person category's keypoints in person_keypoints_*2017.json (Detectron utils/keypoints.py).
COCO_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle")


class CocoDetectionConfig(tfds.core.BuilderConfig):
  """Which annotation files a config reads, and its sizes before they are read."""

  def __init__(self, *, annotations: str, num_classes: int, num_keypoints: int, **kwargs):
    super().__init__(**kwargs)
    self.annotations = annotations  # file name prefix: <annotations>_{train,val}2017.json
    self.num_classes = num_classes
    self.num_keypoints = num_keypoints


def expected_layout(root: str, annotations: str) -> str:
  """The files a config needs below `root`, for error messages."""
  return (f"expected COCO 2017 as downloaded from cocodataset.org: "
          f"{os.path.join(root, 'annotations', annotations + '_{train,val}2017.json')}, "
          f"{os.path.join(root, 'train2017', '*.jpg')} and "
          f"{os.path.join(root, 'val2017', '*.jpg')}")


def load_json(path: str) -> dict:
  """A COCO annotation file's content; ValueError naming the file if it is not COCO JSON."""
  try:
    with open(path) as f:
      content = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  missing = [k for k in ("images", "annotations", "categories")
             if not isinstance(content, dict) or k not in content]
  if missing:
    raise ValueError(f"{path}: not a COCO annotation file, it has no {', '.join(missing)} "
                     "(COCO's JSON has images, annotations and categories)")
  return content


def categories_metadata(categories: list[dict], path: str, num_keypoints: int,
                        annotation_files: dict[str, str]) -> DetectionMetadata:
  """Class names and ids (sorted by id) and, when `num_keypoints`, the keypoints of a JSON.

  The keypoint names and 1-indexed skeleton come from the categories'
  ``keypoints`` / ``skeleton`` entries, which must be the same for all
  categories. Raises ValueError naming `path` for missing or inconsistent
  entries.
  """
  try:
    ordered = sorted(categories, key=lambda c: int(c["id"]))
    names, ids = [str(c["name"]) for c in ordered], [int(c["id"]) for c in ordered]
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: every category needs an integer 'id' and a 'name' ({e!r})") from e
  if not ordered:
    raise ValueError(f"{path}: no categories")
  if not num_keypoints:
    return DetectionMetadata.create(names, ids, annotation_files=annotation_files)
  keypoint_names = ordered[0].get("keypoints")
  skeleton = ordered[0].get("skeleton", [])
  different = [c["id"] for c in ordered
               if c.get("keypoints") != keypoint_names or c.get("skeleton", []) != skeleton]
  if not keypoint_names or different:
    raise ValueError(f"{path}: a keypoint config needs every category to name the same "
                     f"'keypoints' and 'skeleton' (category ids without or with others: "
                     f"{different or ids})")
  bad = [edge for edge in skeleton if len(edge) != 2
         or not all(isinstance(k, int) and 1 <= k <= len(keypoint_names) for k in edge)]
  if bad:
    raise ValueError(f"{path}: skeleton edges {bad} are not pairs of keypoint numbers 1..."
                     f"{len(keypoint_names)} (COCO's skeleton is 1-indexed)")
  return DetectionMetadata.create(names, ids, keypoint_names,
                                  [(a - 1, b - 1) for a, b in skeleton],
                                  annotation_files=annotation_files)


def box_corners(annotation: dict, where: str) -> list[float]:
  """COCO bbox [x, y, w, h] as (x1, y1, x2, y2); ValueError naming `where` if malformed."""
  box = annotation.get("bbox")
  if (not isinstance(box, list) or len(box) != 4
      or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
      or box[2] < 0 or box[3] < 0):
    raise ValueError(f"{where}: bbox {box!r} is not [x, y, width, height] of 4 finite numbers "
                     "with width, height >= 0")
  x, y, w, h = box
  return [x, y, x + w, y + h]


def area(annotation: dict, where: str) -> float:
  """The annotation's 'area' (COCOeval's area ranges use it); ValueError naming `where` if bad."""
  value = annotation.get("area")
  if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
    raise ValueError(f"{where}: area {value!r} is not a finite number >= 0")
  return float(value)


def mask_counts(annotation: dict, height: int, width: int, where: str) -> bytes:
  """The annotation's full-image mask as COCO compressed RLE counts (as ``COCO.annToRLE``).

  Polygons (a list of [x1, y1, x2, y2, ...]) are rasterised and merged;
  uncompressed RLE ({'counts': [ints], 'size': [h, w]}, COCO's crowd
  annotations) is compressed; compressed RLE is kept as given.
  """
  segmentation = annotation.get("segmentation")
  if isinstance(segmentation, list):
    # Detectron json_dataset.py: "Valid polygons have >= 3 points, so require >= 6 coordinates".
    polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
    if not polygons:
      return encode_mask(np.zeros((height, width), np.uint8))
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))["counts"]
  if isinstance(segmentation, dict) and "counts" in segmentation:
    size = list(segmentation.get("size", []))
    if size != [height, width]:
      raise ValueError(f"{where}: RLE size {size} differs from its image's [height, width] "
                       f"[{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):
      return mask_utils.frPyObjects(segmentation, height, width)["counts"]
    return counts.encode() if isinstance(counts, str) else bytes(counts)
  raise ValueError(f"{where}: segmentation is neither a list of polygons nor RLE "
                   f"{{'counts', 'size'}} (got {type(segmentation).__name__})")


def keypoint_array(annotation: dict, num_keypoints: int, where: str) -> np.ndarray:
  """(num_keypoints, 3) float32 (x, y, v) of COCO's flat keypoints list; ValueError if malformed."""
  values = annotation.get("keypoints")
  if not isinstance(values, list) or len(values) != 3 * num_keypoints:
    length = len(values) if isinstance(values, list) else values
    raise ValueError(f"{where}: 'keypoints' should be {3 * num_keypoints} numbers (x, y, v for "
                     f"each of {num_keypoints} keypoints), got {length!r}")
  keypoints = np.asarray(values, np.float32).reshape(num_keypoints, 3)
  if not np.isin(keypoints[:, 2], (0, 1, 2)).all():
    raise ValueError(f"{where}: keypoint visibility must be 0, 1 or 2, got "
                     f"{sorted(set(keypoints[:, 2].tolist()))}")
  return keypoints


def read_image(path: str, width: int, height: int, listed_in: str) -> str | np.ndarray:
  """`path` itself for an RGB or grey JPEG of the size `listed_in` gives, else its RGB pixels.

  The image is decoded in full (PIL, as ``tfds.data_source`` decodes it) so
  that a corrupt file fails here rather than in training. Others than RGB /
  grey JPEG (CMYK, a PNG named .jpg) are returned as (H, W, 3) uint8 to be
  stored as RGB JPEG. Raises UnreadableFileError.
  """
  try:
    with Image.open(path) as image:
      image.load()
      if image.size != (width, height):
        raise UnreadableFileError(f"is {image.size[0]}x{image.size[1]} pixels but {listed_in} "
                                  f"gives {width}x{height} (width x height)")
      if image.format == "JPEG" and image.mode in ("RGB", "L"):
        return path
      return np.asarray(image.convert("RGB"))
  except OSError as e:
    raise UnreadableFileError(f"not a readable image ({e})") from e


class CocoDetection(UserFilesBuilder):
  """COCO 2017 detection / segmentation / keypoints from its files (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      CocoDetectionConfig(name="instances", annotations="instances", num_classes=80,
                          num_keypoints=0,
                          description="80 categories: boxes and instance masks."),
      CocoDetectionConfig(name="person_keypoints", annotations="person_keypoints",
                          num_classes=1, num_keypoints=17,
                          description="Persons: boxes, instance masks and 17 keypoints."),
  ]

  def _annotation_file(self, split: str) -> str:
    name = f"{self.builder_config.annotations}_{SPLIT_FOLDERS[split]}.json"
    return os.path.join(self.root_dir, "annotations", name)

  def _require(self, *paths: str) -> None:
    """FileNotFoundError naming the missing ones of `paths` and the expected layout."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(f"{self.name}: {' and '.join(map(repr, missing))} not found; "
                              f"{expected_layout(self.root_dir, self.builder_config.annotations)} "
                              "(set config.manual_dir to the folder holding them)")

  def _metadata(self) -> DetectionMetadata:
    """The categories (and keypoints) of the val2017 JSON and both JSON paths (once per builder)."""
    if not hasattr(self, "_categories"):
      files = {split: os.path.abspath(self._annotation_file(split)) for split in SPLIT_FOLDERS}
      self._require(self.root_dir)
      self._require(files["validation"])
      self._categories = categories_metadata(
          load_json(files["validation"])["categories"], files["validation"],
          self.builder_config.num_keypoints, files)
    return self._categories

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    if not self.root_dir:  # placeholders: names and metadata come from the prepared data
      return self.dataset_info_from_configs(
          description=__doc__, metadata=tfds.core.MetadataDict(),
          features=detection_features(None, config.num_keypoints, "jpeg",
                                      num_classes=config.num_classes))
    metadata = self._metadata()
    sources = "\n".join(f"  {split}: {path}" for split, path in metadata.annotation_files.items())
    return self.dataset_info_from_configs(
        description=f"{__doc__}\nBuilt from the annotation files:\n{sources}\n",
        metadata=tfds.core.MetadataDict({METADATA_KEY: metadata.as_dict()}),
        features=detection_features(metadata.class_names, metadata.num_keypoints, "jpeg"))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager
    root = self._root()
    self._require(*(self._annotation_file(split) for split in SPLIT_FOLDERS),
                  *(os.path.join(root, folder) for folder in SPLIT_FOLDERS.values()))
    return {split: self._generate_examples(split) for split in SPLIT_FOLDERS}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    json_path = self._annotation_file(split)
    json_name = os.path.basename(json_path)
    content = load_json(json_path)
    metadata = self._metadata()
    found = categories_metadata(content["categories"], json_path, metadata.num_keypoints, {})
    if (found.class_names, found.category_ids, found.keypoint_names, found.skeleton) != (
        metadata.class_names, metadata.category_ids, metadata.keypoint_names, metadata.skeleton):
      raise ValueError(f"{json_path}: its categories differ from those of "
                       f"{metadata.annotation_files['validation']} (ids "
                       f"{list(found.category_ids)} vs {list(metadata.category_ids)}); both "
                       "splits must share them")
    images = self._images(content["images"], json_path)
    annotations = self._annotations_by_image(content["annotations"], images, json_path)
    label_of = {cat: label for label, cat in enumerate(metadata.category_ids)}

    image_dir = os.path.join(self._root(), SPLIT_FOLDERS[split])
    missing = {}  # {path: which image it is}
    for image in images.values():
      path = os.path.join(image_dir, image["file_name"])
      if not os.path.isfile(path):
        missing[path] = (f"image {image['id']} of {json_name}, "
                         f"{len(annotations.get(image['id'], []))} annotation(s)")
    if missing and not self.skip_bad_files:
      listed = name_some([f"{path} ({which})" for path, which in missing.items()])
      raise FileNotFoundError(
          f"{self.name} split {split!r}: {len(missing)} image(s) listed in {json_path} are missing "
          f"from {image_dir}: {listed}. Download the complete {SPLIT_FOLDERS[split]} images, or "
          "set config.skip_bad_files=True to leave them out")
    for path, which in missing.items():
      self._bad_file(split, path, FileNotFoundError(f"missing ({which})"))

    count = 0
    for image_id, image in images.items():
      path = os.path.join(image_dir, image["file_name"])
      if path in missing:
        continue
      try:
        pixels = read_image(path, image["width"], image["height"], json_name)
      except (UnreadableFileError, OSError) as e:
        self._bad_file(split, path, e)
        continue
      objects = self._objects(annotations.get(image_id, []), image, label_of, json_name)
      count += 1
      yield image_id, {"image": pixels, "image_id": image_id, "objects": objects}
    self._end_split(split, count)

  @staticmethod
  def _images(entries: list[dict], json_path: str) -> dict[int, dict]:
    """{image id: image entry} in the JSON's order; ValueError naming a malformed / repeated one."""
    images = {}
    for entry in entries:
      try:
        image = {"id": int(entry["id"]), "file_name": str(entry["file_name"]),
                 "height": int(entry["height"]), "width": int(entry["width"])}
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{json_path}: image entry {entry!r:.200} needs 'id', 'file_name', "
                         f"'height' and 'width' ({e!r})") from e
      if image["id"] in images:
        raise ValueError(f"{json_path}: image id {image['id']} is listed twice")
      images[image["id"]] = image
    return images

  @staticmethod
  def _annotations_by_image(entries: list[dict], images: dict[int, dict],
                            json_path: str) -> dict[int, list[dict]]:
    """{image id: its annotations in the JSON's order}; ValueError for an unknown image id."""
    by_image: dict[int, list[dict]] = {}
    unknown = []
    for annotation in entries:
      image_id = annotation.get("image_id")
      if image_id not in images:
        unknown.append(f"annotation {annotation.get('id')} (image_id {image_id!r})")
        continue
      by_image.setdefault(image_id, []).append(annotation)
    if unknown:
      raise ValueError(f"{json_path}: {len(unknown)} annotation(s) refer to an image the file "
                       f"does not list in 'images': {name_some(unknown)}")
    return by_image

  def _objects(self, annotations: list[dict], image: dict, label_of: dict[int, int],
               json_name: str) -> dict[str, np.ndarray]:
    """The ``objects`` feature of one image's annotations (see the module docstring)."""
    num_keypoints = self._metadata().num_keypoints
    height, width = image["height"], image["width"]
    boxes, labels, category_ids, crowd, areas, masks, keypoints = [], [], [], [], [], [], []
    for annotation in annotations:
      where = f"{json_name} annotation {annotation.get('id')} (image {image['id']})"
      category_id = annotation.get("category_id")
      if category_id not in label_of:
        raise ValueError(f"{where}: category_id {category_id!r} is not one of the file's "
                         f"categories {sorted(label_of)}")
      is_crowd = annotation.get("iscrowd", 0)
      if is_crowd not in (0, 1):
        raise ValueError(f"{where}: iscrowd must be 0 or 1, got {is_crowd!r}")
      boxes.append(box_corners(annotation, where))
      labels.append(label_of[category_id])
      category_ids.append(category_id)
      crowd.append(bool(is_crowd))
      areas.append(area(annotation, where))
      masks.append(mask_counts(annotation, height, width, where))
      if num_keypoints:
        keypoints.append(keypoint_array(annotation, num_keypoints, where))
    objects = {
        "bbox": np.asarray(boxes, np.float32).reshape(-1, 4),
        "label": np.asarray(labels, np.int64),
        "category_id": np.asarray(category_ids, np.int64),
        "is_crowd": np.asarray(crowd, np.bool_),
        "area": np.asarray(areas, np.float32),
        "mask": masks,
    }
    if num_keypoints:
      objects["keypoints"] = np.asarray(keypoints, np.float32).reshape(-1, num_keypoints, 3)
    return objects
