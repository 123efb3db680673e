"""The ground-truth sweep: fine-tune every (source, target) pair over a small grid.

  python -m repsim_jax.main --workdir=runs/sweep --config="configs/sweep.py:sources=\
imagenet=resnet18@weights/r18.safetensors;rad=runs/radimagenet_r18,\
targets=dermamnist+breastmnist,lrs=1e-3+1e-2,epochs=10,scores=runs/transfer/scores.csv"

The config is an ordinary train config (every `--config.*` of the trainer applies to every run)
plus `config.sweep`. Each grid point is a plain `train.train_and_evaluate` in
`<workdir>/runs/<source>__<target>__lr<lr>[__<key><value>...]-<identity>`: a run with a
results.json is finished and is read back, an unfinished one resumes from its checkpoint, and a
changed setting makes a new run directory (`repsim_jax.runs`). `train.eval_every`
(when 0) is set so that each run evaluates about `sweep.num_evals` times, which gives every run
a `best_val` (the eval step with the lowest val loss). The ground truth of a pair is the test
metric (`sweep.metric`, AUC by default) of the best-validation point over the whole grid and all
eval steps (lowest val loss), written as `source,target,metric,value` rows to
`<workdir>/ground_truth.csv`; `<workdir>/sweep_runs.csv` lists every run.
`config.launch` picks where the runs execute (`repsim_jax.launch`: inline, a local pool of
workers, or a SLURM array through submitit). With `sweep.scores_csv` (a transferability job's scores.csv) and `sweep.rank`,
`ranking.rank_scores` evaluates the scores against it in `<workdir>/ranking/`.
"""

from __future__ import annotations

import os
import re

import jax
import ml_collections

from repsim_jax import io
from repsim_jax.jobs import transferability as transfer_job

TRUTH_COLUMNS = ("source", "target", "metric", "value")
RUN_COLUMNS = ("source", "target", "run", "best_step", "val_loss", "metric", "value")


def split_list(spec, key: str) -> list[str]:
  """'a;b', 'a+b', 'a,b' or a tuple -> ['a', 'b'] (one-line error when empty)."""
  items = list(spec) if isinstance(spec, (tuple, list)) else re.split(r"[;,+\s]+", str(spec))
  items = [str(i).strip() for i in items if str(i).strip()]
  if not items:
    raise ValueError(f"{key}: empty; expected a list separated by ';' or '+'")
  return items


def grid_points(sweep) -> list[tuple[str, dict]]:
  """[(run-name suffix, {dotted key: value})]: lr × every `sweep.grid` axis."""
  points = [(f"lr{float(lr):g}", {"optim.lr": float(lr)}) for lr in sweep.lrs]
  for axis in sweep.grid:
    key, values = axis
    token = key.split(".")[-1]
    points = [(f"{name}__{token}{v:g}" if isinstance(v, float) else f"{name}__{token}{v}",
               {**over, key: v}) for name, over in points for v in values]
  return points


def base_run_config(config) -> ml_collections.ConfigDict:
  """The sweep config without `sweep`, as an ordinary train config."""
  base = ml_collections.ConfigDict(config.to_dict())
  del base["sweep"]
  if "launch" in base:
    del base["launch"]
  base.job = "train"
  return base


def run_config(base, source: transfer_job.Source, target: str, overrides: dict,
               eval_every: int | None = None) -> ml_collections.ConfigDict:
  """One grid point's train config (`eval_every` None: the base config's)."""
  cfg = ml_collections.ConfigDict(base.to_dict())
  cfg.data.name = target
  cfg.model.name = source.model
  cfg.model.init = source.path
  if source.kwargs:
    cfg.model.kwargs = ml_collections.ConfigDict(dict(source.kwargs))
  from repsim_jax import studies  # pylint: disable=g-import-not-at-top
  try:
    studies.set_keys(cfg, overrides)
  except ValueError as e:
    raise ValueError(f"config.sweep.grid: {e}") from None
  if eval_every is not None:
    cfg.train.eval_every = eval_every
  cfg.name = f"{source.name}__{target}"
  return cfg


def _eval_every(cfg, num_evals: int) -> int:
  from repsim_jax import data, train  # pylint: disable=g-import-not-at-top
  if cfg.train.eval_every > 0:
    return int(cfg.train.eval_every)
  if cfg.train.num_steps > 0:
    steps = int(cfg.train.num_steps)
  else:
    splits, _ = data.load_dataset(cfg.data)
    steps = train.num_train_steps(cfg, len(splits["train"]))
  return max(1, steps // max(1, num_evals))


def best_of(results: dict[str, dict], metric: str) -> tuple[str, dict]:
  """(run name, its best_val) with the lowest validation loss over runs and eval steps."""
  best_name, best = None, None
  for name, res in results.items():
    bv = res.get("best_val") or {}
    if "val" not in bv or "test" not in bv:
      raise ValueError(f"run {name}: results.json has no best_val with val and test metrics "
                       "(config.train.eval_splits must include 'val' and 'test')")
    if metric not in bv["test"]:
      raise ValueError(f"config.sweep.metric={metric!r}: run {name} reports "
                       f"{sorted(bv['test'])}")
    if best is None or bv["val"]["loss"] < best["val"]["loss"]:
      best_name, best = name, bv
  return best_name, best


def validate(config) -> None:
  s = config.sweep
  for split in ("val", "test"):
    if split not in tuple(config.train.eval_splits):
      raise ValueError(f"config.train.eval_splits={tuple(config.train.eval_splits)}: the sweep "
                       f"needs {split!r} (best validation run, its test metric)")
  if not s.lrs:
    raise ValueError("config.sweep.lrs: empty; expected at least one learning rate")
  for lr in s.lrs:
    if not float(lr) > 0:
      raise ValueError(f"config.sweep.lrs: {lr!r} is not a positive learning rate")
  for axis in s.grid:
    if len(axis) != 2 or not isinstance(axis[0], str) or not len(axis[1]):
      raise ValueError(f"config.sweep.grid: item {axis!r}: expected (dotted_key, (values, ...))")
  if "launch" in config:
    from repsim_jax import launch  # pylint: disable=g-import-not-at-top
    launch.validate(config.launch)
  if s.rank and s.scores_csv and not os.path.isfile(s.scores_csv):
    raise FileNotFoundError(f"config.sweep.scores_csv={s.scores_csv!r}: no such file")


def _write_csv(path: str, rows: list[dict], columns) -> None:
  import pandas as pd  # pylint: disable=g-import-not-at-top
  io.write_text(path, pd.DataFrame(rows, columns=list(columns)).to_csv(index=False))


def run(config, workdir: str) -> dict:
  """Runs (or reads back) every grid point; returns {'ground_truth': rows, 'runs': rows,
  'ranking': rank_scores summary or None}."""
  from repsim_jax import config_lib, runs, train  # pylint: disable=g-import-not-at-top
  validate(config)
  s = config.sweep
  sources = transfer_job.parse_sources(s.sources, key="config.sweep.sources", allow_random=True)
  targets = split_list(s.targets, "config.sweep.targets")
  for t in targets:
    if not transfer_job._NAME.match(t):  # pylint: disable=protected-access
      raise ValueError(f"config.sweep.targets: {t!r}: use letters, digits, '_', '-', '.'")
  points = grid_points(s)
  base = base_run_config(config)
  # Every run config is checked before the first one trains.
  for source in sources:
    train.validate(run_config(base, source, targets[0], points[0][1]))
  main = jax.process_index() == 0
  if main:
    config_lib.write_config(config, workdir)
  from repsim_jax import launch as launch_lib  # pylint: disable=g-import-not-at-top
  tasks, pairs = [], []
  for target in targets:
    for source in sources:
      pairs.append((target, source, len(tasks)))
      for suffix, overrides in points:
        name = f"{source.name}__{target}__{suffix}"
        cfg = run_config(base, source, target, overrides)
        # Per run: the number of steps may depend on the grid point (e.g. the batch size).
        cfg.train.eval_every = _eval_every(cfg, s.num_evals)
        tasks.append(launch_lib.Task(cfg, runs.run_dir(os.path.join(workdir, "runs"), name, cfg),
                                     name))
  print(f"[sweep] {len(tasks)} runs ({len(targets)} targets x {len(sources)} sources x "
        f"{len(points)} grid points), executor {config.launch.executor if 'launch' in config else 'inline'}",
        flush=True)
  results = launch_lib.run_all(tasks, config.get("launch"), folder=os.path.join(workdir, "launch"))
  truth, run_rows = [], []
  for target, source, first in pairs:
    if not main:
      continue
    group = {t.name: r for t, r in zip(tasks[first:first + len(points)],
                                       results[first:first + len(points)])}
    for name, res in group.items():
      bv = res.get("best_val") or {}
      run_rows.append({"source": source.name, "target": target, "run": name,
                       "best_step": bv.get("step"), "val_loss": bv.get("val", {}).get("loss"),
                       "metric": s.metric, "value": bv.get("test", {}).get(s.metric)})
    best_name, best = best_of(group, s.metric)
    truth.append({"source": source.name, "target": target, "metric": s.metric,
                  "value": float(best["test"][s.metric])})
    print(f"[sweep] {source.name} -> {target}: best {best_name} (step {best['step']}, val loss "
          f"{best['val']['loss']:.4f}) test {s.metric} {best['test'][s.metric]:.4f}", flush=True)
  if main:
    _write_csv(os.path.join(workdir, "ground_truth.csv"), truth, TRUTH_COLUMNS)
    _write_csv(os.path.join(workdir, "sweep_runs.csv"), run_rows, RUN_COLUMNS)
  ranking = None
  if main:
    import pandas as pd  # pylint: disable=g-import-not-at-top
    table = pd.DataFrame(truth).pivot(index="source", columns="target", values="value")
    print(f"\nGround truth (test {s.metric} of the best-validation run):", flush=True)
    print(table.to_string(float_format=lambda v: f"{v:.4f}"), flush=True)
    if s.rank and s.scores_csv:
      ranking = rank_against_truth(s.scores_csv, os.path.join(workdir, "ground_truth.csv"),
                                   os.path.join(workdir, s.rank_dir), s.metric)
  return {"ground_truth": truth, "runs": run_rows, "ranking": ranking}


def rank_against_truth(scores_csv: str, truth_csv: str, out_dir: str, metric: str) -> dict:
  """`ranking.rank_scores` of a scores CSV against the sweep's ground truth; prints mean τ_w."""
  from repsim_jax.transferability import ranking  # pylint: disable=g-import-not-at-top
  summary = ranking.rank_scores(scores_csv, truth_csv, out_dir, metric=metric)
  print(f"\nMean weighted Kendall tau per score ({out_dir}):", flush=True)
  for name, tau in sorted(summary["mean_tau"].items(),
                          key=lambda kv: (kv[1] is None, -(kv[1] or 0.0))):
    print(f"  {name:22s} {'n/a' if tau is None else f'{tau:+.3f}'}", flush=True)
  return summary
