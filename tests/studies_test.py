"""The study conventions (`repsim_jax.studies`) and every study in experiments/: report numbers
equal the CSVs (checked on synthetic result rows, no training), and end to end on tiny data with a
re-run that trains nothing (slow)."""

import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from repsim_jax import config_lib, studies
import _modules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def study(name):
  return _modules.load(f"experiments/{name}.py")


def assert_report_tables_match_csvs(workdir):
  """Every number in a table of report.md is a value of one of the study's CSVs, printed with
  the same number of decimals. Checked: the cells that hold numbers alone (`0.1234`,
  `0.12 ± 0.01`, `+30 %`); names (`repsim_lam0.3`) and sentences are not figures."""
  values = []
  for name in os.listdir(workdir):
    if name.endswith(".csv"):
      df = pd.read_csv(os.path.join(workdir, name))
      values += [float(v) for v in df.select_dtypes("number").to_numpy().ravel()
                 if np.isfinite(v)]
  printed = {d: {f"{v:.{d}f}" for v in values} for d in range(1, 7)}
  report = open(os.path.join(workdir, "report.md")).read()
  checked = 0
  for line in report.splitlines():
    if not line.startswith("|") or set(line) <= set("|- "):
      continue
    cells = [c for c in line.strip().strip("|").split("|")
             if re.fullmatch(r"[\s\d.,+\-−±%()*]*", c)]
    for token in re.findall(r"-?\d+\.\d+", " ".join(cells)):
      decimals = len(token.split(".")[1])
      assert token in printed[decimals] or token.lstrip("-") == f"{0:.{decimals}f}", (
          f"{token} in report.md is in no CSV: {line}")
      checked += 1
  assert checked > 0
  return report


# -- the shared layer ------------------------------------------------------------------------
def test_run_names_set_keys_and_settings():
  run = studies.Run(config_lib.train_config(), {"target": "medical_gray", "method": "repsim",
                                                "seed": 1, "p": 0.5})
  assert run.name == "medical_gray_repsim_seed1_p0.5"
  c = studies.set_keys(config_lib.train_config(), {"optim.lr": 0.3, "train.eval_splits": ["val"]})
  assert c.optim.lr == 0.3 and c.train.eval_splits == ("val",)
  with pytest.raises(ValueError, match=r"optim.lrr: no such config key"):
    studies.set_keys(c, {"optim.lrr": 1.0})
  settings = {"small": dict(seeds="0,1", steps=10, lam=0.3, target={"x": 1}), "full": dict(
      seeds="0,1,2", steps=100, lam=1.0, target={"x": 2})}
  workdir, s = studies.parse_settings("doc\nmore", settings, ["--workdir=w", "--setting=full",
                                                              "--steps=7"])
  assert s.pop("launch").executor == "inline"
  assert workdir == "w" and s == dict(seeds="0,1,2", steps=7, lam=1.0, target={"x": 2})
  _, s = studies.parse_settings("doc", settings, ["--workdir=w", "--executor=local",
                                                  "--workers=3"])
  assert (s["launch"].executor, s["launch"].workers) == ("local", 3)
  with pytest.raises(SystemExit):
    studies.parse_settings("doc", settings, ["--workdir=w", "--target=3"])
  assert studies.csv_list("0, 1,,2", int) == [0, 1, 2]
  assert studies.pm(0.5, float("nan")) == "0.5000 ± 0.0000"


def test_markdown_table_and_atomic_outputs(tmp_path):
  df = pd.DataFrame({"method": ["a", "b"], "n": [3, 4], "x": [0.123456, float("nan")]})
  assert studies.markdown_table(df, {"method": "m", "x": "x"}, digits=3) == [
      "| m | x |", "| --- | --- |", "| a | 0.123 |", "| b | n/a |"]

  def broken(path):
    raise RuntimeError("figure failed")

  with pytest.raises(RuntimeError):
    studies.write_outputs(str(tmp_path), {"results": df}, {"f.png": broken}, ["# r"])
  # The CSV came before the figure; the report (written last) is not there, nor a temporary.
  assert sorted(os.listdir(tmp_path)) == ["results.csv"]


def test_execute_reads_a_finished_run_back(tmp_path, capsys):
  from train_test import tiny_config
  run = studies.Run(tiny_config(tmp_path, **{"train.num_steps": 4}), {"method": "full_ft"})
  (first,) = studies.execute(str(tmp_path), [run])
  (again,) = studies.execute(str(tmp_path), [run])
  assert "already finished" in capsys.readouterr().out
  assert first == again and first["run_dir"].startswith("runs/full_ft-")
  # Another name for the same config is the same run, trained once.
  twin = studies.Run(run.cfg, {"method": "same"})
  a, b = studies.execute(str(tmp_path / "twins"), [run, twin])
  assert a == b and len(os.listdir(tmp_path / "twins" / "runs")) == 1


# -- report numbers equal the CSVs (no training) ---------------------------------------------
def test_baselines_report(tmp_path):
  rng = np.random.default_rng(0)
  rows = [{"target": t, "method": m, "seed": s, "accuracy": rng.uniform(0.4, 0.8),
           "balanced_accuracy": rng.uniform(0.4, 0.8), "auc": rng.uniform(0.6, 0.9),
           "cka_stem": rng.uniform(0.8, 1), "cka_pre_logits": rng.uniform(0.2, 0.9),
           "sam_sharpness": rng.uniform(0.05, 0.3), "hessian_top_eigenvalue": rng.uniform(10, 90),
           "run": "x"}
          for t in ("a", "b") for m in ("full_ft", "sam", "repsim") for s in range(3)]
  df = pd.DataFrame(rows)
  mod = study("baselines")
  mod.write_outputs(df, str(tmp_path))
  report = assert_report_tables_match_csvs(str(tmp_path))
  mean = df.groupby(["target", "method"]).mean(numeric_only=True)
  change = np.mean([mean.loc[(t, "repsim"), "cka_pre_logits"] / mean.loc[(t, "full_ft"),
                                                                         "cka_pre_logits"] - 1
                    for t in ("a", "b")])
  assert f"Similarity (+30% CKA at pre_logits): {100 * change:+.1f}% here" in report
  assert (tmp_path / "metrics.png").stat().st_size > 10_000


def test_baselines_report_keeps_each_methods_strength_with_the_best_val_accuracy(tmp_path):
  """With a strength grid, every table and plot shows the strength whose seed-mean val accuracy
  is highest per target; results.csv keeps every run, strengths.csv every candidate."""
  mod = study("baselines")
  rng = np.random.default_rng(2)
  rows = []
  for t in ("a", "b"):
    for m, strengths in (("full_ft", ["default"]), ("delta", ["alpha=0.001", "alpha=0.01"]),
                         ("repsim", ["default"])):
      for st in strengths:
        for s in range(2):
          # delta's val accuracy is highest at alpha=0.001 on a, at alpha=0.01 on b
          good = (t == "a") == (st == "alpha=0.001")
          rows.append({"target": t, "method": m, "strength": st, "seed": s,
                       "accuracy": 0.9 if good else 0.3, "val_accuracy": 0.8 if good else 0.4,
                       "balanced_accuracy": 0.5, "auc": rng.uniform(0.6, 0.9),
                       "cka_stem": 0.9, "cka_pre_logits": rng.uniform(0.2, 0.9),
                       "sam_sharpness": rng.uniform(0.05, 0.3),
                       "hessian_top_eigenvalue": rng.uniform(10, 90), "run": "x"})
  df = pd.DataFrame(rows)
  mod.write_outputs(df, str(tmp_path))
  report = assert_report_tables_match_csvs(str(tmp_path))
  assert "## Strengths chosen on validation accuracy" in report
  cand = pd.read_csv(tmp_path / "strengths.csv")
  chosen = cand[cand.selected & (cand.method == "delta")].set_index("target").strength
  assert dict(chosen) == {"a": "alpha=0.001", "b": "alpha=0.01"}
  summary = pd.read_csv(tmp_path / "summary.csv").set_index(["target", "method"])
  assert summary.loc[("a", "delta"), "accuracy_mean"] == pytest.approx(0.9)
  assert summary.loc[("b", "delta"), "accuracy_count"] == 2  # the chosen strength's seeds only
  assert len(pd.read_csv(tmp_path / "results.csv")) == len(df)
  repsim = config_lib.method_config("repsim")
  assert mod.strength_grid("delta.lam=0.001,0.01;bss.lam=1", repsim) == {
      "delta": ("lam", [0.001, 0.01]), "bss": ("lam", [1.0])}
  for bad, says in (("dleta.lam=1", "expected <method>.<key>"), ("delta.lma=1", "no key 'lma'"),
                    ("delta.lam=x", "must be numbers"),
                    ("delta.alpha=1", "method 'delta' does not read config.method.alpha")):
    with pytest.raises(ValueError, match=says):
      mod.strength_grid(bad, repsim)


def _trajectory_rows():
  rng = np.random.default_rng(1)
  rows = []
  for src in ("supervised", "simclr"):
    for m in ("full_ft", "repsim", "linear_probe"):
      for seed in range(2):
        for step in (10, 20, 30):
          cka = rng.uniform(0.2, 1.0)
          rows.append({"source": src, "method": m, "seed": seed, "step": step,
                       "accuracy": 0.3 + 0.3 * cka + rng.normal(0, 0.02), "auc": 0.7,
                       "ece": rng.uniform(0, 0.2), "knn_accuracy": 0.1 + 0.5 * cka,
                       "linear_probe_accuracy": rng.uniform(0.1, 0.6), "cka_stem": 0.9,
                       "sam_sharpness": rng.uniform(0.01, 0.2),
                       "cka_layer1": rng.uniform(0.5, 1.0), "cka_pre_logits": cka})
  for seed in range(2):
    for step in (10, 20, 30):
      rows.append({"source": "none", "method": "scratch", "seed": seed, "step": step,
                   "accuracy": 0.4, "auc": 0.6, "ece": 0.1, "knn_accuracy": 0.2,
                   "linear_probe_accuracy": 0.2})
  return pd.DataFrame(rows)


def test_trajectories_report(tmp_path):
  from scipy import stats
  df = _trajectory_rows()
  study("trajectories").write_outputs(df, str(tmp_path))
  report = assert_report_tables_match_csvs(str(tmp_path))
  fits = pd.read_csv(tmp_path / "fits.csv")
  pre = df[df.method != "scratch"]
  r = stats.linregress(pre.cka_pre_logits, pre.knn_accuracy)
  row = fits[(fits.group == "all") & (fits.layer == "pre_logits")
             & (fits.indicator == "knn_accuracy")].iloc[0]
  assert row.r == pytest.approx(1.0) and row.slope == pytest.approx(r.slope)
  assert row.n == len(pre)
  assert "## Findings" in report and "(third finding" in report
  for name in ("trajectories.png", "indicators.png", "sharpness.png"):
    assert (tmp_path / name).stat().st_size > 10_000


def test_transfer_vs_ssl_report(tmp_path):
  rng = np.random.default_rng(2)
  rows = [{"factor": f, "level": lv, "source": s, "seed": seed,
           **{m: rng.uniform(0.3, 0.9) for m in ("accuracy", "balanced_accuracy", "auc", "f1")},
           "run": "x"}
          for f, levels in (("imbalance", ("1", "5")), ("scarcity", ("0.1", "1")),
                            ("domain", ("near", "far")))
          for lv in levels for s in ("supervised", "simclr", "byol") for seed in range(2)]
  df = pd.DataFrame(rows)
  study("transfer_vs_ssl").write_outputs(df, str(tmp_path))
  report = assert_report_tables_match_csvs(str(tmp_path))
  best = pd.read_csv(tmp_path / "best.csv", dtype={"level": str})
  g = df[(df.factor == "imbalance") & (df.level == "5")].groupby("source").balanced_accuracy.mean()
  r = best[(best.factor == "imbalance") & (best.level == "5")].iloc[0]
  assert r.best_source == g.idxmax()
  assert r.ssl_minus_supervised_points == pytest.approx(
      100 * (g.drop("supervised").max() - g["supervised"]))
  assert f"SSL beats supervised at {int((best.ssl_minus_supervised_points > 0).sum())} of 6" in report
  for axis in ("imbalance", "scarcity", "domain"):
    assert (tmp_path / f"{axis}.png").stat().st_size > 10_000


def test_transferability_report(tmp_path):
  rng = np.random.default_rng(3)
  sources, targets = ["s1", "s2", "s3", "s4"], ["t1", "t2", "t3"]
  truth = pd.DataFrame([{"source": s, "target": t, "metric": "auc", "value": rng.uniform(0.5, 1)}
                        for s in sources for t in targets])
  scores = pd.DataFrame([{"source": s, "target": t, "score": k, "value": rng.normal()}
                         for s in sources for t in targets for k in ("logme", "leep", "lp")])
  (tmp_path / "scores").mkdir()
  (tmp_path / "sweep").mkdir()
  scores.to_csv(tmp_path / "scores" / "scores.csv", index=False)
  truth.to_csv(tmp_path / "sweep" / "ground_truth.csv", index=False)
  from repsim_jax.transferability import ranking
  summary = ranking.rank_scores(tmp_path / "scores" / "scores.csv",
                                tmp_path / "sweep" / "ground_truth.csv",
                                tmp_path / "sweep" / "ranking")
  study("transferability").write_outputs(str(tmp_path))
  report = assert_report_tables_match_csvs(str(tmp_path))
  mean = pd.read_csv(tmp_path / "mean_tau.csv").set_index("score").mean_tau
  assert mean.to_dict() == pytest.approx(summary["mean_tau"])
  assert "Friedman test over 3 targets" in report
  assert (tmp_path / "critical_difference.png").exists()


def test_repsim_vs_ft_report(tmp_path):
  df = pd.DataFrame({"method": ["full_ft"] * 2 + ["repsim_lam0.3"] * 2, "seed": [0, 1, 0, 1],
                     "accuracy": [0.6, 0.62, 0.605, 0.6], "auc": [0.8] * 4,
                     "balanced_accuracy": [0.5] * 4, "cka_stem": [0.9, 0.95, 0.97, 0.96],
                     "cka_pre_logits": [0.4, 0.2, 0.6, 0.6]})
  study("repsim_vs_ft").write_outputs(df, str(tmp_path))
  report = assert_report_tables_match_csvs(str(tmp_path))
  assert "| repsim_lam0.3 | 0.6025 | 0.8000 | 0.6000 | 100.0000 | -0.7500 |" in report


def test_repsim_headline_arithmetic():
  df = pd.DataFrame({"method": ["full_ft", "full_ft", "repsim_lam0.3", "repsim_lam0.3"],
                     "seed": [0, 1, 0, 1], "accuracy": [0.60, 0.62, 0.605, 0.60],
                     "auc": [0.8, 0.8, 0.8, 0.8], "cka_pre_logits": [0.4, 0.2, 0.6, 0.6]})
  h = study("repsim_vs_ft").headline(df)
  assert h.loc["repsim_lam0.3", "cka_relative_change"] == pytest.approx(0.6 / 0.3 - 1)
  assert h.loc["repsim_lam0.3", "accuracy_points_vs_ft"] == pytest.approx(100 * (0.6025 - 0.61))
  assert h.loc["full_ft", "cka_relative_change"] == 0.0


@pytest.mark.slow
def test_repsim_keeps_30pct_more_cka_at_competitive_accuracy(tmp_path):
  """DESIGN/issue: >= 30% higher CKA at pre_logits than full fine-tuning, accuracy within 2
  points, averaged over 3 seeds, on the default run's synthetic target (the `small` setting)."""
  mod = study("repsim_vs_ft")
  df = mod.run_study(str(tmp_path), dict(mod.SETTINGS["small"], data_dir=str(tmp_path / "data")))
  h = mod.headline(df).loc["repsim_lam0.3"]
  assert h.cka_relative_change >= 0.30
  assert abs(h.accuracy_points_vs_ft) <= 2.0


# -- end to end on tiny data (slow) ----------------------------------------------------------
TINY = dict(size=16, pretrain_steps=30, ssl_steps=20, finetune_steps=20, batch=32)


def _end_to_end(name, workdir, capsys, setting="small", **values):
  mod = study(name)
  s = {**mod.SETTINGS[setting], **{k: v for k, v in TINY.items() if k in mod.SETTINGS[setting]},
       **values}
  mod.run_study(str(workdir), s)
  first = capsys.readouterr().out
  assert_report_tables_match_csvs(str(workdir))
  mod.run_study(str(workdir), s)
  again = capsys.readouterr().out
  assert " step " not in again, "a re-run trained again"
  return first, again


@pytest.mark.slow
def test_baselines_end_to_end(tmp_path, capsys):
  _end_to_end("baselines", tmp_path, capsys, targets="medical_gray",
              methods="full_ft,linear_probe,repsim", seeds="0,1", strengths="repsim.lam=0.3,3")
  df = pd.read_csv(tmp_path / "results.csv")
  assert sorted(set(df[df.method == "repsim"].strength)) == ["lam=0.3", "lam=3"]
  assert len(pd.read_csv(tmp_path / "summary.csv")) == 3  # one strength per method reported
  lp = df[df.method == "linear_probe"]
  assert np.allclose(lp.cka_stem, 1.0, atol=1e-5)  # a frozen backbone keeps its representation
  curves = pd.read_csv(tmp_path / "sharpness_curves.csv")
  assert len(curves) == (len(df) - 2) * 10 and (curves.sam_sharpness > 0).all()  # every 2 of 20
  # steps, of the reported runs (one of repsim's two strengths)
  assert (tmp_path / "sharpness_over_training.png").stat().st_size > 10_000


@pytest.mark.slow
def test_trajectories_end_to_end(tmp_path, capsys):
  _end_to_end("trajectories", tmp_path, capsys, methods="full_ft,linear_probe,scratch",
              seeds="0", evals=2)
  df = pd.read_csv(tmp_path / "trajectories.csv")
  assert len(df) == (2 * 2 + 1) * 2  # (2 methods x 2 sources + scratch) x 2 evaluations
  lp = df[df.method == "linear_probe"]
  assert np.allclose(lp.cka_pre_logits, 1.0, atol=1e-5)
  assert (df.sam_sharpness.notna() & (df.sam_sharpness > 0)).all()  # in-step, every evaluation
  assert (tmp_path / "sharpness.png").stat().st_size > 10_000


@pytest.mark.slow
def test_transfer_vs_ssl_end_to_end(tmp_path, capsys):
  _end_to_end("transfer_vs_ssl", tmp_path, capsys, objectives="supervised,byol", seeds="0",
              train_size=400, imbalances="1,5", fractions="0.1",
              domains="near=natural,far=medical_rgb")
  df = pd.read_csv(tmp_path / "results.csv")
  assert len(df) == 5 * 2


@pytest.mark.slow
def test_transferability_end_to_end(tmp_path, capsys):
  _end_to_end("transferability", tmp_path, capsys,
              sources="a=supervised:natural,b=supervised:medical_rgb,c=simclr:natural",
              targets="natural,medical_gray", lrs="0.01", max_examples=200)
  truth = pd.read_csv(tmp_path / "ground_truth.csv")
  assert len(truth) == 3 * 2


# -- the `full` settings, on files in the formats users download ------------------------------
# Each study's `full` setting with its real loaders and weight readers: MedMNIST npz files
# (random images, every class present), a prepared TFDS set for the SSL / indicator source, and
# torchvision-layout checkpoints, at tiny sizes; only the names and sizes are overridden.
PTH = os.path.join(REPO, "tests", "fixtures", "resnet_small_torchvision.pth")
R18 = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "torchvision_resnet18.safetensors")
FULL_TINY = dict(model="resnet_small", size=28, pretrain_steps=0, ssl_steps=0, finetune_steps=2,
                 batch=16, seeds="0")


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
  """A data dir as a user's: `<name>.npz` for the MedMNIST sets the full settings name, and the
  tiny TFDS set of tests/data_test.py (`reprsim_tiny_med`, prepared)."""
  from repsim_jax.data import medmnist
  root = tmp_path_factory.mktemp("downloads")
  rng = np.random.default_rng(0)
  for name in ("pathmnist", "dermamnist", "bloodmnist", "breastmnist", "pneumoniamnist",
               "organamnist"):
    spec = medmnist.medmnist_spec(name, 28)
    arrays = {}
    for split, n in (("train", 64), ("val", 24), ("test", 24)):
      shape = (n, 28, 28) + ((3,) if spec.channels == 3 else ())
      arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
      arrays[f"{split}_labels"] = (np.arange(n) % spec.num_classes).reshape(n, 1)
    np.savez(root / medmnist.medmnist_filename(name, 28), **arrays)
  _modules.load("tests/data_test.py")._build_tiny_tfds(root)
  return str(root)


def _full(name, tmp_path, capsys, downloads, **values):
  """Runs the study's `full` setting twice (the second trains nothing); returns the data sets
  and weights its fine-tuning runs read: {(data.source, data.name, model.init)}."""
  tiny = {k: v for k, v in FULL_TINY.items() if k in study(name).SETTINGS["full"]}
  _end_to_end(name, tmp_path, capsys, "full", **{**tiny, "data_dir": downloads, **values})
  read = set()
  for root, _, files in os.walk(tmp_path):
    if "config.json" in files and "results.json" in files:
      c = json.load(open(os.path.join(root, "config.json")))
      if c.get("objective", "supervised") == "supervised" and c["data"]["source"] == "medmnist":
        assert c["data"]["data_dir"] == downloads
        read.add((c["data"]["source"], c["data"]["name"], c["model"]["init"]))
  return read


@pytest.mark.slow
def test_repsim_vs_ft_full_setting(tmp_path, capsys, downloads):
  read = _full("repsim_vs_ft", tmp_path, capsys, downloads, source=PTH, lams="0.3")
  assert read == {("medmnist", "dermamnist", PTH)}
  assert sorted(pd.read_csv(tmp_path / "results.csv").method) == ["full_ft", "repsim_lam0.3"]


@pytest.mark.slow
def test_baselines_full_setting(tmp_path, capsys, downloads):
  read = _full("baselines", tmp_path, capsys, downloads, source=PTH,
               targets="breastmnist,bloodmnist", methods="full_ft,repsim")
  assert read == {("medmnist", "breastmnist", PTH), ("medmnist", "bloodmnist", PTH)}
  df = pd.read_csv(tmp_path / "results.csv")
  assert len(df) == 4 and df.hessian_top_eigenvalue.notna().all()


@pytest.mark.slow
def test_trajectories_full_setting(tmp_path, capsys, downloads):
  read = _full("trajectories", tmp_path, capsys, downloads, sources=f"imagenet={PTH}",
               methods="full_ft,linear_probe", finetune_steps=4, evals=2,
               source_data="reprsim_tiny_med")
  assert read == {("medmnist", "dermamnist", PTH)}
  df = pd.read_csv(tmp_path / "trajectories.csv")
  assert len(df) == 2 * 2 and df.knn_accuracy.between(0, 1).all()
  # The source-task indicators are measured on the prepared TFDS set's val split (5 images).
  run = next(d for d in os.listdir(tmp_path / "runs") if d.startswith("imagenet"))
  src = json.load(open(tmp_path / "runs" / run / "config.json"))["analysis"]["source_data"]
  assert (src["source"], src["name"]) == ("tfds", "reprsim_tiny_med")
  assert np.allclose(df.knn_accuracy * 5, np.round(df.knn_accuracy * 5))


@pytest.mark.slow
def test_transfer_vs_ssl_full_setting(tmp_path, capsys, downloads):
  read = _full("transfer_vs_ssl", tmp_path, capsys, downloads, source="reprsim_tiny_med",
               objectives="supervised,simclr", pretrain_steps=3, ssl_steps=3, imbalances="1,5",
               fractions="0.5", domains="gray=pneumoniamnist")
  # Both sources pretrained here on the TFDS set, then fine-tuned on the two MedMNIST sets.
  assert {name for _, name, _ in read} == {"dermamnist", "pneumoniamnist"}
  inits = {init for _, _, init in read}
  assert len(inits) == 2
  for init in inits:
    assert json.load(open(os.path.join(init, "config.json")))["data"]["source"] == "tfds"
  assert len(pd.read_csv(tmp_path / "results.csv")) == 2 * 4


@pytest.mark.slow
def test_transferability_full_setting(tmp_path, capsys, downloads):
  read = _full("transferability", tmp_path, capsys, downloads,
               extra_sources=f"small=resnet_small@{PTH};r18=resnet18@{R18}",
               targets="breastmnist,dermamnist", lrs="1e-2")
  assert read == {("medmnist", t, w) for t in ("breastmnist", "dermamnist") for w in (PTH, R18)}
  truth = pd.read_csv(tmp_path / "ground_truth.csv")
  assert len(truth) == 2 * 2


@pytest.mark.slow
def test_confounders_full_setting(tmp_path, capsys, downloads):
  read = _full("confounders", tmp_path, capsys, downloads,
               target=dict(source="medmnist", name="pneumoniamnist", size=28),
               sources=f"imagenet={PTH},random=", kinds="tag", ps="0,1", folds=2,
               methods="full_ft")
  assert read == {("medmnist", "pneumoniamnist", PTH), ("medmnist", "pneumoniamnist", "")}
  df = pd.read_csv(tmp_path / "results.csv")
  assert len(df) == 2 * 2 * 2  # sources x p x folds
