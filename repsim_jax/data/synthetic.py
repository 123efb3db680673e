"""Synthetic image classification sets in MedMNIST npz format (vectorised NumPy).

Two families share low-level structure (edges, blobs, rings, elongated and spiculated shapes) so
that pretraining on the first helps on the second:

- 'natural': colour source domain. One foreground object per image whose *shape* is the class
  (disk, square, triangle, ring, cross, ellipse, diamond, star, half-disk, bar pair), with random
  colour, position, scale and rotation, on a random smooth coloured background with a grating.
- 'medical_gray' / 'medical_rgb': targets that look like scans / H&E histology. A 1/f tissue
  texture with vessel-like curves and faint nuisance blobs; the class is carried by a lesion's
  shape, count, intensity or texture (normal, round bright blob, several small blobs, spiculated
  lesion, dark lesion, ring lesion, granular-texture lesion, elongated lesion). 'medical_rgb'
  maps hematoxylin / eosin densities to RGB with the Ruifrok-Johnston stain vectors.

`difficulty` in [0, 1] lowers the signal (object opacity / lesion contrast) and raises the pixel
noise; `imbalance` >= 1 is the ratio of the most to the least frequent class (geometric class
frequencies). Generation is deterministic in `seed` (fixed-size chunks, each with its own
SeedSequence), so a given configuration always yields the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from repsim_jax import io
from repsim_jax.data.core import ArraySource, DatasetInfo, task_for
from repsim_jax.data.medmnist import NpzSpec, load_npz

KINDS = ("natural", "medical_gray", "medical_rgb")
NATURAL_CLASSES = ("disk", "square", "triangle", "ring", "cross", "ellipse", "diamond", "star",
                   "half_disk", "bar_pair")
MEDICAL_CLASSES = ("normal", "round_blob", "multi_blob", "spiculated", "dark_lesion", "ring_lesion",
                   "granular_lesion", "elongated_lesion")
_CHUNK = 256  # fixed chunk size: part of the determinism contract (changing it changes the data).
_VERSION = 1  # bump when the generators change, so cached files are regenerated.
# Ruifrok & Johnston (2001) optical-density vectors for hematoxylin and eosin.
_H_OD = np.array([0.650, 0.704, 0.286], np.float32)
_E_OD = np.array([0.072, 0.990, 0.105], np.float32)


def max_classes(kind: str) -> int:
  _check_kind(kind)
  return len(NATURAL_CLASSES) if kind == "natural" else len(MEDICAL_CLASSES)


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def class_probs(num_classes: int, imbalance: float) -> np.ndarray:
  """Geometric class frequencies with p_0 / p_{K-1} = imbalance."""
  if imbalance < 1:
    raise ValueError(f"imbalance: expected >= 1 (largest/smallest class ratio), got {imbalance}")
  if num_classes == 1:
    return np.ones(1)
  w = float(imbalance) ** (-np.arange(num_classes) / (num_classes - 1))
  return w / w.sum()


# ----------------------------------------------------------------------------- helpers


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in [-1, 1]: y (1, S, 1), x (1, 1, S)."""
  c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
  return c[None, :, None], c[None, None, :]


def _col(a: np.ndarray) -> np.ndarray:
  """Per-image scalars (B,) -> (B, 1, 1) for broadcasting against (B, S, S)."""
  return np.asarray(a, np.float32)[:, None, None]


def _power_noise(rng, shape, beta: float) -> np.ndarray:
  """Gaussian noise with a 1/f^beta amplitude spectrum over the last two axes, unit std."""
  *lead, s, _ = shape
  fy = np.fft.fftfreq(s)[:, None]
  fx = np.fft.rfftfreq(s)[None, :]
  f = np.sqrt(fy ** 2 + fx ** 2)
  f[0, 0] = 1.0
  amp = f ** (-beta / 2)  # amplitude ~ f^(-beta/2) -> power ~ f^-beta
  amp[0, 0] = 0.0
  spec = np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32)) * amp.astype(np.float32)
  out = np.fft.irfft2(spec, s=(s, s)).astype(np.float32)
  out /= out.std(axis=(-2, -1), keepdims=True) + 1e-6
  return out


def _rotated(y, x, cy, cx, angle, scale):
  """Coordinates (u, v) in each image's object frame, in units of the object radius."""
  dy, dx = y - _col(cy), x - _col(cx)
  c, s = _col(np.cos(angle)), _col(np.sin(angle))
  return (c * dx + s * dy) / _col(scale), (-s * dx + c * dy) / _col(scale)


def _coverage(d, scale, size):
  """Anti-aliased coverage from a signed distance d (object-radius units; < 0 inside)."""
  d_px = d * _col(scale) * (size / 2)
  return np.clip(0.5 - d_px, 0.0, 1.0)


def _gauss(y, x, cy, cx, r):
  return np.exp(-((y - _col(cy)) ** 2 + (x - _col(cx)) ** 2) / (2 * _col(r) ** 2))


# ----------------------------------------------------------------------------- natural


def _shape_distance(cls: int, u, v):
  rho = np.sqrt(u * u + v * v)
  if cls == 0:  # disk
    return rho - 1
  if cls == 1:  # square
    return np.maximum(abs(u), abs(v)) - 0.8
  if cls == 2:  # equilateral triangle
    ds = [u * np.cos(a) + v * np.sin(a) for a in np.deg2rad([90.0, 210.0, 330.0])]
    return np.maximum(np.maximum(ds[0], ds[1]), ds[2]) - 0.5
  if cls == 3:  # ring
    return abs(rho - 0.75) - 0.25
  if cls == 4:  # cross
    return np.minimum(np.maximum(abs(u) - 0.3, abs(v) - 1), np.maximum(abs(v) - 0.3, abs(u) - 1))
  if cls == 5:  # ellipse
    return np.sqrt(u * u + (v / 0.45) ** 2) - 1
  if cls == 6:  # diamond
    return abs(u) + abs(v) - 1
  if cls == 7:  # five-pointed star
    return rho - (0.65 + 0.3 * np.cos(5 * np.arctan2(v, u)))
  if cls == 8:  # half-disk
    return np.maximum(rho - 1, -v)
  if cls == 9:  # two parallel bars
    return np.maximum(np.minimum(abs(u - 0.45), abs(u + 0.45)) - 0.2, abs(v) - 0.9)
  raise ValueError(f"num_classes: at most {len(NATURAL_CLASSES)} for 'natural'")


def _natural_chunk(rng, labels, size, difficulty):
  n = labels.shape[0]
  y, x = _grid(size)
  # Background: smooth coloured field + an oriented grating of random colour (clutter/edges).
  base = rng.uniform(0.1, 0.9, (n, 1, 1, 3)).astype(np.float32)
  field = _power_noise(rng, (n, 3, size, size), beta=3.0).transpose(0, 2, 3, 1)
  bg = base + 0.12 * field
  theta, freq = rng.uniform(0, np.pi, n), rng.uniform(2, 8, n)
  phase = rng.uniform(0, 2 * np.pi, n)
  grating = np.sin(np.pi * _col(freq) * (_col(np.cos(theta)) * x + _col(np.sin(theta)) * y)
                   + _col(phase))
  g_col = rng.uniform(-0.15, 0.15, (n, 1, 1, 3)).astype(np.float32)
  bg = bg + grating[..., None] * g_col * rng.uniform(0, 1, (n, 1, 1, 1))
  # Foreground: class shape, random colour/pose, light texture.
  cy, cx = rng.uniform(-0.35, 0.35, n), rng.uniform(-0.35, 0.35, n)
  scale = rng.uniform(0.35, 0.6, n)
  angle = rng.uniform(0, 2 * np.pi, n)
  u, v = _rotated(y, x, cy, cx, angle, scale)
  mask = np.empty((n, size, size), np.float32)
  for c in np.unique(labels):
    i = labels == c
    mask[i] = _coverage(_shape_distance(int(c), u[i], v[i]), scale[i], size)
  fg = rng.uniform(0.0, 1.0, (n, 1, 1, 3)).astype(np.float32)
  # Push the object colour away from the background mean so the shape stays visible.
  fg = np.where(abs(fg - base) < 0.25, np.clip(base + np.sign(fg - base + 1e-3) * 0.35, 0, 1), fg)
  fg = fg + 0.05 * _power_noise(rng, (n, size, size), beta=1.0)[..., None]
  alpha = 1.0 - 0.6 * difficulty
  img = bg + (alpha * mask[..., None]) * (fg - bg)
  img += (0.02 + 0.15 * difficulty) * rng.standard_normal(img.shape, dtype=np.float32)
  return img


# ----------------------------------------------------------------------------- medical


def _medical_chunk(rng, labels, size, difficulty, rgb):
  """Returns a lesion/tissue density in [0, 1]-ish: (n, S, S) (gray) or H, E densities (rgb)."""
  n = labels.shape[0]
  y, x = _grid(size)
  tissue = 0.45 + 0.08 * _power_noise(rng, (n, size, size), beta=2.5)
  # Vessel-like curves: distance to v = a sin(f u + phi) in a random frame.
  vessels = np.zeros((n, size, size), np.float32)
  for _ in range(2):
    on = rng.uniform(size=n) < 0.7
    ang, amp = rng.uniform(0, np.pi, n), rng.uniform(0.05, 0.3, n)
    fr, ph = rng.uniform(1, 4, n), rng.uniform(0, 2 * np.pi, n)
    off, width = rng.uniform(-0.7, 0.7, n), rng.uniform(0.015, 0.04, n)
    u, v = _rotated(y, x, np.zeros(n), np.zeros(n), ang, np.ones(n))
    d = abs(v - _col(off) - _col(amp) * np.sin(np.pi * _col(fr) * u + _col(ph)))
    vessels += _col(on) * np.exp(-(d / _col(width)) ** 2)
  tissue += _col(rng.choice([-1.0, 1.0], n) * rng.uniform(0.08, 0.2, n)) * vessels
  # Nuisance blobs in every class, fainter than the class signal.
  amp = 0.45 * (1.0 - 0.75 * difficulty)
  for _ in range(2):
    tissue += _col(0.3 * amp * rng.uniform(-1, 1, n)) * _gauss(
        y, x, rng.uniform(-0.8, 0.8, n), rng.uniform(-0.8, 0.8, n), rng.uniform(0.04, 0.12, n))
  lesion = np.zeros((n, size, size), np.float32)
  cy, cx = rng.uniform(-0.45, 0.45, n), rng.uniform(-0.45, 0.45, n)
  r = rng.uniform(0.18, 0.3, n)
  ang = rng.uniform(0, 2 * np.pi, n)
  for c in np.unique(labels):
    i = labels == c
    m = int(i.sum())
    yy, xx = y, x
    if c == 1:  # single round bright blob
      lesion[i] = amp * _gauss(yy, xx, cy[i], cx[i], r[i] * 0.6)
    elif c == 2:  # several small bright blobs
      count = rng.integers(3, 7, m)
      acc = np.zeros((m, size, size), np.float32)
      for k in range(6):
        by, bx = rng.uniform(-0.7, 0.7, m), rng.uniform(-0.7, 0.7, m)
        acc += _col(k < count) * _gauss(yy, xx, by, bx, rng.uniform(0.035, 0.06, m))
      lesion[i] = amp * np.minimum(acc, 1.0)
    elif c == 3:  # spiculated / lobulated lesion
      u, v = _rotated(yy, xx, cy[i], cx[i], ang[i], r[i])
      theta = np.arctan2(v, u)
      k = _col(rng.integers(5, 9, m))
      radius = 0.75 + 0.3 * np.abs(np.sin(k * theta / 2)) ** 4 + 0.1 * np.sin(3 * theta)
      lesion[i] = amp * _coverage(np.sqrt(u * u + v * v) - radius, r[i], size)
    elif c == 4:  # dark (hypo-intense) round lesion
      lesion[i] = -amp * _gauss(yy, xx, cy[i], cx[i], r[i] * 0.6)
    elif c == 5:  # ring lesion: bright rim around a darker core
      u, v = _rotated(yy, xx, cy[i], cx[i], ang[i], r[i])
      rho = np.sqrt(u * u + v * v)
      lesion[i] = amp * (np.exp(-((rho - 0.9) / 0.22) ** 2) - 0.5 * np.exp(-(rho / 0.5) ** 2))
    elif c == 6:  # granular texture inside a round region, same mean intensity
      u, v = _rotated(yy, xx, cy[i], cx[i], ang[i], r[i])
      region = _coverage(np.sqrt(u * u + v * v) - 1.0, r[i], size)
      grain_tex = _power_noise(rng, (m, size, size), beta=0.0)
      lesion[i] = 1.4 * amp * region * np.clip(grain_tex, -2, 2) * 0.5
    elif c == 7:  # elongated lesion
      u, v = _rotated(yy, xx, cy[i], cx[i], ang[i], r[i])
      lesion[i] = amp * np.exp(-(u / 1.4) ** 2 - (v / 0.35) ** 2)
    elif c >= len(MEDICAL_CLASSES):
      raise ValueError(f"num_classes: at most {len(MEDICAL_CLASSES)} for medical kinds")
  noise = (0.03 + 0.12 * difficulty) * rng.standard_normal((n, size, size), dtype=np.float32)
  gain = _col(rng.uniform(0.85, 1.15, n))  # scanner / staining variation
  if not rgb:
    return gain * (tissue + lesion) + noise
  # Histology-like: lesion and fine speckle are nuclear (hematoxylin), tissue is eosin.
  speckle = np.clip(_power_noise(rng, (n, size, size), beta=0.5), 0, None) * 0.08
  h = gain * (0.12 + 1.2 * lesion + speckle + 0.3 * (tissue - 0.45)) + noise
  e = gain * (0.3 + 0.9 * (tissue - 0.45) + 0.3 * vessels) + 0.5 * noise
  h, e = np.clip(h, 0, None), np.clip(e, 0, None)
  od = h[..., None] * _H_OD + e[..., None] * _E_OD
  return np.exp(-1.6 * od)


# ----------------------------------------------------------------------------- public


def generate(kind: str, labels: np.ndarray, *, size: int = 28, difficulty: float = 0.3,
             seed: int = 0, stream: int = 0) -> np.ndarray:
  """Renders images for the given labels.

  Args:
    kind: one of KINDS.
    labels: int (N,) class ids.
    size: image side in pixels.
    difficulty: in [0, 1]; higher = weaker class signal, more noise.
    seed, stream: randomness; chunk j of N uses SeedSequence([seed, stream, j]).

  Returns:
    uint8 (N, size, size) for 'medical_gray', (N, size, size, 3) otherwise.
  """
  _check_kind(kind)
  if not 0.0 <= float(difficulty) <= 1.0:
    raise ValueError(f"difficulty: expected a value in [0, 1], got {difficulty}")
  if int(size) < 8:
    raise ValueError(f"size: expected >= 8 pixels, got {size}")
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  if labels.size and (labels.min() < 0 or labels.max() >= max_classes(kind)):
    raise ValueError(f"labels: expected ids in [0, {max_classes(kind)}) for {kind!r}")
  chunks = []
  for j, start in enumerate(range(0, labels.shape[0], _CHUNK)):
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), j, _VERSION]))
    lab = labels[start:start + _CHUNK]
    if kind == "natural":
      img = _natural_chunk(rng, lab, int(size), float(difficulty))
    else:
      img = _medical_chunk(rng, lab, int(size), float(difficulty), rgb=kind == "medical_rgb")
    chunks.append(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8))
  channels = () if kind == "medical_gray" else (3,)
  if not chunks:
    return np.zeros((0, int(size), int(size)) + channels, np.uint8)
  return np.concatenate(chunks)


def make_split(kind: str, n: int, *, num_classes: int, size: int = 28, difficulty: float = 0.3,
               imbalance: float = 1.0, seed: int = 0, stream: int = 0):
  """Draws N labels (geometric imbalance) and renders them: (images uint8, labels int64 (N, 1))."""
  if num_classes < 2 or num_classes > max_classes(kind):
    raise ValueError(f"num_classes: expected 2..{max_classes(kind)} for {kind!r}, got {num_classes}")
  if int(n) < 0:
    raise ValueError(f"n: expected >= 0, got {n}")
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), 2 ** 31 - 1]))
  labels = rng.choice(num_classes, size=int(n), p=class_probs(num_classes, imbalance))
  images = generate(kind, labels, size=size, difficulty=difficulty, seed=seed, stream=stream)
  return images, labels.astype(np.int64)[:, None]


def write_synthetic_npz(path: str, *, kind: str, num_classes: int, train_size: int = 2000,
                        val_size: int = 500, test_size: int = 1000, size: int = 28,
                        difficulty: float = 0.3, imbalance: float = 1.0, seed: int = 0) -> str:
  """Writes a MedMNIST-format npz (train/val/test images + labels) atomically; returns path.

  Splits use independent random streams (0, 1, 2) of the same seed.
  """
  arrays = {}
  for stream, (split, n) in enumerate(
      (("train", train_size), ("val", val_size), ("test", test_size))):
    images, labels = make_split(kind, n, num_classes=num_classes, size=size, difficulty=difficulty,
                                imbalance=imbalance, seed=seed, stream=stream)
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
  io.save_npz(path, compressed=True, **arrays)
  return path


def synthetic_spec(kind: str, num_classes: int, size: int) -> NpzSpec:
  _check_kind(kind)
  channels = 1 if kind == "medical_gray" else 3
  return NpzSpec(f"synthetic_{kind}", int(num_classes), task_for(int(num_classes)), channels,
                 int(size))


def synthetic_filename(**params) -> str:
  """Cache file name: kind plus a hash of every generation parameter and the generator version."""
  key = json.dumps({**params, "version": _VERSION}, sort_keys=True)
  return f"synthetic_{params['kind']}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"


def load_synthetic(*, kind: str, num_classes: int, train_size: int = 2000, val_size: int = 500,
                   test_size: int = 1000, size: int = 28, difficulty: float = 0.3,
                   imbalance: float = 1.0, seed: int = 0, data_dir: str = "~/.repsim_jax/synthetic"
                   ) -> tuple[dict[str, ArraySource], DatasetInfo]:
  """Generates (once, cached in data_dir) and loads a synthetic set through `load_npz`."""
  params = dict(kind=kind, num_classes=int(num_classes), train_size=int(train_size),
                val_size=int(val_size), test_size=int(test_size), size=int(size),
                difficulty=float(difficulty), imbalance=float(imbalance), seed=int(seed))
  path = os.path.join(os.path.expanduser(os.fspath(data_dir)), synthetic_filename(**params))
  if not os.path.exists(path):
    write_synthetic_npz(path, **params)
  return load_npz(path, synthetic_spec(kind, num_classes, size))
