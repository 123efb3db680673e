"""Tests for the data loaders: MedMNIST npz, synthetic sets, image folders, TFDS."""

import os
import sys

import ml_collections
import numpy as np
import pytest

from repsim_jax.data import (CATALOGUE, DatasetInfo, load_dataset, load_medmnist,
                             medmnist_filename, write_synthetic_npz)
from repsim_jax.data import synthetic as S


def _cfg(**kw):
  return ml_collections.ConfigDict(kw)


def _write_medmnist(path, n=(6, 3, 4), size=28, rgb=False, num_classes=2, multilabel=0, seed=0,
                    **overrides):
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, k in zip(("train", "val", "test"), n):
    shape = (k, size, size, 3) if rgb else (k, size, size)
    arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
    arrays[f"{split}_labels"] = (rng.integers(0, 2, (k, multilabel)) if multilabel
                                 else rng.integers(0, num_classes, (k, 1)))
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez_compressed(path, **arrays)
  return arrays


# ----------------------------------------------------------------------------- MedMNIST


def test_catalogue_matches_design():
  assert len(CATALOGUE) == 12
  assert CATALOGUE["chestmnist"] == (14, "multilabel", 1)
  assert CATALOGUE["retinamnist"] == (5, "ordinal", 3)
  assert CATALOGUE["pneumoniamnist"] == (2, "binary", 1)
  assert CATALOGUE["breastmnist"] == (2, "binary", 1)
  assert CATALOGUE["pathmnist"] == (9, "multiclass", 3)
  assert {k: v[0] for k, v in CATALOGUE.items() if k.startswith("organ")} == {
      "organamnist": 11, "organcmnist": 11, "organsmnist": 11}
  assert medmnist_filename("path") == "pathmnist.npz"
  assert medmnist_filename("PathMNIST", 64) == "pathmnist_64.npz"
  with pytest.raises(ValueError, match="size"):
    medmnist_filename("path", 32)
  with pytest.raises(ValueError, match="name"):
    medmnist_filename("cifar")


def test_load_medmnist_gray_binary(tmp_path):
  arrays = _write_medmnist(tmp_path / "breastmnist.npz")
  splits, info = load_dataset(_cfg(source="medmnist", name="breast", size=28, data_dir=str(tmp_path)))
  assert info == DatasetInfo("breastmnist", 2, "binary", (28, 28, 1))
  for split in ("train", "val", "test"):
    src = splits[split]
    np.testing.assert_array_equal(src.images[..., 0], arrays[f"{split}_images"])
    np.testing.assert_array_equal(src.labels, arrays[f"{split}_labels"][:, 0])
    item = src[1]
    assert item["image"].shape == (28, 28, 1) and item["image"].dtype == np.uint8
    assert item["label"].dtype == np.int32 and item["label"].shape == ()
    assert int(item["label"]) == arrays[f"{split}_labels"][1, 0]


def test_load_medmnist_rgb_64_and_multilabel(tmp_path):
  arrays = _write_medmnist(tmp_path / "pathmnist_64.npz", size=64, rgb=True, num_classes=9)
  splits, info = load_medmnist("path", 64, str(tmp_path))
  assert info.image_shape == (64, 64, 3) and info.num_classes == 9
  np.testing.assert_array_equal(splits["test"].images, arrays["test_images"])
  arrays = _write_medmnist(tmp_path / "chestmnist.npz", multilabel=14)
  splits, info = load_medmnist("chest", 28, str(tmp_path))
  assert info.task == "multilabel" and info.num_classes == 14
  assert splits["train"].labels.shape == (6, 14) and splits["train"][0]["label"].shape == (14,)
  np.testing.assert_array_equal(splits["val"].labels, arrays["val_labels"])


def test_missing_medmnist_file_names_path_and_source(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    load_medmnist("derma", 128, str(tmp_path))
  msg = str(err.value)
  assert str(tmp_path / "dermamnist_128.npz") in msg and "zenodo" in msg.lower()
  assert "\n" not in msg


@pytest.mark.parametrize("overrides,match", [
    (dict(val_labels=None), "missing key 'val_labels'"),
    (dict(train_labels=np.zeros((5, 1), np.int64)), "disagree on the number"),
    (dict(test_labels=np.full((4, 1), 2)), "labels in \\[2, 2\\], expected \\[0, 1\\]"),
    (dict(test_labels=np.full((4, 1), -1)), "labels in \\[-1"),
    (dict(train_images=np.zeros((6, 28, 28, 3), np.uint8)), "'train_images' expected shape"),
    (dict(train_images=np.zeros((6, 28), np.uint8)), "'train_images' expected shape"),
    (dict(val_images=np.zeros((3, 28, 28), np.float32)), "'val_images' expected dtype uint8"),
    (dict(val_images=np.zeros((3, 32, 32), np.uint8)), "expected 28x28"),
    (dict(val_labels=np.zeros((3, 1), np.float32)), "'val_labels' expected an integer"),
])
def test_npz_validation_errors(tmp_path, overrides, match):
  path = tmp_path / "pneumoniamnist.npz"
  _write_medmnist(path, **overrides)
  with pytest.raises(ValueError, match=match) as err:
    load_medmnist("pneumonia", 28, str(tmp_path))
  assert str(path) in str(err.value)


def test_corrupt_npz(tmp_path):
  path = tmp_path / "octmnist.npz"
  path.write_bytes(b"PK\x03\x04 this is not a zip archive" * 10)
  with pytest.raises(ValueError, match="octmnist.npz"):
    load_medmnist("oct", 28, str(tmp_path))
  _write_medmnist(path, num_classes=4)
  data = bytearray(path.read_bytes())
  data[200:400] = bytes(200)  # damage the compressed payload of the first member
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="octmnist.npz"):
    load_medmnist("oct", 28, str(tmp_path))


def test_unknown_source():
  with pytest.raises(ValueError, match=r"^config.data.source='kaggle': expected one of"):
    load_dataset(_cfg(source="kaggle"))


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("kind,shape", [("natural", (16, 16, 3)), ("medical_gray", (16, 16)),
                                        ("medical_rgb", (16, 16, 3))])
def test_synthetic_npz_format_and_determinism(tmp_path, kind, shape):
  kw = dict(kind=kind, num_classes=4, train_size=300, val_size=20, test_size=30, size=16,
            difficulty=0.2, seed=3)
  write_synthetic_npz(tmp_path / "a.npz", **kw)
  write_synthetic_npz(tmp_path / "b.npz", **kw)
  write_synthetic_npz(tmp_path / "c.npz", **{**kw, "seed": 4})
  a, b, c = (np.load(tmp_path / f) for f in ("a.npz", "b.npz", "c.npz"))
  assert sorted(a.files) == sorted(f"{s}_{k}" for s in ("train", "val", "test")
                                   for k in ("images", "labels"))
  for key in a.files:
    np.testing.assert_array_equal(a[key], b[key])
  assert a["train_images"].shape == (300,) + shape and a["train_images"].dtype == np.uint8
  assert a["test_labels"].shape == (30, 1) and a["test_labels"].max() < 4
  assert not np.array_equal(a["train_images"], c["train_images"])
  assert not np.array_equal(a["train_images"][:20], a["val_images"])  # independent streams
  assert a["train_images"].std() > 10  # not blank
  assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.npz", "c.npz"]  # no temp files left


def test_synthetic_images_do_not_depend_on_split_size():
  # Chunked generation: the first examples are the same whatever the total count.
  lab = np.arange(600) % 8
  big = S.generate("medical_gray", lab, size=12, seed=1)
  small = S.generate("medical_gray", lab[:256], size=12, seed=1)
  np.testing.assert_array_equal(big[:256], small)


def test_synthetic_imbalance():
  np.testing.assert_allclose(S.class_probs(3, 4.0), np.array([4, 2, 1]) / 7)
  _, labels = S.make_split("medical_gray", 4000, num_classes=3, size=8, imbalance=4.0, seed=0)
  freq = np.bincount(labels[:, 0], minlength=3) / 4000
  np.testing.assert_allclose(freq, np.array([4, 2, 1]) / 7, atol=0.03)
  with pytest.raises(ValueError, match="imbalance"):
    S.class_probs(3, 0.5)


def test_synthetic_difficulty_lowers_class_signal():
  # Distance between the class-mean images (bright vs dark lesion), relative to the pixel
  # spread, shrinks as difficulty grows.
  lab = np.repeat([1, 4], 150)

  def separation(d):
    x = S.generate("medical_gray", lab, size=16, difficulty=d, seed=0).astype(np.float64)
    return np.abs(x[lab == 1].mean(0) - x[lab == 4].mean(0)).mean() / x.std()

  assert separation(0.0) > 2 * separation(1.0) > 0


def test_synthetic_through_load_dataset_is_cached(tmp_path):
  cfg = _cfg(source="synthetic", name="medical_rgb", num_classes=5, train_size=40, val_size=8,
             test_size=8, size=20, difficulty=0.5, imbalance=2.0, seed=0, data_dir=str(tmp_path))
  splits, info = load_dataset(cfg)
  assert info == DatasetInfo("synthetic_medical_rgb", 5, "multiclass", (20, 20, 3))
  (path,) = [tmp_path / f for f in os.listdir(tmp_path)]
  mtime = path.stat().st_mtime_ns
  splits2, _ = load_dataset(cfg)
  assert path.stat().st_mtime_ns == mtime
  np.testing.assert_array_equal(splits["train"].images, splits2["train"].images)
  cfg.num_classes = 2
  _, info = load_dataset(cfg)
  assert info.task == "binary" and len(os.listdir(tmp_path)) == 2
  with pytest.raises(ValueError, match="num_classes"):
    load_dataset(_cfg(source="synthetic", name="medical_gray", num_classes=12, data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="config.data.name=.xray.: expected one of"):
    load_dataset(_cfg(source="synthetic", name="xray", num_classes=2, data_dir=str(tmp_path)))


# ----------------------------------------------------------------------------- image folder


def _png(path, arr):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path)


def test_image_folder_csv_with_split_column(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  rows, arrays = [], {}
  for i in range(6):
    arr = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    arrays[f"img{i}"] = arr
    _png(tmp_path / "images" / f"img{i}.png", arr)
    rows.append(f"images/img{i},{['nevus', 'melanoma'][i % 2]},{['train', 'valid', 'test'][i % 3]}")
  (tmp_path / "labels.csv").write_text("file,dx,split\n" + "\n".join(rows) + "\n")
  cfg = _cfg(source="image_folder", root=str(tmp_path), csv="labels.csv", image_size=16,
             path_column="file", label_column="dx", path_suffix=".png")
  splits, info = load_dataset(cfg)
  assert info == DatasetInfo(tmp_path.name, 2, "binary", (16, 16, 3))
  assert [len(splits[s]) for s in ("train", "val", "test")] == [2, 2, 2]
  item = splits["val"][0]  # img1: melanoma -> class 0 (sorted names)
  want = np.asarray(Image.fromarray(arrays["img1"]).resize((16, 16), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(item["image"], want)
  assert int(item["label"]) == 0 and int(splits["train"][0]["label"]) == 1


def test_image_folder_class_dirs_random_split(tmp_path):
  for cls in ("a", "b", "c"):
    for i in range(10):
      _png(tmp_path / cls / f"{i}.png", np.full((8, 8), 10 * i, np.uint8))
  cfg = _cfg(source="image_folder", root=str(tmp_path), image_size=8, channels=1,
             val_fraction=0.2, test_fraction=0.1, split_seed=1)
  splits, info = load_dataset(cfg)
  assert info.num_classes == 3 and info.image_shape == (8, 8, 1)
  assert [len(splits[s]) for s in ("train", "val", "test")] == [21, 6, 3]
  all_paths = sorted(p for s in splits.values() for p in s.paths)
  assert len(set(all_paths)) == 30
  src = splits["train"]
  for i in range(len(src)):
    cls = os.path.basename(os.path.dirname(src.paths[i]))
    assert int(src[i]["label"]) == "abc".index(cls)
    assert src[i]["image"].shape == (8, 8, 1)
  splits2, _ = load_dataset(cfg)
  assert list(splits2["val"].paths) == list(splits["val"].paths)


def test_image_folder_errors(tmp_path):
  (tmp_path / "l.csv").write_text("path,label\nmissing.png,0\n")
  with pytest.raises(FileNotFoundError, match="missing.png"):
    load_dataset(_cfg(source="image_folder", root=str(tmp_path), csv="l.csv"))
  (tmp_path / "m.csv").write_text("path,y\nx.png,0\n")
  with pytest.raises(ValueError, match="missing column 'label'"):
    load_dataset(_cfg(source="image_folder", root=str(tmp_path), csv="m.csv"))


# ----------------------------------------------------------------------------- tfds


def _build_tiny_tfds(data_dir):
  """A tiny array_record TFDS data set, built without TensorFlow (images given as PIL)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from PIL import Image

  class ReprsimTinyMed(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(12, 12, 1)),
          "label": tfds.features.ClassLabel(num_classes=3),
          "id": np.int64}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(20, 0), "validation": self._generate_examples(5, 100),
              "test": self._generate_examples(7, 200)}

    def _generate_examples(self, n, start):
      for i in range(start, start + n):
        yield i, {"image": Image.fromarray(_tfds_image(i)), "label": i % 3, "id": i}

  builder = ReprsimTinyMed(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder


def _tfds_image(i):
  return ((np.arange(144).reshape(12, 12) * (i + 1)) % 256).astype(np.uint8)


def test_tfds_data_source_without_tensorflow(tmp_path):
  builder = _build_tiny_tfds(tmp_path)
  for cfg in (_cfg(source="tfds", name="reprsim_tiny_med", data_dir=str(tmp_path)),
              _cfg(source="tfds", builder_dir=str(builder.data_dir))):
    splits, info = load_dataset(cfg)
    assert info == DatasetInfo("reprsim_tiny_med", 3, "multiclass", (12, 12, 1))
    assert {k: len(v) for k, v in splits.items()} == {"train": 20, "val": 5, "test": 7}
    src = splits["test"]
    for i in range(len(src)):
      item, rid = src[i], int(src.data_source[i]["id"])
      np.testing.assert_array_equal(item["image"], _tfds_image(rid)[..., None])
      assert item["label"].dtype == np.int32 and int(item["label"]) == rid % 3
  splits, info = load_dataset(_cfg(source="tfds", name="reprsim_tiny_med", data_dir=str(tmp_path),
                                   splits={"train": "train[:50%]", "val": "train[50%:]"},
                                   image_size=24))
  assert len(splits["train"]) == 10 and info.image_shape == (24, 24, 1)
  assert splits["val"][0]["image"].shape == (24, 24, 1)
  assert "tensorflow" not in sys.modules
  with pytest.raises(ValueError, match="missing feature 'mask'"):
    load_dataset(_cfg(source="tfds", name="reprsim_tiny_med", data_dir=str(tmp_path),
                      label_key="mask"))


def _write_npz(path, n=40, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, k in (("train", n), ("val", 8), ("test", 12)):
    arrays[f"{split}_images"] = rng.integers(0, 255, (k, 28, 28), dtype=np.uint8)
    arrays[f"{split}_labels"] = rng.integers(0, 2, (k, 1))
  np.savez(path, **arrays)
  return arrays


def test_mmap_cache_equals_the_npz_and_is_rebuilt_when_it_changes(tmp_path):
  import pickle
  from repsim_jax.data import medmnist
  path = str(tmp_path / "breastmnist.npz")
  arrays = _write_npz(path)
  spec = medmnist.medmnist_spec("breastmnist", 28)
  mapped, info = medmnist.load_npz(path, spec, mmap=True)
  assert info.image_shape == (28, 28, 1)
  for split in ("train", "val", "test"):
    np.testing.assert_array_equal(mapped[split].images[..., 0], arrays[f"{split}_images"])
    np.testing.assert_array_equal(mapped[split].labels, arrays[f"{split}_labels"][:, 0])
  # Pickled as its path (what grain workers and pool workers receive), not as the pixels.
  blob = pickle.dumps(mapped["train"])
  assert len(blob) < 2000
  np.testing.assert_array_equal(pickle.loads(blob).images, mapped["train"].images)
  arrays = _write_npz(path, n=30, seed=1)  # a new file: another size and mtime
  again, _ = medmnist.load_npz(path, spec, mmap=True)
  np.testing.assert_array_equal(again["train"].images[..., 0], arrays["train_images"])
  # Invalid files fail as they do without the cache.
  bad = dict(arrays, train_labels=np.full((30, 1), 5))
  np.savez(path, **bad)
  with pytest.raises(ValueError, match=r"train_labels' has labels in \[5, 5\]"):
    medmnist.load_npz(path, spec, mmap=True)


def test_mapped_source_feeds_grain_workers_the_same_batches(tmp_path):
  from repsim_jax.data import make_train_iter, medmnist
  path = str(tmp_path / "breastmnist.npz")
  _write_npz(path, n=64)
  spec = medmnist.medmnist_spec("breastmnist", 28)
  mem, _ = medmnist.load_npz(path, spec, mmap=False)
  mapped, _ = medmnist.load_npz(path, spec, mmap=True)
  kw = dict(global_batch_size=16, image_size=28, channels=1, seed=3)
  a = make_train_iter(mem["train"], **kw)
  b = make_train_iter(mapped["train"], worker_count=2, **kw)
  try:
    for _ in range(6):
      x, y = next(a), next(b)
      np.testing.assert_array_equal(x["image"], y["image"])
  finally:
    a.close()
    b.close()
