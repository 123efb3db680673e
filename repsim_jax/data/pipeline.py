"""grain input pipeline: deterministic, multi-process-consistent batches of preprocessed images.

Each element of the underlying `grain.MapDataset` is one *local batch* for a step: the map
function computes the global positions the batch covers and does all image work on the whole
batch with vectorised NumPy (gather, resize, channel conversion, augmentation, normalisation).

Determinism (the contract the trainer relies on):
- Global position g = step * global_batch_size + j (j < global_batch_size). Training reads the
  endless stream epoch = g // N, example = perm_epoch[g % N], perm_epoch a permutation seeded by
  (seed, epoch): every epoch is reshuffled, and epochs run on across batch boundaries.
- Process p of P yields positions [p * B_local, (p + 1) * B_local) of every global batch, so the
  concatenation over processes is the process_count=1 batch.
- Every random augmentation draw is a counter-based hash of (seed, g, draw id): it depends on the
  example's global position only, not on the process, worker or thread that computes it.
- The iterator state is {'step': next step}; any iterator built with the same arguments and
  `set_state` continues identically (the worker count may even differ).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import grain
import numpy as np

AUGMENTS = ("none", "flip", "flip_crop", "dihedral_crop")
_INFINITE = 2 ** 62  # number of train steps: "forever" while still a valid Python len().
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


# ----------------------------------------------------------------------------- image ops


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 weights of antialiased linear (triangle) resampling.

  Half-pixel-centre convention; when shrinking, the triangle is widened by in/out (antialias);
  rows sum to 1 (taps outside the image dropped and renormalised).
  """
  scale = in_size / out_size
  support = max(scale, 1.0)
  centres = (np.arange(out_size) + 0.5) * scale - 0.5
  j = np.arange(in_size)
  w = np.maximum(0.0, 1.0 - np.abs(j[None, :] - centres[:, None]) / support)
  w /= w.sum(axis=1, keepdims=True)
  return w.astype(np.float32)


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
  """Resizes (B, H, W, C) images to (B, size, size, C) float32 (separable, see resize_matrix)."""
  b, h, w, c = x.shape
  x = x.astype(np.float32, copy=False)
  if h != size:
    x = np.matmul(resize_matrix(h, size), x.reshape(b, h, w * c)).reshape(b, size, w, c)
  if w != size:
    x = np.matmul(resize_matrix(w, size), x.transpose(0, 2, 1, 3).reshape(b, w, size * c))
    x = x.reshape(b, size, size, c).transpose(0, 2, 1, 3)
  return x


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
  """(B, H, W, C) -> (B, H, W, channels): gray is repeated, RGB -> gray uses ITU-R 601 luma."""
  c = x.shape[-1]
  if c == channels:
    return x
  if c == 1:
    return np.repeat(x, channels, axis=-1)
  if c == 3 and channels == 1:
    return (x.astype(np.float32) @ _LUMA)[..., None]
  raise ValueError(f"channels: cannot convert {c}-channel images to {channels} channels")


def _splitmix64(z: np.ndarray) -> np.ndarray:
  z = z + np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def position_uniforms(seed: int, positions: np.ndarray, num: int) -> np.ndarray:
  """Counter-based U[0, 1) draws: (len(positions), num), a pure function of (seed, position)."""
  with np.errstate(over="ignore"):
    key = _splitmix64(np.asarray([seed], np.int64).astype(np.uint64))
    pos = np.asarray(positions, np.int64).astype(np.uint64)
    h = _splitmix64(key ^ _splitmix64(pos))[:, None]
    h = _splitmix64(h + np.arange(1, num + 1, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03))
  return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def augment_batch(x: np.ndarray, u: np.ndarray, augment: str) -> np.ndarray:
  """Applies per-example random flips / padded crops / dihedral transforms by one gather.

  Args:
    x: (B, S, S, C) images (any dtype; padding uses 0, i.e. black as in torchvision).
    u: (B, >= 4) uniforms in [0, 1) (see position_uniforms).
    augment: one of AUGMENTS. 'flip': horizontal flip; 'flip_crop': random crop from the image
      zero-padded by round(4 * S / 32) pixels, then horizontal flip; 'dihedral_crop': the crop,
      then any of the 8 rotations/reflections (for orientation-free images, e.g. histology).
  """
  if augment not in AUGMENTS:
    raise ValueError(f"augment: expected one of {AUGMENTS}, got {augment!r}")
  if augment == "none":
    return x
  b, s, _, c = x.shape
  ar = np.arange(s)
  pad = int(round(4 * s / 32)) if augment in ("flip_crop", "dihedral_crop") else 0
  size_p = s + 2 * pad
  # Offsets in the padded frame: output row i reads padded row i + oy, oy in [0, 2 * pad].
  oy = np.floor(u[:, 0] * (2 * pad + 1)).astype(np.int64)
  ox = np.floor(u[:, 1] * (2 * pad + 1)).astype(np.int64)
  rows = ar[None, :] + oy[:, None]  # (B, S)
  cols = ar[None, :] + ox[:, None]
  cols = np.where((u[:, 2] < 0.5)[:, None], cols[:, ::-1], cols)  # horizontal flip
  if augment == "dihedral_crop":
    rows = np.where((u[:, 3] < 0.5)[:, None], rows[:, ::-1], rows)  # vertical flip
    transpose = (u[:, 4] < 0.5)[:, None, None]
    # Transposed: out[i, j] = flipped_crop[j, i] = padded[rows[j], cols[i]].
    r_idx = np.where(transpose, rows[:, None, :], rows[:, :, None])
    c_idx = np.where(transpose, cols[:, :, None], cols[:, None, :])
  else:
    r_idx, c_idx = rows[:, :, None], cols[:, None, :]
  if pad:
    xp = np.zeros((b, size_p, size_p, c), x.dtype)
    xp[:, pad:pad + s, pad:pad + s] = x
  else:
    xp = x
  # One flat gather (fast path of np.take) instead of a 3-array fancy index.
  lin = (np.arange(b)[:, None, None] * size_p + r_idx) * size_p + c_idx
  return np.take(np.ascontiguousarray(xp).reshape(b * size_p * size_p, c), lin, axis=0)


# ----------------------------------------------------------------------------- batch function


def channel_vector(value, channels: int, name: str) -> np.ndarray:
  v = np.asarray(value, np.float32).reshape(-1)
  if v.size == 1:
    v = np.repeat(v, channels)
  if v.size != channels:
    raise ValueError(f"{name}: expected a scalar or {channels} per-channel values, got {value!r}")
  return v


class _BatchFn:
  """Maps a step index to this process's local batch (picklable for grain workers)."""

  def __init__(self, source, *, global_batch_size: int, process_index: int, process_count: int,
               image_size: int, channels: int, mean, std, augment: str, seed: int, train: bool):
    n = len(source)
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise ValueError(f"global_batch_size: expected a positive multiple of process_count="
                       f"{process_count}, got {global_batch_size}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index: expected 0 <= process_index < {process_count}, "
                       f"got {process_index}")
    if augment not in AUGMENTS:
      raise ValueError(f"augment: expected one of {AUGMENTS}, got {augment!r}")
    if channels not in (1, 3):
      raise ValueError(f"channels: expected 1 or 3, got {channels}")
    if int(image_size) < 1:
      raise ValueError(f"image_size: expected a positive int, got {image_size}")
    if train and n == 0:
      raise ValueError("source: expected a non-empty split for training")
    std = channel_vector(std, channels, "std")
    if np.any(std <= 0):
      raise ValueError(f"std: expected positive values, got {std}")
    mean = channel_vector(mean, channels, "mean")
    self.source = source
    self.n = n
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = int(global_batch_size) // int(process_count)
    self.offset = int(process_index) * self.local_batch_size
    self.image_size = int(image_size)
    self.channels = int(channels)
    # Normalisation folded into one multiply-add on [0, 255] pixel values.
    self.scale = (1.0 / (255.0 * std)).astype(np.float32)
    self.bias = (-mean / std).astype(np.float32)
    self.augment = augment if train else "none"
    self.seed = int(seed)
    self.train = train
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    p = self._perms.get(epoch)
    if p is None:
      rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch), 0x5EED]))
      p = rng.permutation(self.n)
      # Keep this and the previous epoch; replace the dict rather than mutate it so that
      # prefetch threads reading it concurrently stay safe.
      old = self._perms
      self._perms = {**{k: v for k, v in old.items() if k == epoch - 1}, epoch: p}
    return p

  def _fetch(self, idx: np.ndarray):
    images = getattr(self.source, "images", None)
    labels = getattr(self.source, "labels", None)
    if isinstance(images, np.ndarray) and images.ndim == 4 and isinstance(labels, np.ndarray):
      return images[idx], labels[idx].astype(np.int32, copy=False)
    items = [self.source[int(i)] for i in idx]
    ims = [np.asarray(it["image"]) for it in items]
    ims = [im[..., None] if im.ndim == 2 else im for im in ims]
    if len({im.shape for im in ims}) > 1:  # ragged stored sizes: bring each to image_size first
      ims = [resize_images(im[None], self.image_size)[0] for im in ims]
    lab = np.stack([np.asarray(it["label"], np.int32) for it in items])
    return np.stack(ims), lab

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    pos = int(step) * self.global_batch_size + self.offset + np.arange(self.local_batch_size)
    if self.train:
      epoch, r = np.divmod(pos, self.n)
      idx = np.empty_like(pos)
      for e in np.unique(epoch):
        sel = epoch == e
        idx[sel] = self._perm(int(e))[r[sel]]
      mask = np.ones(pos.shape, np.float32)
    else:
      real = pos < self.n
      idx = np.where(real, pos, 0)
      mask = real.astype(np.float32)
    x, labels = self._fetch(idx)
    if x.shape[1] != self.image_size or x.shape[2] != self.image_size:
      x = resize_images(x, self.image_size)
    if self.augment != "none":  # before channel conversion: gray images gather 1 channel
      x = augment_batch(x, position_uniforms(self.seed, pos, 5), self.augment)
    x = convert_channels(x, self.channels)
    x = x.astype(np.float32)  # a fresh array: normalise in place
    x *= self.scale
    x += self.bias
    return {"image": x, "label": labels, "mask": mask}


# ----------------------------------------------------------------------------- iterators


class StepIterator(grain.DatasetIterator):
  """A grain DatasetIterator over batches whose state is just {'step': next step}.

  The batches come from `build(start)`, a grain iterator that starts at step `start`; the
  state is independent of prefetching, threads and worker processes.
  """

  def __init__(self, build: Callable[[int], Any], num_steps: int, start: int = 0):
    super().__init__()
    self._build = build
    self._num_steps = int(num_steps)
    self._step = int(start)
    self._it = None

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    if self._step >= self._num_steps:
      raise StopIteration
    if self._it is None:
      self._it = self._build(self._step)
    batch = next(self._it)
    self._step += 1
    return batch

  def __len__(self) -> int:
    """Batches left (eval iterators are finite; a train iterator's is effectively endless)."""
    return self._num_steps - self._step

  def get_state(self) -> dict[str, Any]:
    return {"step": int(self._step)}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or "step" not in state:
      raise ValueError(f"state: expected {{'step': int}}, got {state!r}")
    step = int(state["step"])
    if not 0 <= step <= self._num_steps:
      raise ValueError(f"state: step {step} outside [0, {self._num_steps}]")
    self._close_inner()
    self._step = step

  def _get_next_index(self) -> int:
    return self._step

  def _set_next_index(self, index: int) -> None:
    self.set_state({"step": index})

  def _close_inner(self) -> None:
    if self._it is not None:
      close = getattr(self._it, "close", None)
      if close is not None:
        close()
      self._it = None

  def close(self) -> None:
    self._close_inner()
    super().close()


def _grain_builder(fn: _BatchFn, num_steps: int, worker_count: int, prefetch: int,
                   num_threads: int) -> Callable[[int], Any]:
  if worker_count < 0:
    raise ValueError(f"worker_count: expected >= 0, got {worker_count}")
  if prefetch < 0:
    raise ValueError(f"prefetch: expected >= 0, got {prefetch}")

  def build(start: int):
    ds = grain.MapDataset.range(start, num_steps).map(fn)
    if worker_count > 0:
      # grain's worker processes read an absl flag; outside an absl app nothing parsed them.
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=worker_count, per_worker_buffer_size=max(prefetch, 1)))
    else:
      threads = num_threads if prefetch > 0 else 0
      it_ds = ds.to_iter_dataset(
          grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch if threads else 0))
    return iter(it_ds)

  return build


def make_train_iter(source, *, global_batch_size: int, image_size: int, channels: int,
                    mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5,
                    augment: str = "flip_crop", seed: int = 0, process_index: int = 0,
                    process_count: int = 1, worker_count: int = 0, prefetch: int = 2,
                    num_threads: int = 1) -> StepIterator:
  """Endless training batches for this process.

  Args:
    source: random-access split (`len`, `source[i] -> {'image', 'label'}`); sources exposing
      `.images` (N, H, W, C) and `.labels` arrays are gathered without per-example calls.
    global_batch_size: batch size summed over processes (a multiple of process_count).
    image_size: output side S (images are resized when the stored size differs).
    channels: output channels (1 or 3); grayscale is repeated, RGB -> gray by luma.
    mean, std: per-channel normalisation on the [0, 1] pixel scale.
    augment: one of AUGMENTS (see augment_batch).
    seed: shuffling and augmentation seed.
    process_index, process_count: this process's slice of every global batch.
    worker_count: grain worker processes (0: in this process).
    prefetch: batches computed ahead (per worker, or by background threads when worker_count=0).
    num_threads: background threads when worker_count=0 and prefetch > 0.

  Returns:
    A grain DatasetIterator yielding {'image': float32 (B_local, S, S, channels),
    'label': int32 (B_local,) or (B_local, L), 'mask': float32 (B_local,) ones}, with
    JSON-serialisable get_state() / set_state().
  """
  fn = _BatchFn(source, global_batch_size=global_batch_size, process_index=process_index,
                process_count=process_count, image_size=image_size, channels=channels, mean=mean,
                std=std, augment=augment, seed=seed, train=True)
  return StepIterator(_grain_builder(fn, _INFINITE, worker_count, prefetch, num_threads), _INFINITE)


def num_eval_steps(num_examples: int, global_batch_size: int) -> int:
  """Number of (padded) global batches in one evaluation pass."""
  return math.ceil(num_examples / global_batch_size)


def make_eval_iter(source, *, global_batch_size: int, image_size: int, channels: int,
                   mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5,
                   process_index: int = 0, process_count: int = 1, worker_count: int = 0,
                   prefetch: int = 2, num_threads: int = 1) -> StepIterator:
  """One ordered pass over `source`; the last global batch is padded to full size.

  Batches are like make_train_iter's (no augmentation) with 'mask' float32 (B_local,): 1 for a
  real example, 0 for padding (padding repeats example 0), so masked metrics are exact.
  """
  fn = _BatchFn(source, global_batch_size=global_batch_size, process_index=process_index,
                process_count=process_count, image_size=image_size, channels=channels, mean=mean,
                std=std, augment="none", seed=0, train=False)
  steps = num_eval_steps(len(source), global_batch_size)
  return StepIterator(_grain_builder(fn, steps, worker_count, prefetch, num_threads), steps)
