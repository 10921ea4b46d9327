"""Atomic file writes: a reader sees the old file or the whole new one, never half of either."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Calls `write(tmp_path)` on a temporary file beside `path`, syncs it, then renames it onto `path`.

  The temporary file is removed if anything fails, so an interrupted save leaves no debris.
  """
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
  os.close(fd)
  try:
    write(tmp)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_bytes(path: str, data: bytes) -> None:
  def write(tmp):
    with open(tmp, "wb") as f:
      f.write(data)
  atomic_write(path, write)
