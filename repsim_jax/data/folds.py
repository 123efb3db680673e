"""Subsets of splits: k-fold cross-validation (stratified, and grouped by patient where the data
have ids), and class-wise subsamples of the train split (data scarcity, imposed imbalance).

`kfold(splits, k, fold, seed)` pools train and val and returns fold `fold` of k as val, the
rest as train; the test split is untouched. A source with `.groups` (image folders with a
patient column) is split so that no patient is in two folds. `subsample(train, fraction,
imbalance, seed)` keeps a seeded subset of each class.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from repsim_jax.data.core import ArraySource


def fold_of(labels, k: int, seed: int, groups=None) -> np.ndarray:
  """Fold id (0..k-1) of every example: within each class a seeded permutation dealt round
  robin (stratified); with `groups`, whole groups are dealt instead, largest first, each to
  the fold with fewest examples of its majority class so far (grouped and near-stratified)."""
  labels = np.asarray(labels).reshape(len(labels), -1)[:, 0]
  if k < 2:
    raise ValueError(f"folds: expected k >= 2, got {k}")
  rng = np.random.default_rng(seed)
  out = np.empty(len(labels), np.int64)
  if groups is None:
    for c in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == c))
      out[idx] = np.arange(len(idx)) % k
    return out
  groups = np.asarray(groups)
  uniq = rng.permutation(np.unique(groups))
  members = {g: np.flatnonzero(groups == g) for g in uniq}
  classes = np.unique(labels)
  counts = np.zeros((k, len(classes)))
  for g in sorted(uniq, key=lambda g: -len(members[g])):  # stable: ties keep the permutation
    lab = labels[members[g]]
    major = np.searchsorted(classes, np.bincount(np.searchsorted(classes, lab)).argmax())
    f = int(np.argmin(counts[:, major] * 1e9 + counts.sum(1)))
    out[members[g]] = f
    counts[f] += np.bincount(np.searchsorted(classes, lab), minlength=len(classes))
  return out


class Subset:
  """Examples `idx` of random-access sources pooled in order (`.labels`, `.groups`,
  `.attributes` kept;
  `labels` given: the items' labels replaced by them)."""

  def __init__(self, sources, idx, labels=None):
    self.sources = list(sources)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
    self.idx = np.asarray(idx, np.int64)
    self.relabelled = labels is not None
    self.labels = (np.asarray(labels, np.int32) if self.relabelled
                   else _pooled(self.sources, "labels")[self.idx])
    for attr in ("groups", "attributes"):  # per-image metadata follows its images
      values = _pooled(self.sources, attr)
      setattr(self, attr, None if values is None else values[self.idx])
    self.name = getattr(self.sources[0], "name", "subset")

  def __len__(self) -> int:
    return len(self.idx)

  def __getitem__(self, i: int) -> dict[str, Any]:
    j = int(self.idx[i])
    s = int(np.searchsorted(self.offsets, j, side="right") - 1)
    item = self.sources[s][j - int(self.offsets[s])]
    return {**item, "label": self.labels[i]} if self.relabelled else item


def _pooled(sources, attr):
  values = [getattr(s, attr, None) for s in sources]
  if any(v is None for v in values):
    if attr == "labels":
      return np.concatenate([[s[i]["label"] for i in range(len(s))] for s in sources])
    return None
  return np.concatenate([np.asarray(v) for v in values])


def kfold(splits: dict, k: int, fold: int, seed: int) -> dict:
  """Train and val pooled, fold `fold` of `k` as val and the rest as train; other splits kept."""
  if not 0 <= fold < k:
    raise ValueError(f"fold: expected 0 <= fold < folds={k}, got {fold}")
  pool = [splits[s] for s in ("train", "val") if s in splits]
  whole = Subset(pool, np.arange(sum(len(s) for s in pool)))
  folds = fold_of(whole.labels, k, seed, whole.groups)
  out = dict(splits)
  for name, sel in (("train", folds != fold), ("val", folds == fold)):
    idx = np.flatnonzero(sel)
    if all(isinstance(s, ArraySource) for s in pool):  # keep the vectorised gather
      images = np.concatenate([s.images for s in pool])[idx]
      out[name] = ArraySource(images, whole.labels[idx], f"{whole.name}/fold{fold}/{name}")
    else:
      out[name] = Subset(pool, idx)
  return out


def subsample_counts(counts, fraction: float = 1.0, imbalance: float = 0.0) -> np.ndarray:
  """How many examples of each class to keep. `imbalance` r >= 1: geometric class sizes with
  the first class r times the last (as the synthetic generator draws them), the largest such
  sizes the stored counts allow; 0 keeps the stored proportions. Then `fraction` of each,
  at least one per class."""
  counts = np.asarray(counts, np.int64)
  target = counts.astype(np.float64)
  if imbalance:
    k = len(counts)
    w = float(imbalance) ** (-np.arange(k) / max(k - 1, 1))
    target = w * np.min(counts / w)
  return np.minimum(counts, np.maximum(1, np.floor(target * fraction + 1e-9))).astype(np.int64)


def subsample(source, fraction: float, imbalance: float, seed: int):
  """A seeded class-wise random subset of a single-label split (`subsample_counts` per class;
  the examples kept at a smaller fraction are among those kept at a larger one)."""
  labels = np.asarray(source.labels).reshape(len(source), -1)
  if labels.shape[1] != 1:
    raise ValueError("train_fraction / train_imbalance: need single-label data")
  labels = labels[:, 0]
  classes, counts = np.unique(labels, return_counts=True)
  keep = subsample_counts(counts, fraction, imbalance)
  rng = np.random.default_rng(seed)
  idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n]
                                for c, n in zip(classes, keep)]))
  if isinstance(source, ArraySource):
    return ArraySource(source.images[idx], source.labels[idx], source.name)
  return Subset([source], idx)
