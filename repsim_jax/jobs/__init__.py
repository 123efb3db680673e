"""The jobs `main.py` runs, chosen by `config.job`: `train` (here), `default` (the embedded
end-to-end run), `analyze`, `transferability` and `sweep` (a module each)."""

from __future__ import annotations

import os

import jax

from repsim_jax import cpu, parallel, runs


def run(config, workdir: str):
  job = config.job
  if job not in JOBS:
    raise ValueError(f"config.job={job!r}: expected one of {sorted(JOBS)}")
  runs.check_workdir(workdir)
  if "parallel" in config:
    parallel.initialize_distributed(config.parallel)
  os.makedirs(workdir, exist_ok=True)
  cpu.drop_compiled_programs_near_map_limit()  # a process running job after job (tests, studies)
  return JOBS[job](config, workdir)


def _train(config, workdir):
  from repsim_jax import population, train
  if config.train.get("population"):  # K members, each a run directory under workdir
    pairs = population.members(config, workdir)
    results = population.run(config, workdir)
  else:
    pairs, results = [(config, workdir)], [train.train_and_evaluate(config, workdir)]
  if jax.process_index() == 0:
    for (_, run_dir), r in zip(pairs, results):
      summary = "  ".join(f"{split} {k}={v:.4f}" for split, m in r["final"].items()
                          for k, v in m.items() if k in ("accuracy", "auc"))
      print(f"done: {run_dir}/results.json  {summary}")
  return results if len(results) > 1 or config.train.get("population") else results[0]


def _module_run(name):
  """The `run(config, workdir)` of `repsim_jax.jobs.<name>`, imported when the job runs."""

  def run_job(config, workdir):
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module(f"repsim_jax.jobs.{name}").run(config, workdir)

  return run_job


# config.job -> the job. Each module here is one command; a new job is a module with
# `run(config, workdir)` and an entry below.
DESCRIPTIONS = {
    "train": "pretrain or fine-tune one model (configs/pretrain.py, configs/finetune.py)",
    "default": "the embedded end-to-end run: pretrain, fine-tune with each method, compare "
               "(configs/default.py)",
    "analyze": "similarity and sharpness report of a finished run (configs/analyze.py)",
    "transferability": "every transferability score of many sources on a target "
                       "(configs/transferability.py)",
    "sweep": "ground-truth fine-tuning of every (source, target) pair, ranked against the scores "
             "(configs/sweep.py)",
}
JOBS = {"train": _train, "default": _module_run("default"), "analyze": _module_run("analyze"),
        "transferability": _module_run("transferability"), "sweep": _module_run("sweep")}
