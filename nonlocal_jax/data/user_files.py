"""Base of our TFDS builders that read files a user downloaded (``config.manual_dir``).

:class:`UserFilesBuilder` keeps the books on unreadable files: by default the
build fails at the end of the first split that has any, naming every one;
with ``skip_bad_files=True`` (``config.skip_bad_files``) they are left out,
counted per split and listed in the log at the end of the build.

:class:`ClassFolderBuilder` is the base of the own-data builders over
``<root_dir>/<split>/<class name>/<file>``: only the folders named
:data:`SPLIT_FOLDERS` become splits (any other folder is ignored with a
warning naming it), every class folder must hold at least one file, and the
class folders of val / test must be classes of train.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import tensorflow_datasets as tfds
from absl import logging

# Folder names of a class-folder root that become splits (a split is named after its folder).
SPLIT_FOLDERS = ("train", "val", "validation", "test")
# At most this many names in an error message; the rest are counted.
_MAX_NAMED = 10


class BadFileError(ValueError):
  """Files that cannot be read; the message names them and how to skip them."""


class UnreadableFileError(ValueError):
  """Raised by a builder's file reader: the file's content is not what it should be."""


def name_some(items: Sequence[str], limit: int = _MAX_NAMED) -> str:
  """'a, b, c' for up to `limit` items, then 'and N more'."""
  shown = ", ".join(items[:limit])
  return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


class UserFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder over the files in `root_dir`, read once while preparing into the data dir.

  Args:
    root_dir: the folder of the downloaded files (``config.manual_dir``).
    skip_bad_files: leave unreadable files out (counted per split and listed
      in the log at the end of the build) instead of failing the build.
      Builders that do not check their files accept and ignore it.
    **kwargs: passed to ``tfds.core.GeneratorBasedBuilder`` (data_dir, config, ...).
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "Unreadable files named (or skipped with skip_bad_files); only "
                            "train/val/test folders are splits; video frame counts stored."}

  def __init__(self, *, root_dir: str | None = None, skip_bad_files: bool = False, **kwargs):
    self.root_dir = os.path.expanduser(root_dir) if root_dir else None
    self.skip_bad_files = bool(skip_bad_files)
    # {split: [(path, reason)]} of the files left out (skip_bad_files) by the last build.
    self.bad_files: dict[str, list[tuple[str, str]]] = {}
    super().__init__(**kwargs)

  def _root(self) -> str:
    """`root_dir`, which must exist; a clear error names what to set otherwise."""
    if not self.root_dir or not os.path.isdir(self.root_dir):
      raise FileNotFoundError(f"{self.name} files not found at {self.root_dir!r}: set "
                              "config.manual_dir to the folder of the downloaded files; see "
                              "the README's data layout")
    return self.root_dir

  def _bad_file(self, split: str, path: str, error: Exception) -> None:
    """Notes an unreadable file of `split` (reported by :meth:`_end_split`)."""
    reason = str(error) or type(error).__name__
    self.bad_files.setdefault(split, []).append((path, reason))

  def _end_split(self, split: str, num_examples: int) -> None:
    """After a split's last example: fails naming its bad files, or logs those skipped.

    Also fails when nothing at all could be read (TFDS would only say that no
    example was yielded).
    """
    bad = self.bad_files.get(split, [])
    if bad and not self.skip_bad_files:
      listed = "\n".join(f"  {path}: {reason}" for path, reason in bad[:_MAX_NAMED])
      more = f"\n  ... and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
      raise BadFileError(
          f"{self.name} split {split!r}: {len(bad)} unreadable file(s):\n{listed}{more}\n"
          "Fix or remove them, or set config.skip_bad_files=True to leave them out (they are "
          "listed in the log at the end of the build).")
    if bad:
      logging.warning("%s split %r: skipped %d unreadable file(s) (skip_bad_files), %d "
                      "examples kept: %s", self.name, split, len(bad), num_examples,
                      name_some([path for path, _ in bad]))
    if not num_examples:
      why = (f"all {len(bad)} of its file(s) are unreadable: "
             f"{name_some([path for path, _ in bad])}" if bad
             else "no file of it was found (see the log)")
      raise BadFileError(f"{self.name} split {split!r} has no example: {why}")

  def download_and_prepare(self, *args, **kwargs) -> None:
    """Prepares the data set, then lists every skipped unreadable file in the log."""
    self.bad_files = {}
    super().download_and_prepare(*args, **kwargs)
    if self.bad_files:
      counts = ", ".join(f"{split}: {len(bad)}" for split, bad in self.bad_files.items())
      listed = "\n".join(f"  {path}: {reason}" for bad in self.bad_files.values()
                         for path, reason in bad)
      logging.warning("%s: %d unreadable file(s) skipped (config.skip_bad_files=True) - %s:\n%s",
                      self.name, sum(len(b) for b in self.bad_files.values()), counts, listed)


def _visible(name: str) -> bool:
  """False for hidden entries (``.DS_Store``, ``._x.jpg``, ``.ipynb_checkpoints``): not data."""
  return not name.startswith(".")


def _files(folder: str, recursive: bool) -> list[str]:
  """Every visible file in `folder` (and below it when `recursive`), sorted."""
  if not recursive:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if _visible(n) and os.path.isfile(os.path.join(folder, n)))
  found = []
  for directory, dirs, names in os.walk(folder):
    dirs[:] = [d for d in dirs if _visible(d)]
    found.extend(os.path.join(directory, n) for n in names if _visible(n))
  return sorted(found)


def _has_extension(path: str, extensions: Sequence[str]) -> bool:
  return os.path.splitext(path)[1].lower() in extensions


def scan_class_folders(root: str, extensions: Sequence[str], *, recursive: bool = False,
                       what: str = "data") -> dict[str, dict[str, list[str]]]:
  """{split: {class name: sorted file paths}} of ``<root>/<split>/<class name>/<file>``.

  Only folders named in :data:`SPLIT_FOLDERS` are splits (others are ignored
  with a warning); files are those ending in one of `extensions` (lower
  case), directly in the class folder or, when `recursive`, anywhere below
  it. Hidden files and folders are ignored.

  Raises:
    FileNotFoundError: `root` is missing or has no split folder.
    ValueError: a split without class folders, `what` files directly in a
      split folder, an empty class folder, or a class folder of val / test
      that train does not have; each names the folders.
  """
  layout = (f"{root}/<split>/<class name>/<file> with <split> one of "
            f"{', '.join(SPLIT_FOLDERS)}")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"class-folder root {root!r} does not exist; expected {layout}")
  folders = sorted(d for d in os.listdir(root)
                   if _visible(d) and os.path.isdir(os.path.join(root, d)))
  splits = [d for d in folders if d in SPLIT_FOLDERS]
  ignored = [d for d in folders if d not in SPLIT_FOLDERS]
  if not splits:
    raise FileNotFoundError(f"no split folder in {root!r} (its folders: "
                            f"{name_some(ignored) or 'none'}); expected {layout}")
  for folder in ignored:
    logging.warning("ignoring folder %r in %r: only folders named %s become splits", folder,
                    root, "/".join(SPLIT_FOLDERS))

  found: dict[str, dict[str, list[str]]] = {}
  empty, others = [], []
  for split in splits:
    split_dir = os.path.join(root, split)
    loose = [p for p in _files(split_dir, recursive=False) if _has_extension(p, extensions)]
    if loose:
      raise ValueError(f"{len(loose)} {what} file(s) directly in the split folder {split_dir!r} "
                       f"({name_some(loose)}): put each in its class folder; expected {layout}")
    classes = sorted(d for d in os.listdir(split_dir)
                     if _visible(d) and os.path.isdir(os.path.join(split_dir, d)))
    if not classes:
      raise ValueError(f"split folder {split_dir!r} has no class folder; expected {layout}")
    found[split] = {}
    for name in classes:
      class_dir = os.path.join(split_dir, name)
      paths = _files(class_dir, recursive)
      found[split][name] = [p for p in paths if _has_extension(p, extensions)]
      others.extend(p for p in paths if not _has_extension(p, extensions))
      if not found[split][name]:
        empty.append(class_dir)
  if empty:
    where = "in or below it" if recursive else "directly in it"
    raise ValueError(f"empty class folder(s) {name_some(empty)}: each class folder needs at least "
                     f"one {what} file ({', '.join(extensions)}) {where}; remove the folder or add "
                     "files (an empty class would be a label without examples)")
  if others:
    logging.warning("ignoring %d file(s) in the class folders of %r that do not end in %s: %s",
                    len(others), root, "/".join(extensions), name_some(others))

  if "train" in found:
    train = set(found["train"])
    extra = [os.path.join(root, split, name) for split, classes in found.items()
             for name in classes if name not in train]
    if extra:
      raise ValueError(f"class folder(s) {name_some(extra)} have no counterpart in "
                       f"{os.path.join(root, 'train')!r} (its classes: "
                       f"{name_some(sorted(train))}); "
                       "the labels are the class folders of train, so every class of "
                       f"{'/'.join(s for s in SPLIT_FOLDERS if s != 'train')} must be one of them")
    for split, classes in found.items():
      missing = sorted(train - set(classes))
      if missing:
        logging.warning("split %r of %r has no folder for the train class(es) %s", split, root,
                        name_some(missing))
  return found


def class_names(layout: Mapping[str, Mapping[str, Sequence[str]]]) -> list[str]:
  """The label names of a :func:`scan_class_folders` layout: train's classes (else all), sorted."""
  if "train" in layout:
    return sorted(layout["train"])
  return sorted({name for classes in layout.values() for name in classes})


class ClassFolderBuilder(UserFilesBuilder, skip_registration=True):
  """Own files in class folders, ``<root_dir>/<split>/<class name>/<file>`` (see the module doc).

  Subclasses set EXTENSIONS, RECURSIVE and WHAT, and define :meth:`_read`
  (path -> the example's file features, raising UnreadableFileError for
  content that is not what it should be) and :meth:`_example_id`.
  """

  EXTENSIONS: tuple[str, ...] = ()
  RECURSIVE = False  # files anywhere below a class folder, not only directly in it
  WHAT = "data"  # what the files are, for messages

  def _layout(self) -> dict[str, dict[str, list[str]]]:
    """The scanned folders (once per builder)."""
    if not hasattr(self, "_scanned"):
      self._scanned = scan_class_folders(self._root(), self.EXTENSIONS, recursive=self.RECURSIVE,
                                         what=self.WHAT)
    return self._scanned

  def _class_label(self) -> tfds.features.ClassLabel:
    """ClassLabel over the class folders (a placeholder without `root_dir`)."""
    if not self.root_dir:
      return tfds.features.ClassLabel(num_classes=1)
    return tfds.features.ClassLabel(names=class_names(self._layout()))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._layout()}

  def _read(self, path: str) -> dict:
    """The features read from the file at `path` (all but label and id)."""
    raise NotImplementedError

  def _example_id(self, label: str, relative: str) -> tuple[str, dict]:
    """(unique key, {id feature: value}) of the file at `relative` below class folder `label`."""
    raise NotImplementedError

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    split_dir = os.path.join(self._root(), split)
    count, emptied = 0, []
    for label, paths in self._layout()[split].items():
      class_dir = os.path.join(split_dir, label)
      kept = 0
      for path in paths:
        try:
          features = self._read(path)
        except (UnreadableFileError, OSError) as e:
          self._bad_file(split, path, e)
          continue
        key, ids = self._example_id(label, os.path.relpath(path, class_dir))
        kept += 1
        count += 1
        yield key, {**features, **ids, "label": label}
      if not kept:
        emptied.append(class_dir)
    self._end_split(split, count)
    if emptied:
      raise BadFileError(f"{self.name} split {split!r}: no readable {self.WHAT} file in the class "
                         f"folder(s) {name_some(emptied)} (all skipped as unreadable); remove the "
                         "folder(s) or add readable files")
