"""Image-folder data sets (ISIC, APTOS and similar releases): a CSV of path,label or class folders.

Layouts accepted by `load_image_folder`:
1. CSV (`csv` set): a header row; `path_column` holds paths relative to `root` (with
   `path_suffix` appended, e.g. '.png' for APTOS' `id_code`), `label_column` integer class ids or
   class names. The classes are `classes` when given, else the labels of the training split
   (integers in numeric order, names sorted), mapped to ids 0..C-1; a val/test label outside
   them, an empty label, or integers mixed with names is an error. If `split_column` is present its values
   (train / val|valid|validation / test) choose the split; otherwise the rows are split at random
   (seeded by `split_seed`) into val_fraction / test_fraction / the rest for train.
2. Class folders (`csv` empty): `root/<class>/<image>`; or, when `root/train` exists,
   `root/{train,val,test}/<class>/<image>` gives the splits directly. Class ids follow the sorted
   class folder names.
Images are decoded with PIL on access, converted to RGB (channels=3) or L (channels=1) and
resized to image_size x image_size (antialiased bilinear; the aspect ratio is not kept).
"""

from __future__ import annotations

import csv as csv_lib
import os
from typing import Any

import numpy as np

from repsim_jax.data.core import DatasetInfo, task_for

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test"}


class ImageFolderSource:
  """Random-access split of image files. `.paths` (N,) str, `.labels` int32 (N,), `.groups`
  (N,) patient ids or None, `.attributes` (N,) str values of a metadata column or None."""

  def __init__(self, paths, labels, *, image_size: int, channels: int = 3, name: str = "folder",
               groups=None, attributes=None):
    self.paths = np.asarray(paths, dtype=object)
    self.labels = np.asarray(labels, np.int32)
    self.groups = None if groups is None else np.asarray(groups, dtype=object)
    self.attributes = None if attributes is None else np.asarray(attributes, dtype=object)
    self.image_size = int(image_size)
    self.channels = int(channels)
    self.name = name

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    path = self.paths[index]
    try:
      with Image.open(path) as im:
        im = im.convert("RGB" if self.channels == 3 else "L")
        im = im.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        arr = np.asarray(im, np.uint8)
    except OSError as err:
      raise ValueError(f"{path}: cannot decode image ({err})") from None
    if arr.ndim == 2:
      arr = arr[..., None]
    return {"image": arr, "label": self.labels[index]}

  def __repr__(self) -> str:
    return f"ImageFolderSource(name={self.name!r}, n={len(self)}, size={self.image_size})"


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_folder_rows(directory: str, classes: list[str]):
  rows = []
  for cls in classes:
    d = os.path.join(directory, cls)
    if not os.path.isdir(d):
      continue
    for f in sorted(os.listdir(d)):
      if _is_image(f):
        rows.append((os.path.join(d, f), cls))
  return rows


def _read_csv(root: str, csv_path: str, path_column: str, label_column: str, split_column: str,
              path_suffix: str, group_column: str = "", attribute_column: str = ""):
  """(csv path, rows): (path, label, split or None, group or None, attribute or None) each."""
  csv_path = csv_path if os.path.isabs(csv_path) else os.path.join(root, csv_path)
  if not os.path.exists(csv_path):
    raise FileNotFoundError(f"{csv_path}: CSV file not found")
  with open(csv_path, newline="") as f:
    reader = csv_lib.DictReader(f)
    header = reader.fieldnames or []
    for col in (path_column, label_column, *([attribute_column] if attribute_column else [])):
      if col not in header:
        raise ValueError(f"{csv_path}: missing column {col!r} (header: {header})")
    rows = []
    for row in reader:
      split = None
      if split_column in header:
        value = str(row[split_column]).strip().lower()
        if value not in _SPLIT_ALIASES:
          raise ValueError(f"{csv_path}: column {split_column!r} has value {value!r}, expected "
                           f"one of {sorted(_SPLIT_ALIASES)}")
        split = _SPLIT_ALIASES[value]
      path = os.path.join(root, row[path_column].strip() + path_suffix)
      group = str(row[group_column]).strip() if group_column and group_column in header else None
      attribute = str(row[attribute_column]).strip() if attribute_column else None
      rows.append((path, row[label_column].strip(), split, group, attribute))
  return csv_path, rows


def _is_int(value: str) -> bool:
  return value.lstrip("-").isdigit()


def _class_list(values: list[str], train: np.ndarray, where: str, classes=()) -> list[str]:
  """The classes: `classes` as given, else the labels of the training split (integers in
  numeric order, names sorted). A label is never a class only because val or test has it."""
  if any(v == "" for v in values):
    raise ValueError(f"{where}: row {values.index('') + 1} has an empty label")
  if classes:
    return [str(c) for c in classes]
  seen = sorted({v for v, t in zip(values, train) if t})
  ints = [_is_int(v) for v in seen]
  if any(ints) and not all(ints):
    stray = next(v for v, i in zip(seen, ints) if not i)
    raise ValueError(f"{where}: labels mix integers and names (e.g. {stray!r}); fix the CSV or "
                     "list the classes in config.data.classes")
  if all(ints):
    if int(min(seen, key=int)) < 0:
      raise ValueError(f"{where}: labels must be >= 0, got {min(seen, key=int)}")
    seen = sorted(seen, key=int)
  return seen


def _label_ids(values: list[str], split_of: np.ndarray, where: str, classes=()) -> np.ndarray:
  names = _class_list(values, split_of == "train", where, classes)
  lookup = {n: i for i, n in enumerate(names)}
  for v, split in zip(values, split_of):
    if v not in lookup:
      raise ValueError(f"{where}: label {v!r} of a {split} image is not a class of the training "
                       f"split ({names[:10]}{'...' if len(names) > 10 else ''}); set "
                       "config.data.classes to name every class")
  return np.array([lookup[v] for v in values], np.int64), len(names)


def _check_images(paths, where: str) -> None:
  """Every listed file is there and opens as an image (header only), before any training."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for p in paths:
    if not os.path.exists(p):
      raise FileNotFoundError(f"{where}: listed image {p} not found")
    if os.path.getsize(p) == 0:
      raise ValueError(f"{p}: empty file (0 bytes), not an image")
    try:
      with Image.open(p) as im:
        im.size  # noqa: B018  (parses the header)
    except Exception as err:  # noqa: BLE001  (PIL raises several types)
      raise ValueError(f"{p}: cannot decode image ({err})") from None


def load_image_folder(root: str, *, csv: str = "", image_size: int = 224, channels: int = 3,
                      val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0,
                      path_column: str = "path", label_column: str = "label",
                      split_column: str = "split", path_suffix: str = "",
                      task: str | None = None, name: str | None = None, classes=(),
                      group_column: str = "patient", attribute_column: str = ""):
  """Loads an image-folder data set (see the module docstring for layouts).

  `attribute_column` (needs `csv`): a metadata column kept per image as `.attributes` (the
  `attribute` confounder samples by it).

  Returns:
    ({'train', 'val', 'test': ImageFolderSource}, DatasetInfo); a split with no rows is omitted.
  """
  root = os.path.expanduser(os.fspath(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root}: image folder root not found")
  if channels not in (1, 3):
    raise ValueError(f"channels: expected 1 or 3, got {channels}")
  if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
    raise ValueError(f"val_fraction/test_fraction: expected fractions summing below 1, got "
                     f"{val_fraction}/{test_fraction}")
  if attribute_column and not csv:
    raise ValueError(f"attribute_column={attribute_column!r}: needs a CSV (class folders carry no "
                     "metadata)")
  where = root
  if csv:
    where, rows = _read_csv(root, csv, path_column, label_column, split_column, path_suffix,
                            group_column, attribute_column)
  elif os.path.isdir(os.path.join(root, "train")):
    splits = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))]
    classes = sorted({c for s in splits for c in os.listdir(os.path.join(root, s))
                      if os.path.isdir(os.path.join(root, s, c))})
    rows = [(p, c, s, None, None) for s in splits
            for p, c in _class_folder_rows(os.path.join(root, s), classes)]
  else:
    classes = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c)))
    rows = [(p, c, None, None, None) for p, c in _class_folder_rows(root, classes)]
  if not rows:
    raise ValueError(f"{where}: no images found")
  _check_images([r[0] for r in rows], where)
  split_of = np.array([r[2] or "" for r in rows], dtype=object)
  groups = (np.array([r[3] for r in rows], dtype=object) if all(r[3] is not None for r in rows)
            else None)
  if not any(split_of):
    # A patient's images stay in one split: whole groups are dealt (one image = one group
    # without patient ids) until each split has its fraction.
    keys = groups if groups is not None else np.arange(len(rows))
    uniq, inverse = np.unique(keys, return_inverse=True)
    perm = np.random.default_rng(split_seed).permutation(len(uniq))
    sizes = np.bincount(inverse)[perm]
    cum = np.cumsum(sizes)
    n = len(rows)
    n_val, n_test = int(round(val_fraction * n)), int(round(test_fraction * n))
    which = np.where(cum <= n_val, "val", np.where(cum <= n_val + n_test, "test", "train"))
    if groups is None:  # exactly the fractions, as before patient ids existed
      which = np.where(np.arange(n) < n_val, "val",
                       np.where(np.arange(n) < n_val + n_test, "test", "train"))
    group_split = np.empty(len(uniq), dtype=object)
    group_split[perm] = which
    split_of = group_split[inverse]
  labels, num_classes = _label_ids([r[1] for r in rows], split_of, where, classes)
  name = name or os.path.basename(os.path.normpath(root))
  paths = np.array([r[0] for r in rows], dtype=object)
  attributes = np.array([r[4] for r in rows], dtype=object) if attribute_column else None
  out = {}
  for split in ("train", "val", "test"):
    sel = split_of == split
    if sel.any():
      out[split] = ImageFolderSource(paths[sel], labels[sel], image_size=image_size,
                                     channels=channels, name=f"{name}/{split}",
                                     groups=None if groups is None else groups[sel],
                                     attributes=None if attributes is None else attributes[sel])
  info = DatasetInfo(name, max(num_classes, 1), task_for(num_classes, task),
                     (int(image_size), int(image_size), int(channels)))
  return out, info
