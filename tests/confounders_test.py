"""Confounders (DESIGN §6): each artefact's defining property, the split rules, k-fold splits."""

import json
import os

import jax
import numpy as np
import pandas as pd
import pytest

from repsim_jax import config_lib, data, train
from repsim_jax.data import confounders as C, folds
import _modules


def _image(size=64, c=1, seed=0):
  return np.random.default_rng(seed).integers(0, 200, (size, size, c), dtype=np.uint8)


@pytest.mark.parametrize("fn", [C.tag, C.patch])
def test_tag_and_patch_change_only_their_region(fn):
  for size, c in ((64, 1), (128, 3), (28, 1)):
    x = _image(size, c)
    y = fn(x)
    changed = np.any(y != x, axis=-1)
    r0, c0, rows, cols = C._box(size, size)
    assert changed.any()
    outside = np.ones_like(changed)
    outside[r0:r0 + rows, c0:c0 + int(round(rows * 1.2)) + 1] = False  # the letter's width <= its height
    assert not changed[outside].any()
    assert y.max() == 255  # white
  # The paper's geometry at 512 px: a 64 px box at (200, 200).
  assert C._box(512, 512) == (200, 200, 64, 64)


def test_lowpass_keeps_mean_and_in_mask_spectrum_and_removes_the_rest():
  x = _image(64, 1).astype(np.float64)
  y = C.lowpass_float(x)
  assert y.mean() == pytest.approx(x.mean(), abs=1e-9)
  fx = np.fft.fftshift(np.fft.fft2(x[..., 0]))
  fy = np.fft.fftshift(np.fft.fft2(y[..., 0]))
  mask = C.lowpass_mask(64, 64)
  np.testing.assert_allclose(fy[mask], fx[mask], atol=1e-6)
  assert np.abs(fy[~mask]).max() < 1e-6 and np.abs(fx[~mask]).max() > 1.0
  assert 0 < (~mask).sum() < mask.size  # only the corners of the spectrum go


def test_noise_variance_matches_the_poisson_model_and_confounded_is_noisier():
  rng = np.random.default_rng(0)
  x = np.full((256, 256, 1), 100, np.uint8)
  for photons in (2e7, 1.5e7):
    var = C.noise_float(x, photons, rng).var()
    assert var == pytest.approx(C.noise_variance(100, photons), rel=0.03)
  images = [C.stamp("noise", x, carried, seed=i) for i, carried in enumerate([False, True] * 4)]
  v = [float(np.var(im.astype(np.float64))) for im in images]
  assert np.mean(v[1::2]) > 1.1 * np.mean(v[::2])  # 1.5e7 photons: a third more variance


def test_split_rules():
  labels = np.array([0, 1] * 50 + [1] * 7)
  n_pos = int((labels == 1).sum())
  for p in (0.0, 0.1, 0.2, 0.5, 0.8, 1.0):
    m = C.select(labels, p, "train", seed=3)
    assert abs(m[labels == 1].sum() - p * n_pos) <= 1 and not m[labels == 0].any()
    np.testing.assert_array_equal(m, C.select(labels, p, "train", seed=3))
  assert not np.array_equal(C.select(labels, 0.5, "train", 3), C.select(labels, 0.5, "train", 4))
  ood = C.select(labels, 0.5, "ood", 3)
  assert ood[labels == 0].all() and not ood[labels == 1].any()
  assert not C.select(labels, 0.5, "clean", 3).any()


def test_attribute_sampling_gives_the_stated_mixture():
  rng = np.random.default_rng(0)
  labels, groups = rng.integers(0, 2, 4000), rng.integers(0, 2, 4000)
  for p in (0.2, 0.5, 0.8):
    keep = C.attribute_indices(labels, groups, p, "train", seed=1)
    pos = keep[labels[keep] == 1]
    assert np.mean(groups[pos] == 0) == pytest.approx(p, abs=1 / len(pos))
    assert (groups[keep[labels[keep] == 0]] == 0).all()
  ood = C.attribute_indices(labels, groups, 0.5, "ood", seed=1)
  assert ((labels[ood] == 1) == (groups[ood] == 0)).all()


def test_stratified_and_grouped_folds():
  labels = np.array([0] * 30 + [1] * 12)
  f = folds.fold_of(labels, 3, seed=0)
  for k in range(3):
    assert (labels[f == k] == 1).sum() == 4 and (f == k).sum() == 14
  groups = np.repeat(np.arange(14), 3)
  g = folds.fold_of(labels, 3, seed=0, groups=groups)
  for pid in range(14):
    assert len(set(g[groups == pid])) == 1  # a patient is in one fold
  assert sorted(np.bincount(g)) == [12, 15, 15]


def _tiny(tmp_path, **conf):
  c = config_lib.train_config()
  c.data.name, c.data.num_classes, c.data.size = "medical_gray", 2, 16
  c.data.train_size, c.data.val_size, c.data.test_size = 64, 32, 32
  c.data.data_dir = str(tmp_path / "data")
  c.data.confounder.update(conf)
  c.model.name = "small_cnn"
  c.train.batch_size, c.train.num_steps, c.train.log_every = 16, 2, 1
  c.train.eval_splits = ("val", "test", "test_ood", "test_clean")
  c.train.tensorboard, c.parallel.num_devices = False, 1
  return c


def test_a_run_evaluates_every_test_set_and_saves_which_images_carry_it(tmp_path):
  cfg = _tiny(tmp_path, kind="patch", p=0.5, seed=2)
  res = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert set(res["final"]) == {"val", "test", "test_ood", "test_clean"}
  saved = json.load(open(tmp_path / "run" / "confounded.json"))
  splits, _ = data.load_dataset(cfg.data)
  assert saved["carried"]["test_clean"] == []
  for name in ("train", "val", "test", "test_ood"):
    np.testing.assert_array_equal(saved["carried"][name], np.flatnonzero(splits[name].carried))
    idx = saved["carried"][name][0]
    src = splits[name].source
    assert (splits[name][idx]["image"] != src[idx]["image"]).any()
  labels = splits["train"].labels
  assert not splits["train"].carried[labels == 0].any()


def test_a_non_binary_dataset_is_a_clear_error(tmp_path):
  cfg = _tiny(tmp_path, kind="tag", p=0.5)
  cfg.data.num_classes = 3
  with pytest.raises(ValueError, match=r"config.data.confounder.*kind='tag'.*binary"):
    data.load_dataset(cfg.data)
  cfg.data.num_classes, cfg.data.confounder.kind = 2, "sticker"
  with pytest.raises(ValueError, match=r"config.data.confounder.*'sticker'"):
    data.load_dataset(cfg.data)




def _study():
  return _modules.load("experiments/confounders.py", "confounders_study")


@pytest.mark.slow
def test_the_shortcut_is_learned_at_p1_and_absent_at_p0(tmp_path):
  """Normal vs dark lesion, the lowpass artefact, random init, 2 folds: at p = 1 the o.o.d.
  AUC collapses (measured 1.00 i.i.d. against 0.00 o.o.d.); at p = 0 the two agree (0.89 and
  0.91)."""
  study = _study()
  df = study.run_study(str(tmp_path), dict(study.SETTINGS["small"], kinds="lowpass", ps="0,1",
                                            folds=2, finetune_steps=150, sources="random=",
                                            methods="full_ft"))
  at = {p: g for p, g in df.groupby("p")}
  assert (at[1.0].auc_iid - at[1.0].auc_ood).min() > 0.5
  spread = at[0.0].auc_iid.std() + at[0.0].auc_ood.std() + 0.02
  assert abs(at[0.0].auc_iid.mean() - at[0.0].auc_ood.mean()) < max(spread, 0.05)


def test_a_source_can_name_its_own_model():
  # RadImageNet's Keras weights need the Keras-layout ResNet-50 beside torchvision's ImageNet one.
  study = _study()
  sources = study.parse_sources("imagenet=weights/r50.safetensors,"
                                "radimagenet=resnet50_keras@weights/RadImageNet.h5,random=")
  s = study.SETTINGS["full"]
  models = {name: study.finetune_config(s, init, "tag", 0.5, 0, "full_ft", "data").model
            for name, init in sources.items()}
  assert {k: (m.name, m.init) for k, m in models.items()} == {
      "imagenet": ("resnet50", "weights/r50.safetensors"),
      "radimagenet": ("resnet50_keras", "weights/RadImageNet.h5"), "random": ("resnet50", "")}
  assert "radimagenet=resnet50_keras@" in s["sources"]


def test_report_numbers_equal_the_csv(tmp_path):
  """The outputs of a results table (what the runs return), without training."""
  study = _study()
  rng = np.random.default_rng(0)
  rows = [{"source": s, "method": m, "kind": k, "p": p, "fold": f,
           "auc_iid": rng.uniform(0.5, 1), "auc_ood": rng.uniform(0, 1),
           "auc_clean": rng.uniform(0.5, 1), "run": "x"}
          for s in ("natural", "medical") for m in ("full_ft", "repsim") for k in ("tag", "noise")
          for p in (0.0, 1.0) for f in range(3)]
  df = pd.DataFrame(rows)
  study.write_outputs(df, str(tmp_path))
  _check_report(tmp_path, df)
  tests = pd.read_csv(tmp_path / "tests.csv")
  top = df[df.p == 1.0]
  g = top[(top.kind == "tag") & (top.method == "repsim")]
  gap = lambda s: (g[g.source == s].auc_iid - g[g.source == s].auc_ood).mean()  # noqa: E731
  r = tests[(tests.kind == "tag") & (tests.method == "repsim") & (tests.p == 1.0)].iloc[0]
  assert r.gap_a == pytest.approx(gap("natural")) and r.gap_b == pytest.approx(gap("medical"))
  assert 0 < r.p_value <= 1
  # A test per (kind, method, p) and source pair; the report's verdicts are those at the largest p.
  assert len(tests) == 2 * 2 * 2 and sorted(set(tests.p)) == [0.0, 1.0]


def _check_report(tmp_path, df):
  summary = pd.read_csv(tmp_path / "summary.csv")
  tests = pd.read_csv(tmp_path / "tests.csv")
  report = (tmp_path / "report.md").read_text()
  assert len(summary) == len(df.groupby(["source", "method", "kind", "p"]))
  for r in summary.itertuples():
    row = (f"| {r.source} | {r.method} | {r.kind} | {r.p:g} | {r.auc_iid_mean:.4f} ± "
           f"{np.nan_to_num(r.auc_iid_std):.4f} | {r.auc_ood_mean:.4f} ± "
           f"{np.nan_to_num(r.auc_ood_std):.4f} |")
    assert row in report
  for r in tests[tests.p == tests.p.max()].itertuples():
    assert (f"| {r.source_a} | {r.gap_a:.4f} | {r.source_b} | {r.gap_b:.4f} | {r.t:.3f} | "
            f"{r.p_value:.4f} |") in report
  assert (tmp_path / "auc_vs_p.png").stat().st_size > 10_000


@pytest.mark.slow
def test_study_end_to_end_and_a_rerun_trains_nothing(tmp_path, capsys):
  study = _study()
  target = dict(study.SETTINGS["small"]["target"], size=16, train_size=320, val_size=80,
                test_size=160)
  kw = dict(study.SETTINGS["small"], kinds="tag", ps="1", folds=2, finetune_steps=2,
            pretrain_steps=2, batch=16, sources="natural=pretrain:natural,random=",
            methods="full_ft,repsim", target=target)
  df = study.run_study(str(tmp_path), kw)
  # Random init runs full fine-tuning only: 2 folds x (2 methods + 1).
  assert len(df) == 6 and set(df.method[df.source == "random"]) == {"full_ft"}
  _check_report(tmp_path, df)
  # The CSV's means are the runs' own results.
  res = pd.read_csv(tmp_path / "results.csv")
  first = res.iloc[0]
  saved = json.load(open(tmp_path / first.run / "results.json"))
  assert saved["final"]["test_ood"]["auc"] == pytest.approx(first.auc_ood)
  capsys.readouterr()
  again = study.run_study(str(tmp_path), kw)
  out = capsys.readouterr().out
  assert out.count("already finished") == 6 + 1 and "step 1/" not in out
  pd.testing.assert_frame_equal(again, df)


def test_image_folder_patients_stay_in_one_split_and_one_fold(tmp_path):
  """A CSV with a patient column: the random split and every fold keep a patient whole; the
  confounder wraps the lazily decoded images too."""
  cfg = _csv_folder(tmp_path, 60, "patient", lambda i: f"p{i // 3}", side=20, image_size=16,
                    fraction=0.2)
  splits, info = data.load_dataset(cfg)
  patients = {s: set(splits[s].groups) for s in splits}
  assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
  assert sum(len(p) for p in patients.values()) == 20
  cfg.folds, cfg.confounder.kind, cfg.confounder.p = 3, "patch", 1.0
  seen = {}
  for fold in range(3):
    cfg.fold = fold
    splits, _ = data.load_dataset(cfg)
    for pid in set(splits["val"].source.groups):
      assert pid not in seen
      seen[pid] = fold
    assert not set(splits["train"].source.groups) & set(splits["val"].source.groups)
    i = int(np.flatnonzero(splits["train"].carried)[0])
    assert (splits["train"][i]["image"] != splits["train"].source[i]["image"]).any()
  assert len(seen) == len(set(patients["train"]) | set(patients["val"]))


def _csv_folder(tmp_path, n, column, value, side, image_size, fraction):
  """A grayscale image folder of n random images, labels alternating, whose CSV has `column`
  (value(i) for image i) beside the label; its data config."""
  from PIL import Image
  rng = np.random.default_rng(0)
  os.makedirs(tmp_path / "im", exist_ok=True)
  rows = []
  for i in range(n):
    Image.fromarray(rng.integers(0, 200, (side, side), dtype=np.uint8)).save(
        tmp_path / "im" / f"{i}.png")
    rows.append(f"im/{i}.png,{i % 2},{value(i)}")
  (tmp_path / "labels.csv").write_text(f"path,label,{column}\n" + "\n".join(rows) + "\n")
  cfg = config_lib.data_config()
  cfg.source, cfg.root, cfg.csv, cfg.image_size, cfg.channels = (
      "image_folder", str(tmp_path), "labels.csv", image_size, 1)
  cfg.val_fraction = cfg.test_fraction = fraction
  return cfg


def _attribute_folder(tmp_path, n=120):
  """An image folder whose CSV has a `sex` column beside the label (balanced)."""
  cfg = _csv_folder(tmp_path, n, "sex", lambda i: "FM"[(i // 2) % 2], side=12, image_size=8,
                    fraction=0.25)
  cfg.confounder.update(dict(kind="attribute", attribute="sex", group_a="F", p=0.8, seed=3))
  return cfg


def test_attribute_confounder_from_an_image_folder_column(tmp_path):
  cfg = _attribute_folder(tmp_path)
  splits, info = data.load_dataset(cfg)
  assert info.task == "binary"
  whole, _ = data.load_dataset({**cfg.to_dict(), "confounder": {"kind": ""}})
  for name in ("train", "val"):
    s, src = splits[name], splits[name].sources[0]  # the split before sampling
    assert len(src) == len(whole[name])
    np.testing.assert_array_equal(s.kept, C.attribute_indices(
        src.labels, src.attributes, 0.8, "train", 3 + (name == "val"), 1, "F"))
    pos = s.labels == 1
    # DESIGN §6: positives from group A with probability p, negatives only from group A.
    assert abs(np.mean(s.attributes[pos] == "F") - 0.8) <= 1 / pos.sum()
    assert (s.attributes[~pos] == "F").all()
    assert s[0]["image"].tobytes() == src[int(s.kept[0])]["image"].tobytes()
  ood = splits["test_ood"]
  assert ((ood.labels == 1) == (ood.attributes == "F")).all()
  assert len(splits["test_clean"]) == len(whole["test"])
  with pytest.raises(ValueError, match=r"config.data.confounder.group_a='X': not a value of "
                     r"column 'sex'"):
    data.load_dataset({**cfg.to_dict(), "confounder": {**cfg.confounder.to_dict(),
                                                       "group_a": "X"}})
  with pytest.raises(ValueError, match=r"config.data.confounder.attribute: needed for "
                     r"kind='attribute'"):
    data.load_dataset({**cfg.to_dict(), "confounder": {**cfg.confounder.to_dict(),
                                                       "attribute": ""}})
  with pytest.raises(ValueError, match=r"kind='attribute': needs per-image metadata.*'synthetic'"):
    data.load_dataset(_tiny(tmp_path, kind="attribute", attribute="sex", group_a="F").data)
  with pytest.raises(ValueError, match=r"labels.csv: missing column 'age'"):
    data.load_dataset({**cfg.to_dict(), "confounder": {**cfg.confounder.to_dict(),
                                                       "attribute": "age"}})


def test_an_attribute_run_saves_which_images_it_kept(tmp_path):
  c = _tiny(tmp_path)
  c.data = _attribute_folder(tmp_path)
  c.data.mean, c.data.std = (0.5,), (0.25,)  # one channel
  c.train.eval_batch_size = 8
  res = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert set(res["final"]) == {"val", "test", "test_ood", "test_clean"}
  saved = json.load(open(tmp_path / "run" / "confounded.json"))
  splits, _ = data.load_dataset(c.data)
  assert set(saved["kept"]) == {"train", "val", "test", "test_ood", "test_clean"}
  for name, kept in saved["kept"].items():
    assert kept == splits[name].kept.tolist()
    assert res["final"].get(name, {"num_examples": len(kept)})["num_examples"] == len(kept)


def test_a_confounded_run_trains_the_same_on_one_and_eight_devices(tmp_path):
  # The artefact is stamped on the host, per image index: the data-parallel step sees the same
  # global batch on 8 devices as on 1.
  from repsim_jax import checkpoint
  out = {}
  for n in (1, 8):
    c = _tiny(tmp_path, kind="tag", p=1.0, seed=1)
    c.parallel.num_devices, c.train.num_steps = n, 4
    res = train.train_and_evaluate(c, str(tmp_path / f"d{n}"))
    out[n] = (checkpoint.load_run_variables(str(tmp_path / f"d{n}")), res)
  (a, ra), (b, rb) = out[1], out[8]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  for split in ("test", "test_ood", "test_clean"):
    assert ra["final"][split]["auc"] == pytest.approx(rb["final"][split]["auc"], abs=1e-4)


def test_a_confounded_run_killed_and_resumed_equals_the_uninterrupted_one(tmp_path, monkeypatch,
                                                                         capsys):
  # The artefact is a function of (seed, image index), so the resumed data order sees the same
  # stamped images.
  from repsim_jax import checkpoint, metric_writers

  class Killed(BaseException):
    pass

  def cfg():
    c = _tiny(tmp_path, kind="noise", p=0.5, seed=4)
    c.train.num_steps, c.train.checkpoint_every = 8, 4
    return c

  ref = train.train_and_evaluate(cfg(), str(tmp_path / "ref"))
  real = metric_writers.MetricWriter.write

  def write(self, step, split, metrics):
    real(self, step, split, metrics)
    if (step, split) == (6, "train"):
      raise Killed()

  with monkeypatch.context() as m:
    m.setattr(metric_writers.MetricWriter, "write", write)
    with pytest.raises(Killed):
      train.train_and_evaluate(cfg(), str(tmp_path / "killed"))
  capsys.readouterr()
  res = train.train_and_evaluate(cfg(), str(tmp_path / "killed"))
  out = capsys.readouterr().out
  assert "resumed from" in out and "at step 4" in out, out
  a = checkpoint.load_run_variables(str(tmp_path / "ref"))
  b = checkpoint.load_run_variables(str(tmp_path / "killed"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert res["final"] == ref["final"]
