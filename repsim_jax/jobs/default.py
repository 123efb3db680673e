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


def _with_parallel(stage_cfg, config):
  """The stage's config with the job-wide settings (`config.parallel`, `config.data_dir`)."""
  out = copy.deepcopy(stage_cfg)
  with out.unlocked():
    if "parallel" in config:
      out.parallel = copy.deepcopy(config.parallel)
    if config.get("data_dir"):
      out.data.data_dir = config.data_dir
  return out


def run(config, workdir: str) -> dict:
  with runs.exclusive(workdir):
    pre_dir, pretrain = stage(_with_parallel(config.pretrain, config), workdir, "pretrain")
    rows = {}
    for key, method_cfg in config.methods.items():
      f = _with_parallel(config.finetune, config)
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
      io.write_text(os.path.join(workdir, "results.json"), json.dumps(summary, indent=2) + "\n")
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
  """Two panels: the test metrics of each method, and each layer's linear CKA to the pretrained
  model (one run each, so no spread to show)."""
  from repsim_jax import plots  # pylint: disable=g-import-not-at-top
  metrics = [k for k in REPORT_KEYS if any(k in r["test"] for r in rows.values())]
  layers = list(dict.fromkeys(k[len("cka_"):] for r in rows.values() for k in r.get("extra", {})))
  if "layer4" in layers and all(r["extra"].get("cka_layer4") == r["extra"].get("cka_pre_logits")
                                for r in rows.values()):
    layers.remove("pre_logits")  # a ResNet's pre_logits is its mean-pooled layer4: same values
  with plots.figure(ncols=2, width=4.6, height=3.4) as (fig, (left, right)):
    plots.grouped_bars(left, metrics, {m: [r["test"].get(k, float("nan")) for k in metrics]
                                       for m, r in rows.items()},
                       ylabel="score on the test split", xlabel="metric", ylim=(0, 1.08))
    left.set_title("target task (one run per method)")
    if layers:
      plots.grouped_bars(right, layers, {m: [r["extra"].get(f"cka_{k}", float("nan"))
                                            for k in layers] for m, r in rows.items()},
                         ylabel="linear CKA to the pretrained model", xlabel="layer",
                         ylim=(0, 1.08))
      right.set_title("how much of the pretrained representation is kept")
    else:
      right.set_axis_off()
    plots.legend_above(fig, left)
    plots.save(fig, path)
