"""The transferability job (features -> cache -> scores.csv) and the ground-truth sweep, end to end
on tiny synthetic data with two small_cnn sources."""

import glob
import json
import os

import numpy as np
import pandas as pd
import pytest
import scipy.special

from repsim_jax import checkpoint, config_lib, data, models, runs, train
from repsim_jax.data import pipeline
from repsim_jax.jobs import sweep, transferability as job
from repsim_jax.transferability import scores
from repsim_jax.transferability.lp_fu import fu_score, lp_score
import _modules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = "medical_gray"


def _config_module(name):
  return _modules.load(f"configs/{name}.py", f"_cfg_{name}")


transfer_config = _config_module("transferability")
sweep_config = _config_module("sweep")


def _set_data(d, data_dir, kind, num_classes, train_size):
  d.source = "synthetic"
  d.name = kind
  d.data_dir = data_dir
  d.size = 16
  d.num_classes = num_classes
  d.train_size = train_size
  d.val_size = 64
  d.test_size = 64
  d.difficulty = 0.2


def _source_run(root, name, kind, num_classes, seed):
  """A small_cnn trained for 2 steps on a synthetic source: a real run dir with checkpoints."""
  c = config_lib.train_config()
  _set_data(c.data, str(root / "data"), kind, num_classes, 128)
  c.seed = seed
  c.model.name = "small_cnn"
  c.train.batch_size = 32
  c.train.num_steps = 2
  c.train.eval_splits = ()
  c.train.tensorboard = False
  c.analysis.final_similarity = False
  c.parallel.num_devices = 1
  run_dir = str(root / name)
  train.train_and_evaluate(c, run_dir)
  return run_dir


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("sources")
  return {"nat": _source_run(root, "nat", "natural", 4, 0),
          "rgb": _source_run(root, "rgb", "medical_rgb", 5, 1)}


def _job_config(tmp_path, sources, **kw):
  c = transfer_config.get_config(f"target={TARGET},batch=32")
  _set_data(c.data, str(tmp_path / "data"), TARGET, 3, 128)
  # `name=path` (model from config.json) and `name=model@path` forms.
  c.sources = f"nat={sources['nat']};rgb=small_cnn@{sources['rgb']}"
  c.lp.steps = 50
  c.fu.max_examples = 128
  for k, v in kw.items():
    c[k] = v
  return c


def _direct_features(cfg, run_dir):
  """pre_logits / logits of the target train split by a plain single-device forward pass."""
  splits, info = data.load_dataset(cfg.data)
  variables = checkpoint.load_run_variables(run_dir)
  model = models.get_model("small_cnn", int(variables["params"]["head"]["bias"].shape[0]))
  it = pipeline.make_eval_iter(splits["train"], global_batch_size=50, image_size=16, channels=3,
                               mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))
  feats, logits, labels, images = [], [], [], []
  for b in it:
    keep = b["mask"] > 0
    lg, reps = model.apply(variables, b["image"][keep], train=False)
    feats.append(np.asarray(reps["pre_logits"]))
    logits.append(np.asarray(lg))
    labels.append(b["label"][keep])
    images.append(b["image"][keep])
  return (np.concatenate(feats), np.concatenate(logits), np.concatenate(labels),
          np.concatenate(images), model, variables)


def test_job_scores_cache_and_rerun(tmp_path, sources):
  cfg = _job_config(tmp_path, sources)
  wd = str(tmp_path / "job")
  df = job.run(cfg, wd)
  csv = os.path.join(wd, "scores.csv")
  saved = pd.read_csv(csv)
  assert list(saved.columns) == ["source", "target", "score", "value"]
  # One row per (source, target, score), every score of SCORES (small_cnn has FU layers).
  assert len(saved) == 2 * len(job.SCORES)
  assert set(zip(saved.source, saved.target, saved.score)) == {
      (s, TARGET, k) for s in ("nat", "rgb") for k in job.SCORES}
  assert np.all(np.isfinite(saved.value))
  assert len(df) == len(saved)
  value = {(r.source, r.score): r.value for r in saved.itertuples()}

  for name in ("nat", "rgb"):
    cache, meta = job.load_cache(job.cache_path(wd, name, TARGET))
    assert meta["model"] == "small_cnn" and meta["source_path"] == os.path.abspath(sources[name])
    # The data-parallel extraction (8 devices, padded last batch) equals a plain forward pass.
    f, lg, lab, images, model, variables = _direct_features(cfg, sources[name])
    assert cache["features"].shape == (128, 64)
    np.testing.assert_allclose(cache["features"], f, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cache["probs"], scipy.special.softmax(lg, axis=1), atol=1e-5)
    np.testing.assert_array_equal(cache["label"], lab)
    # Every score recomputed from the plain forward pass (features, not softmax outputs, for
    # all but LEEP/NCE) with the library functions equals the CSV.
    probs = scipy.special.softmax(lg.astype(np.float64), axis=1)
    expected = {
        "logme": scores.logme(f, lab), "leep": scores.leep(probs, lab),
        "nce": scores.nce(np.argmax(lg, 1), lab), "transrate": scores.transrate(f, lab),
        "h_score": scores.h_score(f, lab), "gbc": scores.gbc(f, lab),
        "regularized_h_score": scores.regularized_h_score(f, lab),
        "nleep": scores.nleep(f, lab, seed=cfg.seed,
                              covariance_type=cfg.nleep.covariance_type),
        "lp": lp_score(f, lab, n_components=cfg.lp.n_components, k=cfg.lp.k,
                             pca_dim=cfg.lp.pca_dim or None, batch_size=cfg.lp.batch_size,
                             steps=cfg.lp.steps, learning_rate=cfg.lp.learning_rate,
                             seed=cfg.seed),
        # FU (Juodelyte et al.): gradient norm of an early conv over that of the first conv.
        "fu": fu_score(
            lambda p, x: model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                                     train=False),
            variables["params"], images, lab, early_layer="block2/conv",
            first_layer="block1/conv", margin=cfg.fu.margin, batch_size=cfg.fu.batch_size,
            seed=cfg.seed)}
    for score, v in expected.items():
      assert value[(name, score)] == pytest.approx(float(v), rel=2e-3, abs=1e-6), (name, score)
    assert float(cache["fu"]) > 0
    assert value[(name, "nce")] <= 0 and value[(name, "leep")] <= 0  # log-likelihoods

  caches = [job.cache_path(wd, n, TARGET) for n in ("nat", "rgb")]
  mtimes = [os.stat(p).st_mtime_ns for p in caches]
  text = open(csv).read()
  # Rerun: nothing recomputed, nothing duplicated.
  job.run(cfg, wd)
  assert [os.stat(p).st_mtime_ns for p in caches] == mtimes
  assert open(csv).read() == text
  # Scores lost, features kept: the cache is reused and gives the same values.
  os.remove(csv)
  cfg2 = _job_config(tmp_path, sources, scores=("logme", "leep", "h_score"))
  job.run(cfg2, wd)
  assert [os.stat(p).st_mtime_ns for p in caches] == mtimes
  again = pd.read_csv(csv)
  assert len(again) == 6
  for r in again.itertuples():
    assert r.value == pytest.approx(value[(r.source, r.score)], rel=1e-12)
  # recompute=True rewrites the same rows, no duplicates.
  cfg2.recompute = True
  job.run(cfg2, wd)
  assert len(pd.read_csv(csv)) == 6


def test_changed_settings_reextract_and_drop_stale_rows(tmp_path, sources):
  wd = str(tmp_path / "job")
  cfg = _job_config(tmp_path, sources, scores=("logme", "gbc"))
  cfg.sources = f"nat={sources['nat']}"
  job.run(cfg, wd)
  path = job.cache_path(wd, "nat", TARGET)
  before, meta = job.load_cache(path)
  assert np.isnan(before["fu"]) and meta["fu"] is None
  # FU asked for later: computed from the source's weights, the features are kept as they are.
  cfg_fu = _job_config(tmp_path, sources, scores=("logme", "gbc", "fu"))
  cfg_fu.sources = cfg.sources
  job.run(cfg_fu, wd)
  after, meta = job.load_cache(path)
  np.testing.assert_array_equal(after["features"], before["features"])
  assert meta["fu"]["layers"] == ["block2/conv", "block1/conv"] and after["fu"] > 0
  saved = pd.read_csv(os.path.join(wd, "scores.csv"))
  assert sorted(saved.score) == ["fu", "gbc", "logme"]
  assert saved.value[saved.score == "fu"].item() == pytest.approx(float(after["fu"]), rel=1e-12)
  cfg_small = _job_config(tmp_path, sources, scores=("logme",), max_examples=48)
  cfg_small.sources = cfg.sources
  job.run(cfg_small, wd)
  cache, meta = job.load_cache(path)
  assert cache["features"].shape[0] == 48 and meta["max_examples"] == 48
  saved = pd.read_csv(os.path.join(wd, "scores.csv"))
  # The gbc / fu rows came from the old features: dropped, not left beside the new logme.
  assert list(saved.score) == ["logme"]
  assert saved.value[0] == pytest.approx(scores.logme(cache["features"], cache["label"]),
                                         rel=1e-12)


def test_bad_sources(tmp_path, sources):
  missing = str(tmp_path / "no_such_run")
  with pytest.raises(FileNotFoundError, match="no_such_run") as e:
    job.parse_sources(f"nat={sources['nat']};gone=small_cnn@{missing}")
  assert "'gone'" in str(e.value) and "\n" not in str(e.value)
  cfg = _job_config(tmp_path, sources)
  cfg.sources = f"gone=resnet18@{missing}"
  with pytest.raises(FileNotFoundError, match="no_such_run"):
    job.run(cfg, str(tmp_path / "job"))
  assert not os.path.exists(tmp_path / "job" / "scores.csv")
  with pytest.raises(ValueError, match="unknown model 'resnet7'"):
    job.parse_sources(f"a=resnet7@{sources['nat']}")
  with pytest.raises(ValueError, match="given twice"):
    job.parse_sources(f"a={sources['nat']},a={sources['rgb']}")
  with pytest.raises(ValueError, match="name its model"):
    job.parse_sources(f"a={tmp_path}")  # a directory without config.json
  # A file of sources, one a line, with comments.
  listing = tmp_path / "sources.txt"
  listing.write_text(f"# sources\nnat={sources['nat']}\n\nrgb=small_cnn@{sources['rgb']}  # rgb\n")
  parsed = job.parse_sources(str(listing))
  assert [(s.name, s.model, s.path) for s in parsed] == [
      ("nat", "small_cnn", sources["nat"]), ("rgb", "small_cnn", sources["rgb"])]
  with pytest.raises(ValueError, match="config.scores: unknown score 'logmee'"):
    job.validate(_job_config(tmp_path, sources, scores=("logmee",)))


def test_fu_layers_and_applicable_scores():
  assert job.fu_layers("resnet18") == ("layer1_0/conv1", "conv1")
  assert job.fu_layers("resnet50") == ("layer1_0/conv1", "conv1")
  assert job.fu_layers("vit_b16") is None
  assert job.fu_layers("vit_b16", "a/b", "c") == ("a/b", "c")
  cache = {"features": np.zeros((4, 2)), "label": np.zeros(4), "fu": np.asarray(np.nan)}
  ok, skipped = job.applicable_scores(job.SCORES, cache, "multiclass")
  assert set(skipped) == {"leep", "nce", "fu"}  # no head, no FU layers
  assert ok == [s for s in job.SCORES if s not in skipped]
  ok, skipped = job.applicable_scores(job.SCORES, dict(cache, probs=np.ones((4, 1))), "multilabel")
  assert ok == ["logme"]


def test_multilabel_target_uses_logme_regression():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(40, 6)).astype(np.float32)
  y = (rng.random((40, 3)) > 0.5).astype(np.int32)
  cfg = transfer_config.get_config("target=x")
  got = job.compute_score("logme", {"features": f, "label": y}, "multilabel", cfg)
  assert got == pytest.approx(scores.logme(f, y, multilabel=True), rel=1e-12)


def test_best_of_picks_lowest_val_loss_over_runs():
  runs = {"a": {"best_val": {"step": 4, "val": {"loss": 0.9}, "test": {"auc": 0.8}}},
          "b": {"best_val": {"step": 2, "val": {"loss": 0.5}, "test": {"auc": 0.6}}},
          "c": {"best_val": {"step": 6, "val": {"loss": 0.7}, "test": {"auc": 0.9}}}}
  assert sweep.best_of(runs, "auc") == ("b", runs["b"]["best_val"])
  with pytest.raises(ValueError, match="config.sweep.metric='f1'"):
    sweep.best_of(runs, "f1")
  with pytest.raises(ValueError, match="run d: results.json has no best_val"):
    sweep.best_of({"d": {"best_val": {}}}, "auc")


def test_sweep_grid_names():
  c = sweep_config.get_config("lrs=1e-3+1e-2")
  c.sweep.grid = (("method.lam", (0.1, 1.0)),)
  names = [n for n, _ in sweep.grid_points(c.sweep)]
  assert names == ["lr0.001__lam0.1", "lr0.001__lam1", "lr0.01__lam0.1", "lr0.01__lam1"]
  assert sweep.grid_points(c.sweep)[1][1] == {"optim.lr": 1e-3, "method.lam": 1.0}


def test_sweep_ground_truth(tmp_path, sources):
  c = sweep_config.get_config(f"targets={TARGET},lrs=1e-3+1e-2,steps=4,batch=32")
  c.sweep.sources = f"nat={sources['nat']}"
  _set_data(c.data, str(tmp_path / "data"), TARGET, 3, 128)
  c.sweep.num_evals = 2
  c.train.tensorboard = False
  c.train.checkpoint_every = 0
  c.optim.warmup_steps = 1
  c.parallel.num_devices = 1
  wd = str(tmp_path / "sweep")
  out = sweep.run(c, wd)
  run_dirs = [glob.glob(os.path.join(wd, "runs", f"nat__{TARGET}__lr{lr}-*"))
              for lr in ("0.001", "0.01")]
  assert [len(d) for d in run_dirs] == [1, 1]
  run_dirs = [d[0] for d in run_dirs]
  results = [json.load(open(os.path.join(d, "results.json"))) for d in run_dirs]
  for r, lr, d in zip(results, (1e-3, 1e-2), run_dirs):
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert d.endswith("-" + runs.identity(cfg)) and r["identity"] == runs.identity(cfg)
    assert cfg["optim"]["lr"] == lr and cfg["model"]["init"] == sources["nat"]
    assert cfg["train"]["eval_every"] == 2 and cfg["job"] == "train" and "sweep" not in cfg
    assert r["best_val"]["step"] in (2, 4)
  # Best over the grid and eval steps by val loss, computed here from the runs' own records.
  best = min((r["best_val"] for r in results), key=lambda b: b["val"]["loss"])
  truth = pd.read_csv(os.path.join(wd, "ground_truth.csv"))
  assert list(truth.columns) == ["source", "target", "metric", "value"]
  assert len(truth) == 1
  assert (truth.source[0], truth.target[0], truth.metric[0]) == ("nat", TARGET, "auc")
  assert truth.value[0] == pytest.approx(best["test"]["auc"], rel=1e-12)
  assert out["ground_truth"][0]["value"] == pytest.approx(best["test"]["auc"], rel=1e-12)
  # Rerun: finished runs are read back, not retrained.
  mtimes = [os.stat(os.path.join(d, "results.json")).st_mtime_ns for d in run_dirs]
  sweep.run(c, wd)
  assert [os.stat(os.path.join(d, "results.json")).st_mtime_ns for d in run_dirs] == mtimes
  assert pd.read_csv(os.path.join(wd, "ground_truth.csv")).equals(truth)
