"""What SSL pretraining learns in a CPU budget: k-NN accuracy at random init and after training,
for this trainer and for lightly on eager PyTorch trained on the same files.

  python benchmarks/ssl_learning.py [--objectives simclr,byol] [--datasets natural,medical_gray]
      [--steps 1000] [--torch-python PATH] [--workdir DIR]

The repsim_jax runs use the settings of
`tests/ssl_test.py::test_pretraining_without_labels_beats_random_init` (configs/pretrain.py,
resnet_small, 32 px, batch 64, LARS at 1.0, heads of width 256, crops of 50-100 %, no blur;
8 classes; 4,000 train and 1,000 val images); their rows also give the linear-probe accuracy
and the effective rank of the backbone's features (train split) at init and at the end. The
lightly runs (benchmarks/torch_ssl_knn_reference.py, where PATH has torch, torchvision and
lightly) read the npz the repsim_jax run generated, with the same architecture and views and
lightly's own SGD recipe: a second implementation, to tell what the method does on this data
from what the code does. Prints one JSON line per (dataset, objective, implementation).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from repsim_jax import config_lib, evaluation, probes, train  # noqa: E402


def config(objective: str, dataset: str, steps: int, data_dir: str):
  cfg = config_lib.load_config(
      os.path.join(REPO, "configs/pretrain.py"),
      f"objective={objective},model=resnet_small,dataset={dataset},size=32,steps={steps},"
      "batch=64,lr=1.0")
  cfg.data.data_dir = data_dir
  cfg.data.num_classes, cfg.data.difficulty = 8, 0.0
  cfg.data.train_size, cfg.data.val_size, cfg.data.test_size = 4000, 1000, 100
  cfg.ssl.hidden_dim, cfg.ssl.temperature, cfg.ssl.momentum = 256, 0.2, 0.99
  cfg.ssl.crop_scale, cfg.ssl.blur = (0.5, 1.0), False
  cfg.train.tensorboard, cfg.train.checkpoint_every = False, 0
  cfg.parallel.num_devices = 1
  return cfg


def effective_rank(x) -> float:
  """exp(entropy) of the centred features' normalised squared singular values (Roy & Vetterli):
  how many directions the representation spreads over."""
  s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
  p = s / s.sum()
  return float(np.exp(-np.sum(p * np.log(np.where(p > 0, p, 1.0)))))


def ours(cfg, workdir: str) -> dict:
  """The trainer's run: k-NN (its own monitor at the end), linear-probe accuracy and effective
  rank of the backbone's features at random init and after training."""
  t0 = time.time()
  run = train._Run(cfg, workdir)  # pylint: disable=protected-access
  step = run.dp.compile(evaluation.make_step(run.model, ("pre_logits",)), donate_state=False,
                        sharded_out=True)

  def quality(variables):
    feats = lambda split, cap: evaluation.extract_features(  # noqa: E731
        run.dp, step, variables, run.eval_iter_fn(split), cap)
    bank, val = feats(cfg.ssl.knn_bank_split, cfg.ssl.knn_bank_size), feats("val", 0)
    q = probes.quality(bank["pre_logits"], bank["label"].reshape(-1), val["pre_logits"],
                       val["label"].reshape(-1), cfg.data.num_classes, k=cfg.ssl.knn_k,
                       temperature=cfg.ssl.knn_temperature)
    return {**q, "effective_rank": effective_rank(np.asarray(bank["pre_logits"], np.float64))}

  init = run.init_variables
  before = quality({"params": init["params"], "batch_stats": init["batch_stats"]})
  outcome = run.train()
  after = quality({"params": outcome.state.params["model"],
                   "batch_stats": outcome.state.batch_stats})
  monitor = outcome.results["final"]["val"]["knn_accuracy"]
  if abs(after["knn_accuracy"] - monitor) > 1e-6:  # the same features, scored twice
    raise AssertionError(f"k-NN {after['knn_accuracy']} here, {monitor} in the run's monitor")
  row = {"knn_at_init": before["knn_accuracy"], "knn": monitor,
         "linear_probe_at_init": before["linear_probe_accuracy"],
         "linear_probe": after["linear_probe_accuracy"],
         "effective_rank_at_init": before["effective_rank"],
         "effective_rank": after["effective_rank"]}
  return {**{k: float(v) for k, v in row.items()}, "seconds": round(time.time() - t0, 1)}


def lightly(python: str, objective: str, npz: str, steps: int) -> dict | None:
  script = os.path.join(REPO, "benchmarks", "torch_ssl_knn_reference.py")
  t0 = time.time()
  done = subprocess.run([python, script, objective, npz, str(steps)], capture_output=True,
                        text=True, check=False)
  if done.returncode:
    print(f"lightly {objective}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return None
  return {**json.loads(done.stdout.strip().splitlines()[-1]), "seconds": round(time.time() - t0, 1)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--objectives", default="simclr,byol")
  ap.add_argument("--datasets", default="natural,medical_gray")
  ap.add_argument("--steps", type=int, default=1000)
  ap.add_argument("--torch-python", default="")
  ap.add_argument("--workdir", default="")
  args = ap.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="ssl_learning_")
  for dataset in args.datasets.split(","):
    data_dir = os.path.join(workdir, "data")
    for objective in args.objectives.split(","):
      cfg = config(objective, dataset, args.steps, data_dir)
      row = {"dataset": dataset, "objective": objective, "steps": args.steps}
      mine = ours(cfg, os.path.join(workdir, f"{dataset}_{objective}"))
      print(json.dumps({**row, "implementation": "repsim_jax",
                        **{k: round(v, 3) for k, v in mine.items()}}), flush=True)
      if args.torch_python:
        npz = max(glob.glob(os.path.join(data_dir, f"synthetic_{dataset}_*.npz")),
                  key=os.path.getmtime)  # the file the run above read
        theirs = lightly(args.torch_python, objective, npz, args.steps)
        if theirs:
          print(json.dumps({**row, "implementation": "lightly", **theirs}), flush=True)


if __name__ == "__main__":
  main()
