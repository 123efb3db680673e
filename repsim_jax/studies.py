"""Study conventions: what every study in `experiments/` does, so that a study is a short file.

A study is a *plan* (a list of `Run`s: a train config and the columns that name it in the results
table), *executed* (each run trained, resumed from its checkpoint, or read back when it finished
before), *tabulated* (one row per run, from its results.json and metrics.jsonl) and *written*
(CSV tables, figures and a markdown report, each atomically). Each run lives in
`<workdir>/<group>/<name>-<identity>` (`repsim_jax.runs`), so a killed study re-runs only what is
missing, and a changed setting re-runs only the runs whose config it changes. Report tables are
rendered from the same data frames that are written as CSV (`markdown_table`), so the report's
numbers are the CSV's.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np
import pandas as pd

from repsim_jax import config_lib, io, launch as launch_lib, runs


@dataclasses.dataclass
class Run:
  """One training run of a study: its config and the columns naming it (`key`)."""
  cfg: ml_collections.ConfigDict
  key: dict
  group: str = "runs"

  @property
  def name(self) -> str:
    # Text values as they are, numbers after their key: "medical_gray_repsim_seed0".
    return "_".join(v if isinstance(v, str) else f"{k}{v:g}" for k, v in self.key.items()) or "run"


def run_dir(workdir: str, run: Run) -> str:
  return runs.run_dir(os.path.join(workdir, run.group), run.name, run.cfg)


def execute(workdir: str, plan: Sequence[Run], launch=None) -> list[dict]:
  """Trains, resumes or reads back every run of `plan` with the executor `launch`
  (`repsim_jax.launch`; None: inline, in this process); their results in plan order, each with
  `run_dir` relative to `workdir`. Runs that finished before cost one file read each; points of
  the plan with the same config share one run."""
  tasks, first = [], {}
  for run in plan:
    with run.cfg.unlocked():
      run.cfg.name = run.name
    # Two points of a plan with one config (a study's axes may meet) are one run.
    key = (run.group, runs.identity(run.cfg))
    if key not in first:
      first[key] = len(tasks)
      tasks.append(launch_lib.Task(run.cfg, run_dir(workdir, run), run.name))
  results = launch_lib.run_all(tasks, launch, folder=os.path.join(workdir, "launch"))
  out = []
  for run in plan:
    i = first[(run.group, runs.identity(run.cfg))]
    out.append({**results[i], "run_dir": os.path.relpath(tasks[i].run_dir, workdir)})
  return out


def sources(workdir: str, plan: Mapping[str, ml_collections.ConfigDict],
            launch=None) -> dict[str, str]:
  """Trains (once) the pretraining runs `plan` ({name: config}) in `<workdir>/sources`;
  {name: run dir}, for `config.model.init`."""
  runs_ = [Run(cfg, {"source": name}, "sources") for name, cfg in plan.items()]
  return {name: os.path.join(workdir, res["run_dir"])
          for name, res in zip(plan, execute(workdir, runs_, launch))}


def history(workdir: str, result: dict, split: str) -> pd.DataFrame:
  """One row per logged step of `split` in a run's metrics.jsonl (columns: step and the
  metrics), from a result of `execute`."""
  rows = []
  with open(os.path.join(workdir, result["run_dir"], "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if r.get("split") == split:
        rows.append({k: v for k, v in r.items() if k != "split"})
  return pd.DataFrame(rows)


set_keys = config_lib.set_keys  # (where studies have always found it)


LAUNCH_FLAGS = {"executor": str, "workers": int, "devices_per_worker": int, "partition": str,
                "time_min": int, "gpus_per_task": int, "array_parallelism": int,
                "population": int, "hosts_per_run": int}


def parse_settings(doc: str, settings: Mapping[str, dict], argv=None) -> tuple[str, dict]:
  """The study command line: `--workdir`, `--setting` (a key of `settings`), a `--<key>` flag for
  every scalar of a setting (its type that of the first setting's value), and the executor
  flags (`--executor=inline|local|slurm`, `--workers`, ... : `repsim_jax.launch`), which give
  the setting a `launch` config."""
  ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="\n".join(doc.strip().splitlines()[1:]))
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--setting", default="small", choices=sorted(settings))
  first = next(iter(settings.values()))
  for k, v in first.items():
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
      ap.add_argument(f"--{k}", type=type(v), default=None)
  for k, kind in LAUNCH_FLAGS.items():
    ap.add_argument(f"--{k}", type=kind, default=None, help="executor (repsim_jax.launch)")
  a = vars(ap.parse_args(argv))
  s = dict(settings[a.pop("setting")])
  workdir = a.pop("workdir")
  launch = launch_lib.launch_config()
  for k in LAUNCH_FLAGS:
    if a[k] is not None:
      launch[k] = a[k]
    del a[k]
  launch_lib.validate(launch)
  s.update({k: v for k, v in a.items() if v is not None})
  s["launch"] = launch
  return workdir, s


def config_arg(setting: Mapping[str, Any], *keys: str) -> str:
  """'k1=v1,k2=v2' of a setting's `keys`, for `config_lib.load_config(path, arg)`."""
  return ",".join(f"{k}={setting[k]}" for k in keys)


def source_config(base, objective: str) -> ml_collections.ConfigDict:
  """A copy of a study base's (configs/study.py) source pretraining for `objective`:
  `supervised`, or an SSL one of `base.ssl`."""
  if objective != "supervised" and objective not in base.ssl:
    raise ValueError(f"objective {objective!r}: expected supervised or one of {sorted(base.ssl)}")
  return copy.deepcopy(base.pretrain if objective == "supervised" else base.ssl[objective])


def main(doc: str, settings: Mapping[str, dict], run_study: Callable[[str, dict], Any],
         argv=None):
  """A study's command line: parse (`parse_settings`), `run_study(workdir, setting)`, print the
  report; returns what `run_study` returned."""
  workdir, s = parse_settings(doc, settings, argv)
  out = run_study(workdir, s)
  with open(os.path.join(workdir, "report.md")) as f:
    print(f.read())
  return out


def csv_list(spec, cast=str) -> list:
  """'a,b' -> [a, b] (each through `cast`)."""
  return [cast(x.strip()) for x in str(spec).split(",") if x.strip()]


def pm(mean, std) -> str:
  """'0.1234 ± 0.0050' (a missing std, from one value, is 0)."""
  return f"{float(mean):.4f} ± {0.0 if std != std else float(std):.4f}"


def cell(v, digits: int = 4) -> str:
  if isinstance(v, str):
    return v
  if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
    return str(int(v))
  if v is None or not np.isfinite(v):
    return "n/a"
  return f"{float(v):.{digits}f}"


def markdown_table(df: pd.DataFrame, columns: Mapping[str, str] | None = None,
                   digits: int = 4) -> list[str]:
  """A markdown table of `df`'s `columns` ({column: header}; default all), numbers to `digits`
  decimals. Report tables go through this, from the frame that is written as CSV."""
  columns = columns or {c: c for c in df.columns}
  lines = ["| " + " | ".join(columns.values()) + " |", "|" + " --- |" * len(columns)]
  for _, r in df.iterrows():
    lines.append("| " + " | ".join(cell(r[c], digits) for c in columns) + " |")
  return lines


def write_outputs(workdir: str, tables: Mapping[str, pd.DataFrame],
                  figures: Mapping[str, Callable[[str], None]], report: Sequence[str]) -> None:
  """`<name>.csv` per table, `<name>` per figure (drawn by `figure(path)`) and `report.md`, each
  written whole or not at all; the report last, so that a report always has its CSVs."""
  for name, df in tables.items():
    io.write_text(os.path.join(workdir, f"{name}.csv"), df.to_csv(index=False))
  for name, draw in figures.items():
    draw(os.path.join(workdir, name))
  io.write_text(os.path.join(workdir, "report.md"), "\n".join(report) + "\n")
