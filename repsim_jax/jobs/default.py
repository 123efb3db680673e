"""The embedded default job: pretrain on a synthetic source, fine-tune on a synthetic target with
each configured method, and report the target metrics side by side (results.json + a plot).

Each stage is an ordinary training run in a sub-directory named by its identity
(`<stage>-<hash>`, see `repsim_jax.runs`), so re-running the command resumes whichever stage was
interrupted, skips finished ones, and re-runs only the stages whose config changed.
"""

from __future__ import annotations

import copy
import json
import os

import jax

from repsim_jax import io, runs, train

REPORT_KEYS = ("accuracy", "balanced_accuracy", "auc", "f1")


def stage(cfg, parent: str, name: str) -> tuple[str, dict]:
  """Trains (or resumes, or reads back) one stage in `<parent>/<name>-<identity>`; returns the
  directory and its results. `<parent>/<name>` links to the stage directory of the latest call,
  so commands that name a stage (analysis) keep working when its config changes."""
  run_dir = runs.run_dir(parent, name, cfg)
  results = train.train_and_evaluate(cfg, run_dir)
  if jax.process_index() == 0:
    runs.link(os.path.join(parent, name), run_dir)
  return run_dir, results


def run(config, workdir: str) -> dict:
  with runs.exclusive(workdir):
    pre_dir, pretrain = stage(config.pretrain, workdir, "pretrain")
    rows = {}
    for key, method_cfg in config.methods.items():
      f = copy.deepcopy(config.finetune)
      with f.unlocked():
        f.name = f"finetune_{key}"
        f.model.init = pre_dir
        f.method = copy.deepcopy(method_cfg)
      _, res = stage(f, workdir, f"finetune_{key}")
      cka = res.get("similarity", {}).get("linear_cka", {})
      rows[key] = {"test": {k: res["final"]["test"][k] for k in REPORT_KEYS
                            if k in res["final"]["test"]},
                   "extra": {f"cka_{layer}": v for layer, v in cka.items()}}
    summary = {"pretrain_val": pretrain["final"].get("val", {}), "methods": rows}
    if jax.process_index() == 0:
      io.write_text(os.path.join(workdir, "results.json"),
                                   json.dumps(summary, indent=2) + "\n")
      plot(rows, os.path.join(workdir, "results.png"))
      print(table(rows), flush=True)
      print(f"results: {workdir}/results.json, {workdir}/results.png", flush=True)
  return summary


def table(rows: dict) -> str:
  cols = [k for k in REPORT_KEYS if any(k in r["test"] for r in rows.values())]
  extra = list(dict.fromkeys(k for r in rows.values() for k in r.get("extra", {})))
  widths = [max(len(c), 6) + 2 for c in cols + extra]
  head = f"{'method':<16}" + "".join(f"{c:>{w}}" for c, w in zip(cols + extra, widths))
  lines = [head, "-" * len(head)]
  for name, r in rows.items():
    vals = [r["test"].get(c, float("nan")) for c in cols] + [r["extra"].get(c, float("nan"))
                                                             for c in extra]
    lines.append(f"{name:<16}" + "".join(f"{v:>{w}.4f}" for v, w in zip(vals, widths)))
  return "\n".join(lines)


def plot(rows: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  cols = [k for k in REPORT_KEYS if any(k in r["test"] for r in rows.values())]
  extra = list(dict.fromkeys(k for r in rows.values() for k in r.get("extra", {})))
  keys = cols + extra
  fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2, 3.2))
  width = 0.8 / max(len(rows), 1)
  x = np.arange(len(keys))
  for i, (name, r) in enumerate(rows.items()):
    vals = [r["test"].get(k, r["extra"].get(k, np.nan)) for k in keys]
    ax.bar(x + i * width, vals, width, label=name)
  ax.set_xticks(x + width * (len(rows) - 1) / 2, keys, rotation=20)
  ax.set_ylim(0, 1)
  ax.set_title("synthetic target, test split: metrics and linear CKA to the pretrained model")
  ax.legend(fontsize=8)
  fig.tight_layout()
  io.save_figure(fig, path)
  plt.close(fig)
