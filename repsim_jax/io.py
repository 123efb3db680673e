"""Files written whole or not at all: every result, table, figure, cache and config goes through
`atomic_write` (a temporary file in the same directory, then `os.replace`), so a reader never sees
half a file and a crash or a full disk never corrupts one that was there."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write(path, write: Callable[[str], None]) -> None:
  """Calls `write(tmp_path)`, then renames the temporary file to `path` (parents created); the
  temporary file keeps `path`'s suffix, so writers that infer a format from it (matplotlib,
  np.savez) see the right one."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                             suffix=os.path.splitext(path)[1])
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path, text: str) -> None:
  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  atomic_write(path, write)


def save_figure(fig, path, dpi: int = 150) -> None:
  """A matplotlib figure, in the format of `path`'s suffix."""
  atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight"))


def save_npz(path, compressed: bool = False, **arrays) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  save = np.savez_compressed if compressed else np.savez

  def write(tmp):
    with open(tmp, "wb") as f:
      save(f, **arrays)
  atomic_write(path, write)
