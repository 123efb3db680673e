"""Similarity and sharpness tracked during training, and the offline `analyze` job."""

import json
import os

import jax
import numpy as np
import pytest

from repsim_jax import checkpoint, config_lib, data, evaluation, metric_writers, models
from repsim_jax import sharpness
from repsim_jax.jobs import analyze as analysis
from repsim_jax import train
from train_test import tiny_config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("pre")
  wd = str(tmp / "run")
  train.train_and_evaluate(tiny_config(tmp, **{"train.num_steps": 6, "train.eval_splits": ()}), wd)
  return tmp, wd


def test_in_step_cka_is_one_when_the_backbone_cannot_move(pretrained):
  tmp, pre = pretrained
  cfg = tiny_config(tmp, **{"model.init": pre, "method.name": "linear_probe", "train.num_steps": 4,
                            "train.log_every": 2, "analysis.in_step_similarity": True,
                            "parallel.num_devices": 2, "train.eval_splits": ()})
  wd = str(tmp / "lp")
  train.train_and_evaluate(cfg, wd)
  rows = [r for r in metric_writers.read_metrics(wd) if r["split"] == "train"]
  assert [r["step"] for r in rows] == [2, 4]
  for r in rows:
    ckas = {k: v for k, v in r.items() if k.startswith("cka/")}
    assert set(ckas) == {"cka/block1", "cka/block2", "cka/block3", "cka/pre_logits"}
    np.testing.assert_allclose(list(ckas.values()), 1.0, atol=1e-5)


def test_in_step_cka_of_full_fine_tuning_drops_below_one(pretrained):
  tmp, pre = pretrained
  cfg = tiny_config(tmp, **{"model.init": pre, "train.num_steps": 6, "train.log_every": 3,
                            "optim.lr": 0.2, "analysis.in_step_similarity": True,
                            "train.eval_splits": ()})
  wd = str(tmp / "ft")
  res = train.train_and_evaluate(cfg, wd)
  last = [r for r in metric_writers.read_metrics(wd) if r["split"] == "train"][-1]
  assert 0.0 < last["cka/pre_logits"] < 0.999
  # The end-of-run comparison on the test split is written too.
  assert 0.0 < res["similarity"]["linear_cka"]["pre_logits"] < 0.999


def test_periodic_sharpness_matches_an_offline_report(pretrained):
  tmp, pre = pretrained
  cfg = tiny_config(tmp, **{"model.init": pre, "train.num_steps": 4, "train.eval_splits": ("val",),
                            "analysis.sharpness_every": 2, "analysis.probe_batches": 1,
                            "analysis.sharpness.measures": "sam,hessian_eig",
                            "analysis.sharpness.eig_iters": 5})
  wd = str(tmp / "sharp")
  res = train.train_and_evaluate(cfg, wd)
  rows = [r for r in metric_writers.read_metrics(wd) if r["split"] == "sharpness"]
  assert [r["step"] for r in rows] == [2, 4]
  # Recompute at the final weights, with the probe batch built independently from the arrays.
  splits, info = data.load_dataset(cfg.data)
  src = splits["val"]
  x = np.repeat(src.images[:32].astype(np.float32) / 255.0, 3, axis=-1)
  x = (x - 0.5) / 0.25
  probe = [{"image": x, "label": src.labels[:32]}]
  v = checkpoint.load_run_variables(wd)
  model = models.get_model("small_cnn", info.num_classes)
  loss_fn = jax.tree_util.Partial(evaluation.eval_loss, model, info.task, v["batch_stats"])
  offline = sharpness.sharpness_report(loss_fn, v["params"], probe, jax.random.PRNGKey(cfg.seed),
                                       cfg.analysis.sharpness)
  for k in ("loss", "sam_sharpness", "hessian_top_eigenvalue"):
    assert rows[-1][k] == pytest.approx(offline[k], rel=1e-4)
    assert res["final"]["sharpness"][k] == pytest.approx(offline[k], rel=1e-4)


def test_analyze_job_against_itself_and_the_pretrained_model(pretrained, tmp_path):
  tmp, pre = pretrained
  ft = str(tmp / "ft_for_analysis")
  train.train_and_evaluate(tiny_config(tmp, **{"model.init": pre, "train.num_steps": 4,
                                               "optim.lr": 0.2, "train.eval_splits": ()}), ft)
  cfg = config_lib.load_config("configs/analyze.py", f"run={ft},reference={ft},max_examples=64,batch=32")
  cfg.probe_batches = 1
  cfg.sharpness.measures = "sam"
  out = str(tmp_path / "self")
  report = analysis.run(cfg, out)
  for m in ("linear_cka", "linear_cka_debiased", "rbf_cka", "svcca", "rsa", "mutual_knn"):
    np.testing.assert_allclose(list(report["similarity"][m].values()), 1.0, atol=1e-4)
  np.testing.assert_allclose(list(report["similarity"]["procrustes_distance"].values()), 0.0,
                             atol=1e-4)
  cross = np.loadtxt(os.path.join(out, "cross_layer_linear_cka.csv"), delimiter=",", skiprows=1,
                     usecols=range(1, 5))
  np.testing.assert_allclose(np.diag(cross), 1.0, atol=1e-4)
  assert os.path.getsize(os.path.join(out, "cross_layer_linear_cka.png")) > 1000

  cfg = config_lib.load_config("configs/analyze.py", f"run={ft},baseline={pre},max_examples=64,batch=32")
  cfg.probe_batches = 1
  cfg.sharpness.measures = "sam"
  report = analysis.run(cfg, str(tmp_path / "vs_pre"))
  assert report["reference"] == pre  # default: the weights the run started from
  assert report["similarity"]["linear_cka"]["pre_logits"] < 0.999
  rel = report["sharpness_relative_change"]["sam_sharpness"]
  expected = (report["sharpness"]["sam_sharpness"] - report["baseline_sharpness"]["sam_sharpness"])
  assert rel == pytest.approx(expected / abs(report["baseline_sharpness"]["sam_sharpness"]))
  assert "## Sharpness" in open(tmp_path / "vs_pre" / "report.md").read()
  assert json.load(open(tmp_path / "vs_pre" / "report.json"))["num_examples"] == 64
