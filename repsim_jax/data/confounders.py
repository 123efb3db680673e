"""Synthetic confounders with a chosen label association (DESIGN §6, after "Source Matters",
Juodelyte et al. 2024): shortcut learning on any binary dataset.

A confounder is an artefact stamped on a seeded fraction p of the *positive* training (and
validation) images. Test sets: i.i.d. (the same rule), o.o.d. (every negative carries it, no
positive: the association reversed) and clean (none). `noise` noises every image and the
confounded ones more. `attribute` is not an artefact but a sampling rule over a metadata group
(the paper's sex split), `attribute_indices`: each image's group is a column of an image
folder's CSV (`config.data.confounder.attribute`), and the splits keep the sampled images.

Every artefact is a pure function of one image (H, W, C) and, for `noise`, a seed; its
constants are the paper's for 512 px images, scaled by side / 512. `confound` wraps any
random-access source lazily (image folders too); which images carry the artefact is its
`carried` mask (an `attribute` split's: `kept`, the indices it keeps), which the trainer writes
to `confounded.json` in the run directory.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

ARTEFACTS = ("tag", "patch", "lowpass", "noise")
KINDS = (*ARTEFACTS, "attribute")
RULES = ("train", "iid", "ood", "clean")
_REF = 512.0  # the paper's image side
MU_WATER, MU_AIR = 0.1837, 0.1662  # the paper's attenuation coefficients
HU_WINDOW = (-1200.0, 800.0)


# -- which images carry it ----------------------------------------------------------------------
def select(labels, p: float, rule: str, seed: int, positive: int = 1) -> np.ndarray:
  """Boolean mask of the images that carry the confounder under `rule`: train / iid: a seeded
  round(p * #positives) of the positives; ood: every negative; clean: none."""
  labels = np.asarray(labels).reshape(len(labels), -1)[:, 0]
  pos = labels == positive
  if rule == "ood":
    return ~pos
  if rule == "clean":
    return np.zeros(len(labels), bool)
  if rule not in ("train", "iid"):
    raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"p: expected a fraction in [0, 1], got {p}")
  idx = np.flatnonzero(pos)
  chosen = np.random.default_rng(seed).permutation(idx)[:int(round(p * len(idx)))]
  out = np.zeros(len(labels), bool)
  out[chosen] = True
  return out


def attribute_indices(labels, groups, p: float, rule: str, seed: int, positive: int = 1,
                      group_a: Any = 0) -> np.ndarray:
  """Indices of the examples an `attribute` split keeps. train / iid: positives from group A with
  probability p and from group B otherwise (as many as the pools allow at that mixture), every
  negative of group A; ood: the group-A positives and the group-B negatives; clean: all."""
  labels = np.asarray(labels).reshape(len(labels), -1)[:, 0]
  a = np.asarray(groups) == group_a
  pos = labels == positive
  if rule == "clean":
    return np.arange(len(labels))
  if rule == "ood":
    return np.flatnonzero((pos & a) | (~pos & ~a))
  rng = np.random.default_rng(seed)
  pa, pb = rng.permutation(np.flatnonzero(pos & a)), rng.permutation(np.flatnonzero(pos & ~a))
  # The most positives both pools can give at mixture p.
  n = int(min(len(pa) / p if p > 0 else np.inf, len(pb) / (1 - p) if p < 1 else np.inf,
              len(pa) + len(pb)))
  k = int(round(p * n))
  keep = np.concatenate([pa[:k], pb[:n - k], np.flatnonzero(~pos & a)])
  return np.sort(keep)


# -- the artefacts (one image) ------------------------------------------------------------------
def _box(height: int, width: int):
  """(row0, col0, rows, cols): the paper's 64 px box at (200, 200), scaled to the image."""
  sy, sx = height / _REF, width / _REF
  return (int(round(200 * sy)), int(round(200 * sx)), max(1, int(round(64 * sy))),
          max(1, int(round(64 * sx))))


@functools.lru_cache(maxsize=16)
def tag_alpha(height: int, width: int, text: str = "R") -> np.ndarray:
  """(H, W) coverage in [0, 1] of the letter, DejaVu Sans (matplotlib's font) at the paper's
  size 64 with its top-left at (200, 200), both scaled; 4x4 supersampled."""
  from matplotlib.font_manager import FontProperties  # pylint: disable=g-import-not-at-top
  from matplotlib.textpath import TextPath  # pylint: disable=g-import-not-at-top
  r0, c0, rows, _ = _box(height, width)
  path = TextPath((0, 0), text, size=rows, prop=FontProperties(family="DejaVu Sans"))
  ext = path.get_extents()
  verts = path.vertices.copy()
  verts[:, 0] = verts[:, 0] - ext.x0 + c0
  verts[:, 1] = r0 + (ext.y1 - verts[:, 1])  # glyph y grows upwards, rows downwards
  from matplotlib.path import Path  # pylint: disable=g-import-not-at-top
  path = Path(verts, path.codes)
  ss = 4
  ys, xs = np.mgrid[0:height * ss, 0:width * ss]
  pts = np.stack([(xs.ravel() + 0.5) / ss, (ys.ravel() + 0.5) / ss], 1)
  inside = path.contains_points(pts).reshape(height * ss, width * ss)
  return inside.reshape(height, ss, width, ss).mean((1, 3))


def tag(image: np.ndarray, text: str = "R") -> np.ndarray:
  """A white letter blended in by its coverage; pixels it does not touch are unchanged."""
  alpha = tag_alpha(image.shape[0], image.shape[1], text)[..., None]
  out = image.astype(np.float32) * (1 - alpha) + 255.0 * alpha
  return np.where(alpha > 0, np.round(out), image).astype(np.uint8)


def patch(image: np.ndarray) -> np.ndarray:
  """A white square where the tag would be."""
  r0, c0, rows, cols = _box(image.shape[0], image.shape[1])
  out = image.copy()
  out[r0:r0 + rows, c0:c0 + cols] = 255
  return out


@functools.lru_cache(maxsize=16)
def lowpass_mask(height: int, width: int) -> np.ndarray:
  """(H, W) centred elliptical frequency mask of diameter 500 at 512 px (scaled per axis)."""
  fy = np.arange(height) - height // 2
  fx = np.arange(width) - width // 2
  ry, rx = 250.0 * height / _REF, 250.0 * width / _REF
  return ((fy[:, None] / ry) ** 2 + (fx[None, :] / rx) ** 2) <= 1.0


def lowpass_float(x: np.ndarray) -> np.ndarray:
  """Float (H, W, C) image through the mask in the centred 2-D spectrum, per channel."""
  mask = lowpass_mask(x.shape[0], x.shape[1])[..., None]
  spec = np.fft.fftshift(np.fft.fft2(x, axes=(0, 1)), axes=(0, 1))
  return np.real(np.fft.ifft2(np.fft.ifftshift(spec * mask, axes=(0, 1)), axes=(0, 1)))


def lowpass(image: np.ndarray) -> np.ndarray:
  return np.clip(np.round(lowpass_float(image.astype(np.float64))), 0, 255).astype(np.uint8)


def noise_float(image: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
  """CT-like Poisson noise at `photons` per pixel, as a float image on the [0, 256) scale:
  uniform(0, 1) quantisation noise, pixels -> HU (window [-1200, 800]) -> attenuation ->
  Poisson counts -> back."""
  lo, hi = HU_WINDOW
  x = image.astype(np.float64) + rng.uniform(0.0, 1.0, image.shape)
  hu = lo + x / 256.0 * (hi - lo)
  mu = MU_WATER + hu / 1000.0 * (MU_WATER - MU_AIR)
  counts = np.maximum(rng.poisson(photons * np.exp(-mu)), 1)
  mu_noisy = -np.log(counts / photons)
  hu_noisy = (mu_noisy - MU_WATER) / (MU_WATER - MU_AIR) * 1000.0
  return (hu_noisy - lo) / (hi - lo) * 256.0


def noise_variance(image_value: float, photons: float) -> float:
  """The pixel variance `noise_float` adds to a constant image (delta method): the quantisation
  noise's 1/12 plus the Poisson counts' 1/(N e^-mu), mapped to pixels."""
  lo, hi = HU_WINDOW
  hu = lo + (image_value + 0.5) / 256.0 * (hi - lo)
  mu = MU_WATER + hu / 1000.0 * (MU_WATER - MU_AIR)
  scale = 1000.0 / (MU_WATER - MU_AIR) * 256.0 / (hi - lo)  # d pixel / d mu
  return 1.0 / 12.0 + scale ** 2 / (photons * np.exp(-mu))


def noise(image: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
  return np.clip(np.floor(noise_float(image, photons, rng)), 0, 255).astype(np.uint8)


def stamp(kind: str, image: np.ndarray, carried: bool, *, seed: int = 0, text: str = "R",
          photons: float = 2e7, photons_confounded: float = 1.5e7) -> np.ndarray:
  """One uint8 (H, W, C) image with the artefact `kind` when `carried` (`noise`: every image,
  the carried ones at the lower photon count; `seed` seeds its noise)."""
  if kind == "noise":
    return noise(image, photons_confounded if carried else photons, np.random.default_rng(seed))
  if not carried:
    return image
  if kind == "tag":
    return tag(image, text)
  if kind == "patch":
    return patch(image)
  if kind == "lowpass":
    return lowpass(image)
  raise ValueError(f"kind: expected one of {ARTEFACTS}, got {kind!r}")


class Confounded:
  """A random-access source whose images carry the artefact where `carried` says (lazily, at
  `__getitem__`: the same bytes for a given (seed, index), so resumption is unchanged)."""

  def __init__(self, source, carried: np.ndarray, kind: str, seed: int, **params):
    if kind not in ARTEFACTS:
      raise ValueError(f"kind: expected one of {ARTEFACTS}, got {kind!r}")
    self.source, self.carried, self.kind, self.seed, self.params = source, carried, kind, seed, params
    self.labels = getattr(source, "labels", None)
    self.name = f"{getattr(source, 'name', 'source')}+{kind}"

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    item = dict(self.source[index])
    item["image"] = stamp(self.kind, np.asarray(item["image"]), bool(self.carried[index]),
                          seed=self.seed * 1_000_003 + int(index), **self.params)
    return item


def labels_of(source) -> np.ndarray:
  if getattr(source, "labels", None) is not None:
    return np.asarray(source.labels)
  return np.asarray([source[i]["label"] for i in range(len(source))])


def confound_splits(splits: dict, cfg, positive: int = 1) -> dict:
  """`config.data.confounder` on a dataset's splits: train and val under the training rule,
  and the test split as `test` (i.i.d.), `test_ood` and `test_clean`."""
  if cfg.kind == "attribute":
    return _sample_splits(splits, cfg, positive)
  params = dict(text=cfg.text, photons=float(cfg.photons),
                photons_confounded=float(cfg.photons_confounded))
  out = dict(splits)
  for i, name in enumerate(("train", "val")):
    if name in splits:
      carried = select(labels_of(splits[name]), cfg.p, "train", cfg.seed + i, positive)
      out[name] = Confounded(splits[name], carried, cfg.kind, cfg.seed + i, **params)
  if "test" in splits:
    labels = labels_of(splits["test"])
    for rule, name in (("iid", "test"), ("ood", "test_ood"), ("clean", "test_clean")):
      out[name] = Confounded(splits["test"], select(labels, cfg.p, rule, cfg.seed + 2, positive),
                             cfg.kind, cfg.seed + 2, **params)
  return out


def _sample_splits(splits: dict, cfg, positive: int) -> dict:
  """The `attribute` rule: each split keeps `attribute_indices` of its images (`.kept`)."""
  from repsim_jax.data.folds import Subset  # pylint: disable=g-import-not-at-top

  def sample(source, rule, seed):
    groups = getattr(source, "attributes", None)
    if groups is None:
      raise ValueError(f"config.data.confounder.kind='attribute': {source.name} has no per-image "
                       "attribute; use an image folder whose CSV has the column named by "
                       "config.data.confounder.attribute")
    if cfg.group_a not in set(groups):
      raise ValueError(f"config.data.confounder.group_a={cfg.group_a!r}: not a value of column "
                       f"{cfg.attribute!r} in {source.name} (values: {sorted(set(groups))[:10]})")
    kept = attribute_indices(labels_of(source), groups, cfg.p, rule, seed, positive, cfg.group_a)
    out = Subset([source], kept)
    out.kept = kept
    return out

  out = dict(splits)
  for i, name in enumerate(("train", "val")):
    if name in splits:
      out[name] = sample(splits[name], "train", cfg.seed + i)
  if "test" in splits:
    for rule, name in (("iid", "test"), ("ood", "test_ood"), ("clean", "test_clean")):
      out[name] = sample(splits["test"], rule, cfg.seed + 2)
  return out
