"""The whole training loop on tiny synthetic data: learning, outputs, data parallelism, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import ml_collections

from repsim_jax import checkpoint, config_lib, train
from repsim_jax.config_lib import set_keys  # noqa: F401  (the tests' dotted-key override)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tmp_path, **overrides):
  c = config_lib.train_config()
  c.data.source = "synthetic"
  c.data.name = "medical_gray"
  c.data.data_dir = str(tmp_path / "data")
  c.data.size = 16
  c.data.num_classes = 3
  c.data.train_size = 256
  c.data.val_size = 64
  c.data.test_size = 64
  c.data.difficulty = 0.2
  c.model.name = "small_cnn"
  c.optim.lr = 0.05
  c.optim.warmup_steps = 2
  c.train.batch_size = 32
  c.train.num_steps = 20
  c.train.log_every = 5
  c.train.checkpoint_every = 10
  c.train.tensorboard = False
  c.parallel.num_devices = 1
  return set_keys(c, overrides)


def max_rel_err(a, b):
  fa, fb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(fa) == len(fb)
  return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12)) for x, y in zip(fa, fb))


def test_loop_learns_and_writes_outputs(tmp_path):
  cfg = tiny_config(tmp_path, **{"train.num_steps": 60, "train.eval_every": 30})
  wd = str(tmp_path / "run")
  res = train.train_and_evaluate(cfg, wd)
  test = res["final"]["test"]
  assert test["num_examples"] == 64
  assert test["accuracy"] > 0.6  # 3 classes, chance 1/3
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == list(range(5, 61, 5))
  assert train_rows[-1]["loss"] < train_rows[0]["loss"]
  assert {r["split"] for r in rows} == {"train", "val", "test"}
  saved = json.load(open(os.path.join(wd, "results.json")))
  assert saved["final"]["test"]["accuracy"] == pytest.approx(test["accuracy"])
  assert json.load(open(os.path.join(wd, "config.json")))["model"]["name"] == "small_cnn"
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["50", "60"]  # keep 2


# The parallel-equality tests train at a learning rate where 20 steps are stable: at lr 0.05 this
# tiny run's loss jumps around and amplifies float32 summation-order differences (1 vs 8 shards:
# 8e-7 after 3 steps) to 2e-3 by step 20 on some CPUs, which measures chaos, not parallelism.
STABLE_LR = 0.02


@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_one_device_equals_eight_devices(tmp_path, backend):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated devices"
  finals = []
  for n in (1, 8):
    cfg = tiny_config(tmp_path, **{"parallel.num_devices": n, "parallel.backend": backend,
                                   "train.checkpoint_every": 0, "train.eval_splits": (),
                                   "optim.lr": STABLE_LR})
    finals.append(train.fit(cfg, str(tmp_path / f"{backend}_{n}")).state)
  assert int(finals[1].step) == 20
  assert max_rel_err(finals[1].params, finals[0].params) <= 1e-5
  assert max_rel_err(finals[1].batch_stats, finals[0].batch_stats) <= 1e-5


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
  data_dir = tmp_path / "data"
  common = ["--config=configs/finetune.py:model=small_cnn,source=synthetic,dataset=medical_gray,"
            "size=16,steps=40,batch=32,lr=0.05",
            f"--config.data.data_dir={data_dir}", "--config.data.train_size=256",
            "--config.data.num_classes=3", "--config.train.checkpoint_every=5",
            "--config.train.log_every=5", "--config.train.tensorboard=False",
            "--config.parallel.num_devices=1", "--config.train.eval_splits=()"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")

  def cmd(wd):
    return [sys.executable, "-m", "repsim_jax.main", *common, f"--workdir={wd}"]

  full = tmp_path / "full"
  subprocess.run(cmd(full), check=True, cwd=REPO, env=env, capture_output=True, timeout=600)

  killed = tmp_path / "killed"
  kill_after_checkpoint(cmd(killed), killed, 15, env)
  assert checkpoint.Checkpointer(str(killed)).latest_step() < 40
  out = subprocess.run(cmd(killed), check=True, cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert "resumed from" in out.stdout
  a = checkpoint.load_run_variables(str(full))
  b = checkpoint.load_run_variables(str(killed))
  assert max_rel_err(b, a) == 0.0


def kill_after_checkpoint(cmd, workdir, step: int, env) -> None:
  """Runs `cmd`, SIGKILLs it once a checkpoint of `step` or later is on disk."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if ckpts.is_dir() and any(d.isdigit() and int(d) >= step for d in os.listdir(ckpts)):
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run finished before it could be killed; make it longer"
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_config(tmp_path, **{"optim.lr": 1e9, "optim.warmup_steps": 0,
                                 "optim.schedule": "constant", "train.num_steps": 40,
                                 "train.checkpoint_every": 1, "train.log_every": 1,
                                 "optim.weight_decay": 0.0})
  wd = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match=r"non-finite loss, gradient, parameter or BatchNorm statistic at step \d+") as e:
    train.train_and_evaluate(cfg, wd)
  last = checkpoint.Checkpointer(wd).latest_step()
  assert f"last good checkpoint: step {last}" in str(e.value)
  v = checkpoint.load_run_variables(wd)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(v))


def test_checkpoint_from_other_model_is_a_clear_error(tmp_path):
  cfg = tiny_config(tmp_path, **{"train.num_steps": 2, "train.eval_splits": ()})
  wd = str(tmp_path / "a")
  train.train_and_evaluate(cfg, wd)
  narrower = {"model.kwargs": ml_collections.ConfigDict({"widths": (8, 16)})}
  other = tiny_config(tmp_path, **narrower, **{"model.init": wd, "train.num_steps": 2})
  with pytest.raises(ValueError, match="holds a different model"):
    train.train_and_evaluate(other, str(tmp_path / "b"))
  # Resuming a run dir with a different model is refused as well, not silently overwritten.
  with pytest.raises(ValueError, match=r"holds a run of another config \(model.kwargs.widths"):
    train.train_and_evaluate(tiny_config(tmp_path, **narrower, **{"train.num_steps": 4}), wd)


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_of_four_devices_equal_one_process(tmp_path):
  """Multi-host data parallelism (jax.distributed, gloo on CPU) gives the single-host result."""
  data_dir = tmp_path / "data"
  cfg = tiny_config(tmp_path, **{"parallel.num_devices": -1, "train.checkpoint_every": 10,
                                 "train.eval_splits": ("test",), "optim.lr": STABLE_LR})
  single = train.fit(cfg, str(tmp_path / "single"))
  port = _free_port()
  args = ["--config=configs/finetune.py:model=small_cnn,source=synthetic,dataset=medical_gray,"
          f"size=16,steps=20,batch=32,lr={STABLE_LR}",
          f"--config.data.data_dir={data_dir}", "--config.data.train_size=256",
          "--config.data.val_size=64", "--config.data.test_size=64", "--config.data.difficulty=0.2",
          "--config.data.num_classes=3", "--config.optim.warmup_steps=2",
          "--config.train.checkpoint_every=10", "--config.train.log_every=5",
          "--config.train.tensorboard=False", "--config.train.eval_splits=('test',)",
          f"--config.parallel.coordinator_address=localhost:{port}",
          "--config.parallel.num_processes=2", f"--workdir={tmp_path / 'multi'}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen([sys.executable, "-m", "repsim_jax.main", *args,
                             f"--config.parallel.process_id={i}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  multi = checkpoint.load_run_variables(str(tmp_path / "multi"))
  ref = single.state
  assert max_rel_err(multi["params"], ref.params["model"]) <= 1e-5
  saved = json.load(open(tmp_path / "multi" / "results.json"))
  assert saved["final"]["test"]["num_examples"] == 64
  assert saved["final"]["test"]["accuracy"] == pytest.approx(
      single.results["final"]["test"]["accuracy"], abs=1 / 64 + 1e-9)


@pytest.mark.slow
def test_in_step_sharpness_equals_sam_sharpness_on_the_global_batch(tmp_path):
  """`sharpness/sam` logged at step 1 on 8 devices is `sharpness.sam_sharpness` of the starting
  weights on the whole first global batch (BatchNorm in eval mode), computed on one device."""
  from repsim_jax import data, evaluation, sharpness
  logged = []
  for n in (8,):
    cfg = tiny_config(tmp_path, **{"parallel.num_devices": n, "train.num_steps": 1,
                                   "train.log_every": 1, "train.checkpoint_every": 0,
                                   "train.eval_splits": (), "analysis.in_step_sharpness": "sam"})
    run = train._Run(cfg, str(tmp_path / f"run{n}"))
    start = run.state
    run.train()
    rows = [json.loads(l) for l in open(tmp_path / f"run{n}" / "metrics.jsonl")]
    logged.append(next(r for r in rows if r["split"] == "train")["sharpness/sam"])
  batch = next(data.make_iters(cfg, run.splits, run.info, seed=cfg.seed)[0])
  loss_fn = jax.tree_util.Partial(evaluation.eval_loss, run.model, run.info.task,
                                  start.batch_stats)
  want = float(sharpness.sam_sharpness(loss_fn, start.params["model"],
                                       {"image": batch["image"], "label": batch["label"]},
                                       rho=cfg.analysis.sharpness.rho))
  assert want > 0
  assert logged[0] == pytest.approx(want, rel=1e-4)
  bad = tiny_config(tmp_path, **{"analysis.in_step_sharpness": "sam"})
  bad.analysis.sharpness.m = 5
  with pytest.raises(ValueError, match=r"config.analysis.sharpness.m=5"):
    train.validate(bad)
