"""The jobs `main.py` runs, chosen by `config.job`."""

from __future__ import annotations

import os

import jax

from repsim_jax import parallel, runs


def run(config, workdir: str):
  job = config.job
  if job not in JOBS:
    raise ValueError(f"config.job={job!r}: expected one of {sorted(JOBS)}")
  runs.check_workdir(workdir)
  if "parallel" in config:
    parallel.initialize_distributed(config.parallel, workdir)
  os.makedirs(workdir, exist_ok=True)
  return JOBS[job](config, workdir)


def _train(config, workdir):
  from repsim_jax import train
  results = train.train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    summary = "  ".join(f"{split} {k}={v:.4f}" for split, m in results["final"].items()
                        for k, v in m.items() if k in ("accuracy", "auc"))
    print(f"done: {workdir}/results.json  {summary}")
  return results


def _default(config, workdir):
  from repsim_jax import default_run
  return default_run.run(config, workdir)


def _analyze(config, workdir):
  from repsim_jax import analysis
  if not config.run:
    raise ValueError("config.run: name the run directory to analyse (configs/analyze.py:run=DIR)")
  return analysis.run(config, workdir)


def _transferability(config, workdir):
  from repsim_jax.transferability import job
  return job.run(config, workdir)


def _sweep(config, workdir):
  from repsim_jax import sweep
  return sweep.run(config, workdir)


JOBS = {"train": _train, "default": _default, "analyze": _analyze,
        "transferability": _transferability, "sweep": _sweep}
