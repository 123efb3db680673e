"""Input validation shared by the transferability scores.

Every score raises a one-line ``ValueError`` naming the argument when its input has no
meaningful score (one class, labels not 0..C-1, fewer examples than classes, NaN features,
mismatched lengths), instead of returning NaN or a silently wrong number.
"""

from __future__ import annotations

import warnings

import numpy as np


def as_features(features, name: str = "features", dtype=np.float64) -> np.ndarray:
  """(n, d) finite float array, or ValueError.

  ``dtype=None`` keeps float32 input as float32 (everything else becomes float64), so
  large Gram matrices of network features can be formed at the input's precision.
  """
  x = np.asarray(features)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected a 2-D (n, d) array, got shape {x.shape}")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name}: expected a non-empty (n, d) array, got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise ValueError(f"{name}: expected a real numeric array, got dtype {x.dtype}")
  if dtype is None:
    dtype = np.float32 if x.dtype == np.float32 else np.float64
  x = x.astype(dtype, copy=False)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: contains NaN or inf values")
  return x


def as_int_vector(labels, name: str) -> np.ndarray:
  """1-D non-negative integer array ((n, 1) is flattened, MedMNIST style), or ValueError."""
  y = np.asarray(labels)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    raise ValueError(f"{name}: expected a 1-D (n,) array of integer labels, got shape {y.shape}")
  if y.size == 0:
    raise ValueError(f"{name}: is empty")
  if np.issubdtype(y.dtype, np.floating):
    if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
      raise ValueError(f"{name}: expected integer labels, got non-integer values")
  elif not np.issubdtype(y.dtype, np.integer) and y.dtype != bool:
    raise ValueError(f"{name}: expected integer labels, got dtype {y.dtype}")
  y = y.astype(np.int64)
  if y.min() < 0:
    raise ValueError(f"{name}: expected labels in 0..C-1, found negative label {int(y.min())}")
  return y


def as_class_labels(labels, n: int | None = None, name: str = "labels") -> tuple[np.ndarray, int]:
  """Target labels: 1-D ints covering exactly 0..C-1 with C >= 2 and n >= C. Returns (y, C)."""
  y = as_int_vector(labels, name)
  if n is not None and y.shape[0] != n:
    raise ValueError(f"{name}: length {y.shape[0]} does not match the {n} rows of the features")
  num_classes = int(y.max()) + 1
  if y.shape[0] < num_classes:
    raise ValueError(
        f"{name}: {y.shape[0]} examples but labels imply {num_classes} classes; need at least as many examples as classes")
  counts = np.bincount(y, minlength=num_classes)
  if np.any(counts == 0):
    missing = np.flatnonzero(counts == 0)[:5].tolist()
    raise ValueError(f"{name}: expected every class of 0..{num_classes - 1} to be present; missing {missing}")
  if num_classes < 2:
    raise ValueError(f"{name}: only one class present; a transferability score needs at least two")
  return y, num_classes


def as_multilabel(labels, n: int, name: str = "labels") -> np.ndarray:
  """(n, K) multi-hot 0/1 matrix, K >= 1, or ValueError."""
  y = np.asarray(labels)
  if y.ndim != 2:
    raise ValueError(f"{name}: multilabel=True expects a 2-D (n, K) multi-hot matrix, got shape {y.shape}")
  if y.shape[0] != n:
    raise ValueError(f"{name}: length {y.shape[0]} does not match the {n} rows of the features")
  y = y.astype(np.float64)
  if not np.all((y == 0) | (y == 1)):
    raise ValueError(f"{name}: multilabel=True expects 0/1 entries")
  return y


def warn_if_degenerate(score: str, f: np.ndarray, why: str) -> None:
  """Warns (RuntimeWarning) when there are no more examples than feature dimensions, where
  `score`'s covariance estimate is rank-deficient and its value says more about n and d than
  about the features."""
  n, d = f.shape
  if n <= d:
    warnings.warn(f"{score}: {n} examples for {d} feature dimensions (n <= d): {why}; use more "
                  "examples or fewer dimensions (e.g. pca_transform)", RuntimeWarning,
                  stacklevel=3)
