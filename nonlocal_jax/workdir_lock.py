"""An exclusive lock on a training workdir: one run writes its checkpoints at a time.

Two runs started into the same workdir would otherwise overwrite each other's
checkpoints (orbax removes a step directory it is told to save again). The
lock is ``fcntl.flock`` on ``<workdir>/run.lock``: the kernel releases it when
the holding process dies, however it dies, so a lock left by a killed run is
never mistaken for a live one. The file records the holder's host, PID and
start time, to name the holder in the refusal and to report a stale lock
left by a process that died.

``flock`` is reliable on local disks; on network file systems that do not
support it the lock may not exclude runs on other hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

from absl import logging

LOCK_FILE = "run.lock"


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


def _read_holder(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _describe(holder: dict) -> str:
  if not holder:
    return "an unknown process"
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
  return f"PID {holder.get('pid')} on host {holder.get('host')!r} (started {started})"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock for the duration of the ``with`` block.

  Raises WorkdirLockedError naming the holder when another live process has
  it. A lock file left by a process that died is reported and taken over.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirLockedError(
          f"workdir {workdir!r} is in use by another run: {_describe(_read_holder(path))}. "
          "Wait for it to finish or stop it, or pass another --workdir.") from None
    previous = _read_holder(path)
    if previous:
      logging.warning("Workdir %s: taking over the lock left by %s, which is no longer running.",
                      workdir, _describe(previous))
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # a clean exit leaves no holder behind
  finally:
    os.close(fd)  # releases the flock
