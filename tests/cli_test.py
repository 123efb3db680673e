"""Each job of the README through `python -m repsim_jax.main`, as a user types it, on tiny data.

pretrain -> default run -> analyze its stages -> transferability of a published-weights file and a
pretraining run -> sweep of the same sources ranked against those scores.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R18 = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "torchvision_resnet18.safetensors")
TINY = ("data.train_size=96", "data.val_size=32", "data.test_size=32", "train.tensorboard=False")


def main(*args, devices=2):
  out = subprocess.run([sys.executable, "-m", "repsim_jax.main", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ,
                                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"))
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return out.stdout


def overrides(*keys, prefix=""):
  return [f"--config.{prefix}{k}" for k in keys]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def pretrained(root):
  wd = root / "pretrain"
  out = main("--config=configs/pretrain.py:model=small_cnn,dataset=natural,size=16,steps=3,batch=16",
             *overrides(f"data.data_dir={root / 'data'}", *TINY), f"--workdir={wd}")
  assert f"done: {wd}/results.json" in out
  return wd


def test_pretrain(pretrained):
  saved = json.load(open(pretrained / "results.json"))
  cfg = json.load(open(pretrained / "config.json"))
  assert saved["step"] == 3 and cfg["model"]["name"] == "small_cnn"
  assert os.path.isdir(pretrained / "checkpoints" / "3")


@pytest.mark.parametrize("objective", ["simclr", pytest.param("byol", marks=pytest.mark.slow),
                                       pytest.param("dino", marks=pytest.mark.slow)])
def test_ssl_pretrain_then_finetune_from_it(root, objective):
  """The README's SSL pretraining (on 2 devices), then fine-tuning from its run directory."""
  wd = root / f"ssl_{objective}"
  out = main(f"--config=configs/pretrain.py:objective={objective},model=small_cnn,"
             "dataset=medical_gray,size=16,steps=3,batch=16",
             *overrides(f"data.data_dir={root / 'data'}", *TINY, "ssl.hidden_dim=32",
                        "ssl.out_dim=64", "ssl.local_crops=2"), f"--workdir={wd}")
  assert f"done: {wd}/results.json" in out
  saved = json.load(open(wd / "results.json"))
  assert saved["objective"] == objective and 0 <= saved["final"]["val"]["knn_accuracy"] <= 1
  ft = root / f"ft_{objective}"
  main(f"--config=configs/finetune.py:model=small_cnn,source=synthetic,dataset=medical_gray,"
       f"size=16,steps=2,batch=16,init={wd}",
       *overrides(f"data.data_dir={root / 'data'}", *TINY), f"--workdir={ft}")
  assert json.load(open(ft / "results.json"))["final"]["test"]["num_examples"] == 32


@pytest.fixture(scope="module")
def default_run(root):
  wd = root / "default"
  stage_keys = [k for s in ("pretrain.", "finetune.")
                for k in overrides(*TINY, "analysis.max_examples=32", prefix=s)]
  # Stage-wide keys once: where the data lives, and the devices.
  out = main("--config=configs/default.py:pretrain_steps=3,finetune_steps=3,size=16,model=small_cnn",
             f"--config.data_dir={root / 'data'}", "--config.parallel.num_devices=1", *stage_keys,
             f"--workdir={wd}")
  return wd, out


def test_default_run(default_run):
  wd, out = default_run
  for stage in ("pretrain", "finetune_full_ft", "finetune_repsim"):
    assert json.load(open(wd / stage / "results.json"))["step"] == 3
    cfg = json.load(open(wd / stage / "config.json"))
    assert cfg["parallel"]["num_devices"] == 1 and cfg["data"]["data_dir"] == str(wd.parent / "data")
  assert "repsim" in out and "full_ft" in out


@pytest.mark.slow  # the default selection's time budget: among its slowest
def test_analyze(root, default_run):
  wd, _ = default_run
  out_dir = root / "analysis"
  out = main(f"--config=configs/analyze.py:run={wd / 'finetune_repsim'},"
             f"baseline={wd / 'finetune_full_ft'},max_examples=32,batch=16", f"--workdir={out_dir}")
  report = json.load(open(out_dir / "report.json"))
  sim = pd.read_csv(out_dir / "similarity.csv")
  # Fine-tuned 3 steps from the pretraining run: its stem still resembles the start.
  assert set(sim.columns) >= {"layer", "linear_cka"}
  assert 0.5 < float(sim.loc[sim.layer == "block1", "linear_cka"].iloc[0]) <= 1 + 1e-6
  assert "sharpness" in report and "linear_cka" in out


@pytest.fixture(scope="module")
def transfer(root, pretrained):
  wd = root / "transfer"
  out = main("--config=configs/transferability.py:target=medical_gray,source=synthetic,size=16,"
             f"batch=16,sources=tv=resnet18@{R18};ours={pretrained}",
             *overrides(f"data.data_dir={root / 'data'}", "data.train_size=64", "data.val_size=32",
                        "data.test_size=32", "data.num_classes=3", "lp.steps=20"),
             f"--workdir={wd}")
  return wd, out


def test_transferability_of_a_weights_file_and_a_run(transfer, root):
  from repsim_jax import checkpoint, data, models
  from repsim_jax.data import pipeline
  from repsim_jax.jobs import transferability as job
  wd, out = transfer
  scores = pd.read_csv(wd / "scores.csv")
  assert set(scores.source) == {"tv", "ours"}
  assert np.isfinite(scores.value).all()
  # The published weights were used: the cached features are those of a plain forward pass.
  cfg = json.load(open(wd / "config.json"))
  import ml_collections
  splits, _ = data.load_dataset(ml_collections.ConfigDict(cfg["data"]))
  variables = checkpoint.load_pretrained(R18, "resnet18")
  model = models.get_model("resnet18", 1000)
  images = np.concatenate([b["image"][b["mask"] > 0] for b in pipeline.make_eval_iter(
      splits["train"], global_batch_size=32, image_size=16, channels=3,
      mean=tuple(cfg["data"]["mean"]), std=tuple(cfg["data"]["std"]))])
  _, reps = model.apply(variables, images, train=False)
  cache, _ = job.load_cache(job.cache_path(str(wd), "tv", "medical_gray"))
  np.testing.assert_allclose(cache["features"], np.asarray(reps["pre_logits"]), rtol=1e-4,
                             atol=1e-4)
  assert "Transferability to medical_gray" in out


@pytest.mark.slow  # the default selection's time budget: among its slowest
def test_sweep_ranks_the_scores(root, transfer, pretrained):
  twd, _ = transfer
  wd = root / "sweep"
  main("--config=configs/sweep.py:targets=medical_gray,source=synthetic,size=16,lrs=1e-2,steps=2,"
       f"batch=16,sources=tv=resnet18@{R18};ours={pretrained},scores={twd / 'scores.csv'}",
       *overrides(f"data.data_dir={root / 'data'}", "data.train_size=64", "data.val_size=32",
                  "data.test_size=32", "data.num_classes=3", "train.tensorboard=False",
                  "train.checkpoint_every=0"),
       f"--workdir={wd}")
  truth = pd.read_csv(wd / "ground_truth.csv")
  assert sorted(truth.source) == ["ours", "tv"]
  assert ((0 <= truth.value) & (truth.value <= 1)).all()
  assert os.listdir(wd / "ranking")
