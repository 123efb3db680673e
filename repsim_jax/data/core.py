"""Dataset metadata and the in-memory random-access source shared by all loaders."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

TASKS = ("multiclass", "binary", "multilabel", "ordinal")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset.

  Attributes:
    name: dataset name, e.g. 'pathmnist' or 'synthetic_natural'.
    num_classes: number of classes (number of labels for 'multilabel').
    task: one of TASKS.
    image_shape: (H, W, C) of the stored images (C is 1 for grayscale).
  """

  name: str
  num_classes: int
  task: str
  image_shape: tuple[int, int, int]

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task: expected one of {TASKS}, got {self.task!r}")
    if int(self.num_classes) < 1:
      raise ValueError(f"num_classes: expected >= 1, got {self.num_classes}")
    if len(tuple(self.image_shape)) != 3:
      raise ValueError(f"image_shape: expected (H, W, C), got {self.image_shape}")
    object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
    object.__setattr__(self, "num_classes", int(self.num_classes))


def task_for(num_classes: int, task: str | None = None) -> str:
  """Default task for single-label data: 'binary' for 2 classes else 'multiclass'."""
  if task is not None:
    if task not in TASKS:
      raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    return task
  return "binary" if num_classes == 2 else "multiclass"


class ArraySource:
  """Random-access split over in-memory arrays (grain `MapDataset.source` compatible).

  Attributes:
    images: uint8 (N, H, W, C) (a grayscale (N, H, W) input gets a trailing C=1 axis, no copy).
    labels: int32 (N,) for single-label tasks, (N, L) for multi-label.
  `source[i]` returns {'image': uint8 (H, W, C), 'label': int32 scalar or (L,)}.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "array"):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(
          f"images: expected uint8 (N, H, W[, C]), got {images.dtype} {images.shape}")
    if labels.ndim == 2 and labels.shape[1] == 1:
      labels = labels[:, 0]
    if labels.ndim not in (1, 2) or labels.shape[0] != images.shape[0]:
      raise ValueError(
          f"labels: expected ({images.shape[0]},) or ({images.shape[0]}, L), got {labels.shape}")
    self.images = images
    self.labels = labels.astype(np.int32, copy=False)
    self.name = name

  @classmethod
  def mapped(cls, images_path: str, labels: np.ndarray, name: str = "array") -> "ArraySource":
    """Images memory-mapped (read-only) from an .npy file. Pickled (to grain workers, a local
    pool) as the file's path, so every process maps the same pages instead of copying them."""
    src = cls(np.load(images_path, mmap_mode="r"), labels, name)
    src.images_path = images_path
    return src

  def __getstate__(self):
    state = dict(self.__dict__)
    if state.get("images_path"):
      del state["images"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    if "images" not in state:
      images = np.load(state["images_path"], mmap_mode="r")
      self.images = images[..., None] if images.ndim == 3 else images

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": self.labels[index]}

  def __repr__(self) -> str:
    return (f"ArraySource(name={self.name!r}, images={self.images.shape}, "
            f"labels={self.labels.shape})")
