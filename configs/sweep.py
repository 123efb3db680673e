"""Ground-truth transferability: fine-tune every (source, target) pair over a small grid.

  python -m repsim_jax.main --workdir=runs/sweep --config="configs/sweep.py:sources=\
imagenet=resnet18@weights/r18.safetensors;rad=runs/radimagenet_r18,\
targets=dermamnist+breastmnist,lrs=1e-3+1e-2,epochs=10,scores=runs/transfer/scores.csv"

`:key=val` args: sources (as configs/transferability.py: `name=model@path` items separated by ';',
or a file; `name=model@` with no path = random init, a from-scratch baseline), targets ('+' or
';' separated dataset names; each sets data.name), source (data source), size,
image_size, data_dir, lrs ('+' separated), steps, epochs, batch, method, metric (a test metric of
the runs' results.json: auc, accuracy, f1, ...), scores (a transferability scores.csv to rank
against the ground truth), seed. Every trainer setting applies to every run: `--config.optim.*`,
`--config.train.*`, `--config.method.*`, `--config.data.*`. More grid axes:
`--config.sweep.grid='(("method.lam", (0.1, 1.0)),)'` (run names get `__lam0.1`, ...).
Writes <workdir>/runs/<source>__<target>__lr<lr>-<identity>/ (ordinary runs), ground_truth.csv
(`source,target,metric,value`), sweep_runs.csv, and ranking/ when `scores` is given.
"""

import ml_collections

from repsim_jax import config_lib, launch


def get_config(arg=None):
  a = config_lib.parse_arg(arg, sources="", targets="", source="medmnist", size=28, image_size=0,
                           data_dir="data", lrs="1e-3+1e-2", steps=0, epochs=10.0, batch=64,
                           method="full_ft", metric="auc", scores="", seed=0)
  c = config_lib.train_config()
  c.job = "sweep"
  c.name = "sweep"
  c.seed = a.seed
  c.data.source = a.source
  c.data.size = a.size
  c.data.image_size = a.image_size
  c.data.data_dir = a.data_dir
  c.method = config_lib.method_config(a.method)  # with that method's defaults (its λ)
  c.train.batch_size = a.batch
  c.train.num_steps = a.steps
  c.train.num_epochs = a.epochs
  c.train.eval_every = 0          # 0 = about sweep.num_evals evaluations per run
  c.train.eval_splits = ("val", "test")
  c.analysis.final_similarity = False  # not needed for the ground truth; saves a pass per run

  c.sweep = ml_collections.ConfigDict()
  c.sweep.sources = a.sources
  c.sweep.targets = a.targets
  c.sweep.lrs = tuple(float(v) for v in a.lrs.replace(";", "+").split("+") if v.strip())
  c.sweep.grid = ()               # ((dotted_key, (value, ...)), ...): more axes besides lr
  c.sweep.num_evals = 5
  c.sweep.metric = a.metric
  c.sweep.scores_csv = a.scores
  c.sweep.rank = True             # with scores_csv: ranking.rank_scores -> <workdir>/<rank_dir>
  c.sweep.rank_dir = "ranking"
  # Where the runs execute: inline (here, one after another), local (a pool of worker
  # processes), slurm (a job array through submitit): repsim_jax/launch.py.
  c.launch = launch.launch_config()
  return c
