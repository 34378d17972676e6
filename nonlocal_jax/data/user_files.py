"""Base of our TFDS builders that read files a user downloaded (``config.manual_dir``)."""

from __future__ import annotations

import os

import tensorflow_datasets as tfds


class UserFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder over the files in `root_dir`, read once while preparing into the data dir."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, root_dir: str | None = None, **kwargs):
    self.root_dir = os.path.expanduser(root_dir) if root_dir else None
    super().__init__(**kwargs)

  def _root(self) -> str:
    """`root_dir`, which must exist; a clear error names what to set otherwise."""
    if not self.root_dir or not os.path.isdir(self.root_dir):
      raise FileNotFoundError(f"{self.name} files not found at {self.root_dir!r}: set "
                              "config.manual_dir to the folder of the downloaded files; see "
                              "the README's data layout")
    return self.root_dir
