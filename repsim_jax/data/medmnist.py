"""MedMNIST (v2 / MedMNIST+) npz files: the catalogue of the 12 2D sets and a validating loader.

File layout (DESIGN §7): `<name>.npz` for 28 px, `<name>_<size>.npz` for 64/128/224 px, holding
`{train,val,test}_images` uint8 (N, H, W) or (N, H, W, 3) and `{train,val,test}_labels` int
(N, 1), or (N, 14) for the multi-label chestmnist. The same loader (`load_npz`) reads the
synthetic data sets, so those exercise this exact code path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
import zlib

import numpy as np

from repsim_jax.data.core import ArraySource, DatasetInfo

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)


@dataclasses.dataclass(frozen=True)
class NpzSpec:
  """What a MedMNIST-format npz must contain: label space and image geometry."""

  name: str
  num_classes: int
  task: str
  channels: int
  size: int | None = None  # expected H = W; None accepts any square size.


# num_classes, task, channels (DESIGN §7).
CATALOGUE: dict[str, tuple[int, str, int]] = {
    "pathmnist": (9, "multiclass", 3),
    "chestmnist": (14, "multilabel", 1),
    "dermamnist": (7, "multiclass", 3),
    "octmnist": (4, "multiclass", 1),
    "pneumoniamnist": (2, "binary", 1),
    "retinamnist": (5, "ordinal", 3),
    "breastmnist": (2, "binary", 1),
    "bloodmnist": (8, "multiclass", 3),
    "tissuemnist": (8, "multiclass", 1),
    "organamnist": (11, "multiclass", 1),
    "organcmnist": (11, "multiclass", 1),
    "organsmnist": (11, "multiclass", 1),
}

_DOWNLOAD_HINT = (
    "get it from the MedMNIST Zenodo record (doi:10.5281/zenodo.10519652; MedMNIST v2 for 28 px, "
    "MedMNIST+ for 64/128/224 px) or with `pip install medmnist` and "
    "`python -m medmnist download --size=<size>`")


def canonical_name(name: str) -> str:
  """'path', 'PathMNIST' or 'pathmnist' -> 'pathmnist'."""
  key = str(name).lower()
  if not key.endswith("mnist"):
    key += "mnist"
  if key not in CATALOGUE:
    raise ValueError(
        f"name: expected one of the MedMNIST 2D sets {sorted(CATALOGUE)}, got {name!r}")
  return key


def medmnist_filename(name: str, size: int = 28) -> str:
  """File name of a MedMNIST npz: `<name>.npz` (28 px) or `<name>_<size>.npz`."""
  if int(size) not in SIZES:
    raise ValueError(f"size: expected one of {SIZES}, got {size!r}")
  name = canonical_name(name)
  return f"{name}.npz" if int(size) == 28 else f"{name}_{int(size)}.npz"


def medmnist_spec(name: str, size: int = 28) -> NpzSpec:
  name = canonical_name(name)
  num_classes, task, channels = CATALOGUE[name]
  return NpzSpec(name, num_classes, task, channels, int(size))


def _read_key(npz, path: str, key: str) -> np.ndarray:
  if key not in npz.files:
    raise ValueError(f"{path}: missing key {key!r} (found {sorted(npz.files)})")
  try:
    return npz[key]
  except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as err:
    raise ValueError(f"{path}: key {key!r} is corrupt ({type(err).__name__}: {err})") from None


def _validate_split(path: str, split: str, images: np.ndarray, labels: np.ndarray,
                    spec: NpzSpec) -> None:
  ik, lk = f"{split}_images", f"{split}_labels"
  if images.dtype != np.uint8:
    raise ValueError(f"{path}: key {ik!r} expected dtype uint8, got {images.dtype}")
  want_rank = "(N, H, W)" if spec.channels == 1 else "(N, H, W, 3)"
  ok_rank = (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 1)) \
      if spec.channels == 1 else (images.ndim == 4 and images.shape[-1] == 3)
  if not ok_rank:
    raise ValueError(f"{path}: key {ik!r} expected shape {want_rank}, got {images.shape}")
  h, w = images.shape[1:3]
  if h != w or (spec.size is not None and h != spec.size):
    want = f"{spec.size}x{spec.size}" if spec.size is not None else "square"
    raise ValueError(f"{path}: key {ik!r} expected {want} images, got {h}x{w}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{path}: key {lk!r} expected an integer dtype, got {labels.dtype}")
  width = spec.num_classes if spec.task == "multilabel" else 1
  if labels.ndim == 1 and width == 1:
    labels = labels[:, None]
  if labels.ndim != 2 or labels.shape[1] != width:
    raise ValueError(f"{path}: key {lk!r} expected shape (N, {width}), got {labels.shape}")
  if labels.shape[0] != images.shape[0]:
    raise ValueError(f"{path}: keys {ik!r} and {lk!r} disagree on the number of examples "
                     f"({images.shape[0]} images, {labels.shape[0]} labels)")
  if labels.size:
    hi = 1 if spec.task == "multilabel" else spec.num_classes - 1
    lo_v, hi_v = int(labels.min()), int(labels.max())
    if lo_v < 0 or hi_v > hi:
      raise ValueError(f"{path}: key {lk!r} has labels in [{lo_v}, {hi_v}], expected [0, {hi}] "
                       f"for {spec.name} ({spec.task})")


MMAP_MIN_BYTES = 256 << 20  # "auto": files at least this large are read memory-mapped
_CACHE_FORMAT = 1


def _open_npz(path: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: file not found")
  try:
    npz = np.load(path, allow_pickle=False)
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
    raise ValueError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from None
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise ValueError(f"{path}: expected an .npz archive, got a single {type(npz).__name__}")
  return npz


def _split_source(path, split, images, labels, spec, shape) -> ArraySource:
  _validate_split(path, split, images, labels, spec)
  src = ArraySource(images, labels, name=f"{spec.name}/{split}")
  if spec.task != "multilabel" and src.labels.ndim == 2:
    src.labels = src.labels[:, 0]
  if shape is not None and src.images.shape[1:] != shape:
    raise ValueError(f"{path}: key '{split}_images' has image shape {src.images.shape[1:]}, "
                     f"other splits have {shape}")
  return src


def load_npz(path: str, spec: NpzSpec, splits=SPLITS,
             mmap: bool | str = "auto") -> tuple[dict[str, ArraySource], DatasetInfo]:
  """Loads and validates a MedMNIST-format npz.

  Args:
    path: the .npz file.
    spec: expected label space and image geometry.
    splits: which of train/val/test to load.
    mmap: True: read the images memory-mapped from a cache of per-split .npy files beside the
      npz (`<path>.mmap/`, made on first use, keyed by the npz's size and mtime), so processes
      (grain workers, a local pool) share its pages instead of each holding a copy; False: in
      process memory; "auto": memory-mapped for files of MMAP_MIN_BYTES or more.

  Returns:
    ({split: ArraySource}, DatasetInfo). Sources hold images uint8 (N, H, W, C) and labels int32
    (N,) (or (N, L) for multi-label).
  """
  path = os.fspath(path)
  if mmap == "auto":
    mmap = os.path.exists(path) and os.path.getsize(path) >= MMAP_MIN_BYTES
  if mmap:
    cached = _mapped(path, spec, splits)
    if cached is not None:
      return cached
  out = {}
  shape = None
  with _open_npz(path) as npz:
    for split in splits:
      out[split] = _split_source(path, split, _read_key(npz, path, f"{split}_images"),
                                 _read_key(npz, path, f"{split}_labels"), spec, shape)
      shape = out[split].images.shape[1:]
  return out, DatasetInfo(spec.name, spec.num_classes, spec.task, shape)


def _cache_key(path: str) -> dict:
  st = os.stat(path)
  return {"format": _CACHE_FORMAT, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _mapped(path: str, spec: NpzSpec, splits):
  """The memory-mapped sources of `path` from its cache (converted, validated, first); None
  (read into memory instead) when the cache directory cannot be written."""
  from repsim_jax import io  # pylint: disable=g-import-not-at-top
  cache = path + ".mmap"
  meta_path = os.path.join(cache, "meta.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: file not found")
  key = _cache_key(path)
  meta = None
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
  if meta is None or meta.get("key") != key or not set(splits) <= set(meta.get("splits", ())):
    try:
      os.makedirs(cache, exist_ok=True)
      shape, done = None, []
      with _open_npz(path) as npz:
        for split in SPLITS:
          if f"{split}_images" not in npz.files and split not in splits:
            continue
          src = _split_source(path, split, _read_key(npz, path, f"{split}_images"),
                              _read_key(npz, path, f"{split}_labels"), spec, shape)
          shape = src.images.shape[1:]
          for kind, arr in (("images", src.images), ("labels", src.labels)):
            io.atomic_write(os.path.join(cache, f"{split}_{kind}.npy"),
                            lambda tmp, arr=arr: np.save(tmp, arr))
          done.append(split)
          del src
      meta = {"key": key, "splits": done, "spec": dataclasses.asdict(spec)}
      io.write_text(meta_path, json.dumps(meta) + "\n")  # last: the cache is whole
    except PermissionError as e:
      print(f"warning: {cache}: cannot write the memory-map cache ({e.strerror}); reading "
            f"{path} into memory", flush=True)
      return None
  if meta["spec"] != dataclasses.asdict(spec):
    raise ValueError(f"{cache}: made for {meta['spec']['name']}, not {spec.name}; remove it")
  out, shape = {}, None
  for split in splits:
    labels = np.load(os.path.join(cache, f"{split}_labels.npy"))
    out[split] = ArraySource.mapped(os.path.join(cache, f"{split}_images.npy"), labels,
                                    name=f"{spec.name}/{split}")
    shape = out[split].images.shape[1:]
  return out, DatasetInfo(spec.name, spec.num_classes, spec.task, shape)


def load_medmnist(name: str, size: int = 28, data_dir: str = "~/.medmnist", splits=SPLITS,
                  mmap: bool | str = "auto") -> tuple[dict[str, ArraySource], DatasetInfo]:
  """Loads one of the 12 MedMNIST 2D sets from `data_dir/<name>[_<size>].npz` (`mmap`: see
  `load_npz`)."""
  spec = medmnist_spec(name, size)
  path = os.path.join(os.path.expanduser(os.fspath(data_dir)), medmnist_filename(name, size))
  if not os.path.exists(path):
    raise FileNotFoundError(f"MedMNIST file not found: expected {path}; {_DOWNLOAD_HINT}")
  return load_npz(path, spec, splits, mmap)
