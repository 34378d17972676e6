"""The feature schema and metadata every detection builder writes (COCO and the synthetic sets).

One example is one image with all its objects::

  {'image': (H, W, 3) uint8 (stored as JPEG for COCO, PNG for generated images),
   'image_id': int64,
   'objects': Sequence of N objects, each
       {'bbox': (4,) float32 absolute pixels (x1, y1, x2, y2),
        'label': int64 in 0..K-1 (ClassLabel, the data set's categories sorted by id),
        'category_id': int64 (the data set's own id: COCO's 1..90 with gaps),
        'is_crowd': bool,
        'area': float32 (as in the annotation: COCO's segment area, in pixels),
        'mask': bytes (the full-image binary mask as COCO compressed RLE counts),
        'keypoints': (num_keypoints, 3) float32 (x, y, v), keypoint data sets only}}

Coordinates are continuous pixel coordinates (pixel (i, j) covers
[j, j + 1) x [i, i + 1)), as COCO's bbox [x, y, w, h] is: a box is
(x, y, x + w, y + h), not clipped to the image. The bbox is a plain float32
Tensor rather than ``tfds.features.BBoxFeature``, which stores
(ymin, xmin, ymax, xmax) normalised to [0, 1] and rejects values outside:
COCO boxes are absolute pixels (evaluation writes them back as such) and a
few reach past the image border. Keypoint visibility v follows COCO: 0 = not
labelled (x = y = 0), 1 = labelled but occluded, 2 = visible. Images without
objects are kept with N = 0 (training may drop them, as Detectron and
torchvision do; evaluation must not).

Read through ``tfds.data_source`` the objects come back as Python lists (an
empty list for N = 0): :func:`objects_as_arrays` makes arrays of fixed
dtypes and shapes of them, :func:`decode_masks` the (N, H, W) masks.

What the examples do not carry (class names, COCO category ids, keypoint
names, skeleton, flip permutation, the annotation files evaluation reads)
is a :class:`DetectionMetadata`, stored in ``builder.info.metadata`` (saved
with the prepared data) and read back by :meth:`DetectionMetadata.from_info`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from pycocotools import mask as mask_utils

# The key of ``builder.info.metadata`` holding :meth:`DetectionMetadata.as_dict`.
METADATA_KEY = "detection"
# dtype and per-object shape of each object feature, as :func:`objects_as_arrays` returns them.
_OBJECT_ARRAYS = {"bbox": (np.float32, (4,)), "label": (np.int64, ()),
                  "category_id": (np.int64, ()), "is_crowd": (np.bool_, ()),
                  "area": (np.float32, ())}


def detection_features(class_names: Sequence[str] | None, num_keypoints: int,
                       image_format: str, num_classes: int | None = None
                       ) -> tfds.features.FeaturesDict:
  """The features of a detection data set (see the module docstring).

  Args:
    class_names: the K class names, label order; None for a placeholder of
      `num_classes` classes (a file builder without its files: the names are
      restored from the prepared data).
    num_keypoints: keypoints per object; 0 leaves the feature out.
    image_format: 'jpeg' or 'png', how the images are stored.
    num_classes: K when `class_names` is None.
  """
  if class_names is None:
    label = tfds.features.ClassLabel(num_classes=num_classes)
  else:
    label = tfds.features.ClassLabel(names=list(class_names))
  objects = {
      "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
      "label": label,
      "category_id": tfds.features.Scalar(dtype=np.int64),
      "is_crowd": tfds.features.Scalar(dtype=np.bool_),
      "area": tfds.features.Scalar(dtype=np.float32),
      "mask": tfds.features.Tensor(shape=(), dtype=np.object_),
  }
  if num_keypoints:
    objects["keypoints"] = tfds.features.Tensor(shape=(num_keypoints, 3), dtype=np.float32)
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
      "image_id": tfds.features.Scalar(dtype=np.int64),
      "objects": tfds.features.Sequence(objects),
  })


def flip_permutation(keypoint_names: Sequence[str]) -> tuple[int, ...]:
  """For each keypoint, the index of its mirror image: ``left_x`` <-> ``right_x``, others fixed.

  A horizontal flip moves keypoint k to ``flip[k]`` (Detectron's
  ``keypoints.get_keypoints`` flip map, torchvision's ``flip_inds``).
  Raises ValueError naming a ``left_*`` / ``right_*`` keypoint without its pair.
  """
  index = {name: i for i, name in enumerate(keypoint_names)}
  flip = []
  for name in keypoint_names:
    side, _, part = name.partition("_")
    if side in ("left", "right") and part:
      mirror = ("right" if side == "left" else "left") + "_" + part
      if mirror not in index:
        raise ValueError(f"keypoint {name!r} has no mirror keypoint {mirror!r} (keypoints: "
                         f"{', '.join(keypoint_names)}); a horizontal flip needs both")
      flip.append(index[mirror])
    else:
      flip.append(index[name])
  return tuple(flip)


@dataclasses.dataclass(frozen=True)
class DetectionMetadata:
  """What a detection data set's examples do not carry.

  Attributes:
    class_names: K names, label order.
    category_ids: (K,) the data set's category id of each label (COCO results
      are written with these).
    keypoint_names: the keypoints in the order of the ``keypoints`` feature
      (empty without keypoints).
    skeleton: edges between keypoints, 0-indexed (COCO's JSON is 1-indexed).
    keypoint_flip: :func:`flip_permutation` of `keypoint_names`.
    annotation_files: {split: path of the COCO-format JSON that split was built
      from} (what pycocotools evaluates against); empty for generated data.
  """

  class_names: tuple[str, ...]
  category_ids: tuple[int, ...]
  keypoint_names: tuple[str, ...] = ()
  skeleton: tuple[tuple[int, int], ...] = ()
  keypoint_flip: tuple[int, ...] = ()
  annotation_files: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if len(self.category_ids) != len(self.class_names):
      raise ValueError(f"{len(self.class_names)} class names but {len(self.category_ids)} "
                       "category ids; one id per class")
    if len(set(self.category_ids)) != len(self.category_ids):
      raise ValueError(f"category ids {list(self.category_ids)} repeat an id")
    num_keypoints = len(self.keypoint_names)
    bad = [edge for edge in self.skeleton if len(edge) != 2
           or not all(0 <= k < num_keypoints for k in edge)]
    if bad:
      raise ValueError(f"skeleton edges {bad} are not pairs of keypoint indices 0..."
                       f"{num_keypoints - 1} ({num_keypoints} keypoints)")
    flip = self.keypoint_flip
    if sorted(flip) != list(range(num_keypoints)) or any(flip[j] != k for k, j in enumerate(flip)):
      raise ValueError(f"keypoint_flip {list(self.keypoint_flip)} is not a permutation of the "
                       f"{num_keypoints} keypoints that is its own inverse")

  @classmethod
  def create(cls, class_names: Sequence[str], category_ids: Sequence[int],
             keypoint_names: Sequence[str] = (), skeleton: Sequence[Sequence[int]] = (),
             annotation_files: Mapping[str, str] | None = None) -> DetectionMetadata:
    """Metadata with the flip permutation derived from the keypoint names (0-indexed skeleton)."""
    return cls(class_names=tuple(class_names), category_ids=tuple(int(i) for i in category_ids),
               keypoint_names=tuple(keypoint_names),
               skeleton=tuple((int(a), int(b)) for a, b in skeleton),
               keypoint_flip=flip_permutation(keypoint_names),
               annotation_files=dict(annotation_files or {}))

  def as_dict(self) -> dict:
    """A JSON-serialisable dict (what ``info.metadata[METADATA_KEY]`` holds)."""
    return {"class_names": list(self.class_names), "category_ids": list(self.category_ids),
            "keypoint_names": list(self.keypoint_names),
            "skeleton": [list(edge) for edge in self.skeleton],
            "keypoint_flip": list(self.keypoint_flip),
            "annotation_files": dict(self.annotation_files)}

  @classmethod
  def from_dict(cls, values: Mapping) -> DetectionMetadata:
    return cls(class_names=tuple(values["class_names"]),
               category_ids=tuple(int(i) for i in values["category_ids"]),
               keypoint_names=tuple(values["keypoint_names"]),
               skeleton=tuple((int(a), int(b)) for a, b in values["skeleton"]),
               keypoint_flip=tuple(int(k) for k in values["keypoint_flip"]),
               annotation_files=dict(values["annotation_files"]))

  @classmethod
  def from_info(cls, info: tfds.core.DatasetInfo) -> DetectionMetadata:
    """The metadata a detection builder stored in `info` (``builder.info``)."""
    try:  # [] rather than .get(): TFDS loads metadata.json lazily, on [] / keys() / items()
      values = info.metadata[METADATA_KEY]
    except (KeyError, TypeError) as e:
      raise ValueError(f"data set {info.full_name!r} has no detection metadata "
                       f"(info.metadata[{METADATA_KEY!r}]): not prepared by a detection builder "
                       "of nonlocal_jax.data") from e
    return cls.from_dict(values)

  @property
  def num_keypoints(self) -> int:
    return len(self.keypoint_names)


def encode_mask(mask: np.ndarray) -> bytes:
  """COCO compressed RLE counts of an (H, W) binary mask (pycocotools ``mask.encode``)."""
  return mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))["counts"]


def decode_masks(rle_list: Sequence[bytes], height: int, width: int) -> np.ndarray:
  """(N, H, W) uint8 0/1 masks of N objects' ``mask`` features (COCO compressed RLE counts)."""
  if not len(rle_list):
    return np.zeros((0, height, width), np.uint8)
  rles = [{"size": [int(height), int(width)], "counts": counts} for counts in rle_list]
  return np.ascontiguousarray(np.moveaxis(mask_utils.decode(rles), -1, 0))


def objects_as_arrays(objects: Mapping[str, Sequence], num_keypoints: int = 0
                      ) -> dict[str, np.ndarray]:
  """An example's ``objects`` as arrays of N objects, also for N = 0.

  ``tfds.data_source`` returns each object feature as a list (``[]`` without
  objects); this gives bbox (N, 4) float32, label, category_id (N,) int64,
  is_crowd (N,) bool, area (N,) float32, mask (N,) object (the RLE bytes, for
  :func:`decode_masks`) and, when the data set has them, keypoints
  (N, num_keypoints, 3) float32.
  """
  arrays = {}
  for name, (dtype, shape) in _OBJECT_ARRAYS.items():
    arrays[name] = np.asarray(objects[name], dtype).reshape(-1, *shape)
  arrays["mask"] = np.empty(len(arrays["label"]), dtype=object)
  arrays["mask"][:] = list(objects["mask"])
  if "keypoints" in objects:
    if num_keypoints < 1:
      raise ValueError(f"the objects have keypoints but num_keypoints={num_keypoints}: pass the "
                       "data set's number (DetectionMetadata.num_keypoints)")
    arrays["keypoints"] = np.asarray(objects["keypoints"], np.float32).reshape(
        -1, num_keypoints, 3)
  return arrays
