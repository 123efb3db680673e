"""DESIGN §9's quality indicators (ECE, k-NN and linear-probe accuracy on the source task), the
per-evaluation similarity trajectory, and the train-split subsamples the transfer study uses."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from repsim_jax import data, metrics, probes, train
from repsim_jax.data import folds
from train_test import tiny_config


def test_ece_closed_form():
  # Bin (0.6, 0.667]: confidences 0.62, 0.65, one of two right -> |0.5 - 0.635| = 0.135.
  # Bin (0.933, 1]: confidence 0.95 twice, both right -> |1 - 0.95| = 0.05. n = 4.
  probs = np.array([[0.62, 0.38], [0.35, 0.65], [0.95, 0.05], [0.05, 0.95]])
  labels = np.array([0, 0, 0, 1])
  want = (2 * 0.135 + 2 * 0.05) / 4
  assert metrics.expected_calibration_error(probs, labels) == pytest.approx(want)
  # Perfect calibration: confidence 0.75 and three of four right.
  p = np.tile([0.75, 0.25], (4, 1))
  assert metrics.expected_calibration_error(p, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
  logits = np.log(probs)
  assert metrics.classification_metrics(logits, labels, "binary")["ece"] == pytest.approx(want)


def test_linear_probe_reaches_the_optimum_scipy_finds():
  """The L-BFGS fit equals an independent minimisation of the same objective (scipy)."""
  rng = np.random.default_rng(0)
  n, d, c, l2 = 240, 12, 3, 1e-2
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, c, n)
  x[np.arange(n), y] += 1.5
  w, _ = probes.fit_linear_probe(x, jnp.asarray(y), c, l2, 100)

  def f(v):
    p = (jnp.asarray(v[:d * c].reshape(d, c), jnp.float32), jnp.asarray(v[d * c:], jnp.float32))
    import jax
    val, g = jax.value_and_grad(probes.probe_objective)(p, x, y, l2)
    return float(val), np.concatenate([np.ravel(g[0]), g[1]]).astype(np.float64)

  r = optimize.minimize(f, np.zeros(d * c + c), jac=True, method="L-BFGS-B",
                        options=dict(maxiter=2000, gtol=1e-10))
  # b is determined only up to a shared shift (softmax), w uniquely (the L2 term).
  assert np.abs(np.asarray(w) - r.x[:d * c].reshape(d, c)).max() < 2e-3
  # Separable classes: a probe on well-separated features is exact on held-out points.
  x2 = rng.normal(size=(60, d)).astype(np.float32) * 0.1
  y2 = rng.integers(0, c, 60)
  x2[np.arange(60), y2] += 3.0
  assert probes.linear_probe_accuracy(x2[:40], y2[:40], x2[40:], y2[40:], c) == 1.0


def test_subsample_counts_imbalance_and_fraction():
  assert folds.subsample_counts([500] * 4, imbalance=20).tolist() == [500, 184, 67, 25]
  assert folds.subsample_counts([500] * 4, fraction=0.01).tolist() == [5] * 4
  # The smallest class limits the geometric sizes: 100 / 5^(-1) = 500 > 300 stored.
  assert folds.subsample_counts([100, 300, 500], imbalance=5).tolist() == [100, 44, 20]
  assert folds.subsample_counts([3, 3], fraction=0.01).tolist() == [1, 1]


def test_train_subsample_is_nested_and_leaves_val_and_test(tmp_path):
  cfg = tiny_config(tmp_path).data
  whole, _ = data.load_dataset(cfg)
  cfg.train_fraction = 0.5
  half, _ = data.load_dataset(cfg)
  cfg.train_fraction = 0.25
  quarter, _ = data.load_dataset(cfg)
  assert len(half["val"]) == len(whole["val"]) and len(half["test"]) == len(whole["test"])
  key = lambda s: {s[i]["image"].tobytes() for i in range(len(s))}  # noqa: E731
  assert key(quarter["train"]) <= key(half["train"]) <= key(whole["train"])
  counts = np.bincount(np.asarray(whole["train"].labels).ravel())
  assert np.bincount(np.asarray(half["train"].labels).ravel()).tolist() == [
      max(1, int(k * 0.5)) for k in counts]
  cfg.train_fraction, cfg.train_imbalance = 1.0, 4.0
  imb, _ = data.load_dataset(cfg)
  got = np.bincount(np.asarray(imb["train"].labels).ravel())
  assert got[0] / got[-1] == pytest.approx(4.0, rel=0.1)
  cfg.train_fraction = 0.0
  with pytest.raises(ValueError, match=r"config.data.train_fraction=0.0"):
    data.load_dataset(cfg)


def _rows(workdir, split):
  with open(workdir / "metrics.jsonl") as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def test_trajectory_indicators_at_every_eval(tmp_path):
  """A linear probe leaves backbone and BatchNorm bit-identical, so every evaluation must find
  CKA 1 at every layer and the same source-task accuracies as the pretrained model's; full
  fine-tuning moves them. The final similarity row is the one results.json reports."""
  src = dict(tiny_config(tmp_path).data.to_dict(), name="natural", num_classes=4)
  pre = tiny_config(tmp_path, **{"data.name": "natural", "data.num_classes": 4,
                                 "train.num_steps": 30})
  train.train_and_evaluate(pre, str(tmp_path / "pre"))
  runs = {}
  for method in ("linear_probe", "full_ft"):
    c = tiny_config(tmp_path, **{"model.init": str(tmp_path / "pre"), "method.name": method,
                                 "train.eval_every": 10, "optim.lr": 0.2,
                                 "analysis.eval_similarity": True})
    c.analysis.source_data.update(src)
    c.analysis.source_bank_size = 128
    runs[method] = (train.train_and_evaluate(c, str(tmp_path / method)), tmp_path / method)
  res, wd = runs["linear_probe"]
  sims, source = _rows(wd, "similarity"), _rows(wd, "source")
  assert [r["step"] for r in sims] == [10, 20] == [r["step"] for r in source]
  for r in sims:
    assert min(v for k, v in r.items() if k.startswith("linear_cka/")) > 1 - 1e-5
  assert source[0]["knn_accuracy"] == source[1]["knn_accuracy"]
  assert source[0]["linear_probe_accuracy"] == source[1]["linear_probe_accuracy"]
  assert res["final"]["source"] == {k: source[1][k] for k in res["final"]["source"]}
  res_ft, wd_ft = runs["full_ft"]
  sims_ft = _rows(wd_ft, "similarity")
  assert sims_ft[-1]["linear_cka/pre_logits"] < 0.99
  assert res_ft["similarity"]["linear_cka"]["pre_logits"] == sims_ft[-1]["linear_cka/pre_logits"]
  assert "ece" in res_ft["final"]["test"]


def test_source_task_of_another_shape_is_refused(tmp_path):
  c = tiny_config(tmp_path)
  c.analysis.source_data.update(dict(c.data.to_dict(), name="natural", size=24))
  with pytest.raises(ValueError, match=r"config.analysis.source_data: the model sees"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
