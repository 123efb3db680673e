"""Study: does RepSim keep the pretrained representation while matching full fine-tuning?

  python experiments/repsim_vs_ft.py --workdir=runs/study_repsim [--seeds=0,1,2] [--lams=0.3]

Pretrains the default run's small ResNet on the synthetic natural source once, then fine-tunes it
on the synthetic medical target with full fine-tuning and with RepSim (learned Q, each λ) for
every seed. Writes `results.csv` (one row per run), `summary.csv` (mean ± std per method),
`cka_by_layer.png` and `report.md` with the headline: relative change in linear CKA to the
pretrained model at `pre_logits` and the difference in target accuracy, against full
fine-tuning. Every run is resumable (re-running skips finished ones).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np
import pandas as pd

from repsim_jax import config_lib, io
from repsim_jax.cpu import host
from repsim_jax.jobs import default as default_run


def run_study(workdir: str, seeds, lams, finetune_steps: int = 0, pretrain_steps: int = 0,
              data_dir: str = "") -> pd.DataFrame:
  base = config_lib.load_config(
      os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"))
  if data_dir:
    base.pretrain.data.data_dir = base.finetune.data.data_dir = data_dir
  if pretrain_steps:
    base.pretrain.train.num_steps = pretrain_steps
  if finetune_steps:
    base.finetune.train.num_steps = finetune_steps
  pre_dir, _ = default_run.stage(base.pretrain, workdir, "pretrain")
  methods = {"full_ft": config_lib.method_config("full_ft")}
  for lam in lams:
    methods[f"repsim_lam{lam:g}"] = config_lib.method_config("repsim", q_mode="learned", lam=lam)
  rows = []
  for seed in seeds:
    for name, mcfg in methods.items():
      f = copy.deepcopy(base.finetune)
      f.name = f"{name}_seed{seed}"
      f.seed = seed
      f.model.init = pre_dir
      f.method = mcfg
      _, res = default_run.stage(f, os.path.join(workdir, "runs"), f.name)
      test = res["final"]["test"]
      row = {"method": name, "seed": seed, "accuracy": test["accuracy"], "auc": test["auc"],
             "balanced_accuracy": test["balanced_accuracy"]}
      row.update({f"cka_{k}": v for k, v in res["similarity"]["linear_cka"].items()})
      rows.append(row)
  df = pd.DataFrame(rows)
  write_outputs(df, workdir)
  return df


def headline(df: pd.DataFrame) -> pd.DataFrame:
  """Per method: mean metrics and the change against full fine-tuning."""
  mean = df.groupby("method", sort=False).mean(numeric_only=True).drop(columns="seed")
  ft = mean.loc["full_ft"]
  out = mean[["accuracy", "auc", "cka_pre_logits"]].copy()
  out["cka_relative_change"] = mean["cka_pre_logits"] / ft["cka_pre_logits"] - 1.0
  out["accuracy_points_vs_ft"] = 100.0 * (mean["accuracy"] - ft["accuracy"])
  return out


def write_outputs(df: pd.DataFrame, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  io.write_text(os.path.join(workdir, "results.csv"), df.to_csv(index=False))
  summary = df.groupby("method", sort=False).agg(["mean", "std"]).drop(columns="seed")
  io.write_text(os.path.join(workdir, "summary.csv"), summary.to_csv())
  head = headline(df)
  plot_cka(df, os.path.join(workdir, "cka_by_layer.png"))
  layers = [c[4:] for c in df.columns if c.startswith("cka_")]
  lines = ["# RepSim vs full fine-tuning (synthetic natural -> synthetic medical)", "",
           f"{df.seed.nunique()} seeds; means over seeds. CKA: linear CKA of each layer to the "
           "pretrained model on the target test split.", "",
           "| method | accuracy | AUC | CKA pre_logits | CKA change vs full FT | accuracy (points) vs full FT |",
           "| --- | --- | --- | --- | --- | --- |"]
  for m, r in head.iterrows():
    lines.append(f"| {m} | {r.accuracy:.4f} | {r.auc:.4f} | {r.cka_pre_logits:.4f} | "
                 f"{100 * r.cka_relative_change:+.1f}% | {r.accuracy_points_vs_ft:+.2f} |")
  mean = df.groupby("method", sort=False).mean(numeric_only=True)
  lines += ["", "Linear CKA to the pretrained model per layer (mean over seeds):", "",
            "| method | " + " | ".join(layers) + " |", "| --- |" + " --- |" * len(layers)]
  for m, r in mean.iterrows():
    lines.append(f"| {m} | " + " | ".join(f"{r['cka_' + l]:.3f}" for l in layers) + " |")
  lines += ["", "Per-run rows: `results.csv`; mean ± std: `summary.csv`; plot: `cka_by_layer.png`."]
  io.write_text(os.path.join(workdir, "report.md"), "\n".join(lines) + "\n")


def plot_cka(df: pd.DataFrame, path: str) -> None:
  """Linear CKA to the pretrained model per layer, mean over seeds ± one standard deviation."""
  from repsim_jax import plots
  layers = [c for c in df.columns if c.startswith("cka_")]
  if "cka_layer4" in layers and "cka_pre_logits" in layers and np.allclose(
      df["cka_layer4"], df["cka_pre_logits"]):
    layers.remove("cka_pre_logits")  # a ResNet's pre_logits is its mean-pooled layer4
  n = df.seed.nunique()
  with plots.figure(width=5.6, height=3.6) as (fig, (ax,)):
    x = np.arange(len(layers))
    for i, (m, g) in enumerate(df.groupby("method", sort=False)):
      mu, sd = g[layers].mean().values, g[layers].std().fillna(0).values
      ax.errorbar(x + (i - 0.5) * 0.06, mu, yerr=sd, marker="o", capsize=3, label=m,
                  color=plots.PALETTE[i % len(plots.PALETTE)])
    ax.set_xticks(x, [l[4:] for l in layers])
    ax.set_xlabel("layer (shallow to deep)")
    ax.set_ylabel("linear CKA to the pretrained model")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"target test split; mean ± std over {n} seeds", fontsize=9)
    plots.legend_above(fig, ax)
    plots.save(fig, path)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--lams", default="0.3")
  ap.add_argument("--data_dir", default="")
  ap.add_argument("--finetune_steps", type=int, default=0)
  ap.add_argument("--pretrain_steps", type=int, default=0)
  a = ap.parse_args(argv)
  df = run_study(a.workdir, [int(s) for s in a.seeds.split(",")],
                 [float(l) for l in a.lams.split(",")], a.finetune_steps, a.pretrain_steps,
                 a.data_dir)
  print(open(os.path.join(a.workdir, "report.md")).read())
  return df


if __name__ == "__main__":
  host.malloc_on_huge_pages()  # may re-exec this process, as repsim_jax.main does
  sys.exit(0 if main() is not None else 1)
