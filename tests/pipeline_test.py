"""Tests for repsim_jax.data.pipeline (grain input pipeline)."""

import json

import numpy as np
import pytest

from repsim_jax.data import ArraySource, make_eval_iter, make_train_iter, num_eval_steps
from repsim_jax.data import pipeline as P


def _indexed_source(n, size=16, channels=3, multilabel=0):
  """Images whose pixels encode the example index; labels = index (or bits of it)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
  if multilabel:
    labels = (np.arange(n)[:, None] >> np.arange(multilabel)[None, :]) & 1
  else:
    labels = np.arange(n)
  return ArraySource(images, labels)


def _take(it, k):
  return [next(it) for _ in range(k)]


# ----------------------------------------------------------------------------- image ops


@pytest.mark.parametrize("n_in,n_out", [(28, 64), (64, 28), (32, 32), (17, 5), (5, 12)])
def test_resize_matches_jax_image_resize(n_in, n_out):
  jax = pytest.importorskip("jax")
  x = np.random.default_rng(1).uniform(0, 255, (2, n_in, n_in, 3)).astype(np.float32)
  want = np.asarray(jax.image.resize(x, (2, n_out, n_out, 3), "linear", antialias=True))
  np.testing.assert_allclose(P.resize_images(x, n_out), want, atol=2e-3, rtol=1e-5)


def test_resize_matrix_rows_sum_to_one_and_identity():
  np.testing.assert_allclose(P.resize_matrix(9, 4).sum(1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(P.resize_matrix(7, 7), np.eye(7, dtype=np.float32))


def _reference_augment(x, u, augment):
  """Per-example loop: zero-pad, crop, flip (and dihedral) with plain slicing."""
  out = []
  s = x.shape[1]
  pad = int(round(4 * s / 32)) if augment != "flip" else 0
  for img, ui in zip(x, u):
    p = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    oy, ox = int(ui[0] * (2 * pad + 1)), int(ui[1] * (2 * pad + 1))
    crop = p[oy:oy + s, ox:ox + s]
    if ui[2] < 0.5:
      crop = crop[:, ::-1]
    if augment == "dihedral_crop":
      if ui[3] < 0.5:
        crop = crop[::-1]
      if ui[4] < 0.5:
        crop = crop.transpose(1, 0, 2)
    out.append(crop)
  return np.stack(out)


@pytest.mark.parametrize("augment", ["flip", "flip_crop", "dihedral_crop"])
@pytest.mark.parametrize("size", [28, 32])
def test_augment_matches_per_example_reference(augment, size):
  x = np.random.default_rng(2).integers(0, 256, (64, size, size, 3), dtype=np.uint8)
  u = P.position_uniforms(7, np.arange(64), 5)
  np.testing.assert_array_equal(P.augment_batch(x, u, augment), _reference_augment(x, u, augment))


def test_position_uniforms_depend_only_on_seed_and_position():
  a = P.position_uniforms(3, np.arange(100), 5)
  b = P.position_uniforms(3, np.arange(50, 150), 5)
  np.testing.assert_array_equal(a[50:], b[:50])
  assert not np.allclose(a, P.position_uniforms(4, np.arange(100), 5))
  assert a.min() >= 0 and a.max() < 1
  # Roughly uniform: mean 1/2, variance 1/12 over 500 draws.
  assert abs(a.mean() - 0.5) < 0.05 and abs(a.var() - 1 / 12) < 0.02


# ----------------------------------------------------------------------------- train iterator


def test_batch_values_normalisation_and_gray_repeat():
  src = _indexed_source(10, size=8, channels=1)
  it = make_train_iter(src, global_batch_size=4, image_size=8, channels=3, mean=(0.1, 0.2, 0.3),
                       std=(0.5, 0.25, 0.125), augment="none", seed=0, prefetch=0)
  b = next(it)
  assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.float32
  assert b["label"].dtype == np.int32 and b["mask"].dtype == np.float32
  np.testing.assert_array_equal(b["mask"], np.ones(4))
  raw = src.images[b["label"]].astype(np.float64) / 255.0  # label == index
  want = (np.repeat(raw, 3, -1) - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.25, 0.125])
  np.testing.assert_allclose(b["image"], want, atol=1e-5)


def test_epochs_are_permutations_reshuffled_each_epoch():
  n, bs = 37, 8  # batches straddle epoch boundaries
  it = make_train_iter(_indexed_source(n), global_batch_size=bs, image_size=16, channels=3,
                       augment="none", seed=5, prefetch=0)
  stream = np.concatenate([b["label"] for b in _take(it, 3 * n // bs + 2)])
  e0, e1, e2 = stream[:n], stream[n:2 * n], stream[2 * n:3 * n]
  for e in (e0, e1, e2):
    np.testing.assert_array_equal(np.sort(e), np.arange(n))
  assert not np.array_equal(e0, e1) and not np.array_equal(e1, e2)
  it2 = make_train_iter(_indexed_source(n), global_batch_size=bs, image_size=16, channels=3,
                        augment="none", seed=6, prefetch=0)
  assert not np.array_equal(np.concatenate([b["label"] for b in _take(it2, 5)]), stream[:40])


@pytest.mark.parametrize("augment", ["none", "flip_crop"])
def test_process_slices_concatenate_to_single_process_batch(augment):
  src = _indexed_source(45, size=16, channels=3)
  kw = dict(global_batch_size=12, image_size=20, channels=3, augment=augment, seed=11, prefetch=0)
  single = _take(make_train_iter(src, **kw), 9)
  for count in (2, 3):
    parts = [_take(make_train_iter(src, process_index=p, process_count=count, **kw), 9)
             for p in range(count)]
    for step in range(9):
      for key in ("image", "label", "mask"):
        got = np.concatenate([parts[p][step][key] for p in range(count)])
        np.testing.assert_array_equal(got, single[step][key])


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_never_overlap_and_cover_each_epoch(count):
  # Example ids (the indexed source's labels): within an epoch no two processes see the same
  # example, and together they see every example once.
  n, gb = 48, 8
  src = _indexed_source(n, size=16)
  kw = dict(global_batch_size=gb, image_size=16, channels=3, augment="none", seed=3, prefetch=0)
  for epoch in range(2):
    ids = [np.concatenate([b["label"] for b in _take(make_train_iter(
        src, process_index=p, process_count=count, **kw), (epoch + 1) * n // gb)[epoch * n // gb:]])
        for p in range(count)]
    for p in range(count):
      assert len(ids[p]) == n // count
      for q in range(p):
        assert not set(ids[p]) & set(ids[q]), (epoch, p, q)
    np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(n))


def test_augmentation_varies_but_is_seeded():
  src = _indexed_source(8, size=16)
  kw = dict(global_batch_size=8, image_size=16, channels=3, augment="flip_crop", prefetch=0)
  a = next(make_train_iter(src, seed=1, **kw))
  b = next(make_train_iter(src, seed=1, **kw))
  c = next(make_train_iter(src, seed=2, **kw))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_from_state(prefetch):
  src = _indexed_source(30, size=16)
  kw = dict(global_batch_size=8, image_size=16, channels=3, augment="flip_crop", seed=3,
            prefetch=prefetch)
  it = make_train_iter(src, **kw)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  assert state == {"step": 5}
  expected = _take(it, 4)
  fresh = make_train_iter(src, **kw)
  next(fresh)
  fresh.set_state(state)
  for want, got in zip(expected, _take(fresh, 4)):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert fresh.get_state() == {"step": 9}
  it.close()
  fresh.close()


def test_multilabel_labels_and_resize():
  src = _indexed_source(20, size=12, channels=1, multilabel=5)
  b = next(make_train_iter(src, global_batch_size=4, image_size=24, channels=1, augment="none",
                           seed=0, prefetch=0))
  assert b["label"].shape == (4, 5) and b["image"].shape == (4, 24, 24, 1)
  idx = b["label"] @ (1 << np.arange(5))  # labels are the bits of the index
  want = P.resize_images(src.images[idx], 24) / 255.0
  np.testing.assert_allclose(b["image"], (want - 0.5) / 0.5, atol=1e-5)


class _DictOnlySource:
  """A source without .images/.labels: exercises the per-example path."""

  def __init__(self, inner):
    self.inner = inner

  def __len__(self):
    return len(self.inner)

  def __getitem__(self, i):
    return self.inner[i]


def test_generic_source_matches_array_fast_path():
  src = _indexed_source(19, size=16)
  kw = dict(global_batch_size=6, image_size=16, channels=3, augment="flip_crop", seed=2, prefetch=0)
  for a, b in zip(_take(make_train_iter(src, **kw), 5),
                  _take(make_train_iter(_DictOnlySource(src), **kw), 5)):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


# ----------------------------------------------------------------------------- eval iterator


@pytest.mark.parametrize("count", [1, 2])
def test_eval_iter_covers_each_example_once_with_padding(count):
  n, gb = 23, 8
  src = _indexed_source(n, size=16)
  parts = [list(make_eval_iter(src, global_batch_size=gb, image_size=16, channels=3,
                               process_index=p, process_count=count, prefetch=0))
           for p in range(count)]
  assert all(len(p) == num_eval_steps(n, gb) == 3 for p in parts)
  labels = np.concatenate([np.concatenate([parts[p][s]["label"] for p in range(count)])
                           for s in range(3)])
  mask = np.concatenate([np.concatenate([parts[p][s]["mask"] for p in range(count)])
                         for s in range(3)])
  assert labels.shape == (24,) and mask.sum() == n
  np.testing.assert_array_equal(labels[mask == 1], np.arange(n))
  np.testing.assert_array_equal(mask, (np.arange(24) < n).astype(np.float32))
  first = parts[0][0]["image"][0]
  np.testing.assert_allclose(first, (src.images[0] / 255.0 - 0.5) / 0.5, atol=1e-6)


def test_eval_iter_resume():
  src = _indexed_source(40, size=16)
  it = make_eval_iter(src, global_batch_size=8, image_size=16, channels=3)
  _take(it, 2)
  state = it.get_state()
  rest = list(it)
  it2 = make_eval_iter(src, global_batch_size=8, image_size=16, channels=3)
  it2.set_state(state)
  rest2 = list(it2)
  assert len(rest) == len(rest2) == 3
  for a, b in zip(rest, rest2):
    np.testing.assert_array_equal(a["label"], b["label"])


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(global_batch_size=10, process_count=3), "global_batch_size"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(augment="mixup"), "augment"),
    (dict(channels=2), "channels"),
    (dict(std=(1.0, 2.0)), "std"),
    (dict(mean=(0.0, 0.0)), "mean"),
    (dict(std=0.0), "std"),
    (dict(worker_count=-1), "worker_count"),
])
def test_bad_arguments(kwargs, match):
  base = dict(global_batch_size=12, image_size=16, channels=3, augment="none", seed=0)
  base.update(kwargs)
  with pytest.raises(ValueError, match=match):
    make_train_iter(_indexed_source(5), **base)


def test_bad_state():
  it = make_eval_iter(_indexed_source(5), global_batch_size=4, image_size=16, channels=3)
  with pytest.raises(ValueError, match="state"):
    it.set_state({"next_index": 3})
  with pytest.raises(ValueError, match="state"):
    it.set_state({"step": 9})


@pytest.mark.slow
def test_worker_processes_give_the_same_batches():
  src = _indexed_source(50, size=16)
  kw = dict(global_batch_size=8, image_size=16, channels=3, augment="flip_crop", seed=4)
  want = _take(make_train_iter(src, prefetch=0, **kw), 6)
  it = make_train_iter(src, worker_count=2, prefetch=2, **kw)
  try:
    got = _take(it, 4)
    state = it.get_state()
    got += _take(it, 2)
  finally:
    it.close()
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a["image"], b["image"])
  # A state saved with workers resumes without them.
  it0 = make_train_iter(src, prefetch=0, **kw)
  it0.set_state(state)
  np.testing.assert_array_equal(next(it0)["image"], want[4]["image"])
