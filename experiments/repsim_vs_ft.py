"""Study: does RepSim keep the pretrained representation while matching full fine-tuning?

  python experiments/repsim_vs_ft.py --workdir=runs/study_repsim [--setting=small|full]
      [--seeds=0,1,2] [--lams=0.3] [--finetune_steps=N] [--data_dir=DIR]

`small`: pretrains the default run's small ResNet on the synthetic natural source once, then
fine-tunes it on the synthetic medical target with full fine-tuning and with RepSim (learned Q,
each λ) for every seed; about 4 minutes on 2 CPU cores. `full`: the same comparison on
DermaMNIST at 64 px from ImageNet ResNet-50 weights (`python -m repsim_jax.models.export
torchvision:resnet50 weights/r50.safetensors`), on accelerators. Writes `results.csv` (one row
per run), `summary.csv` (mean ± std per method), `cka_by_layer.png` and `report.md` with the
headline: relative change in linear CKA to the pretrained model at `pre_logits` and the
difference in target accuracy, against full fine-tuning. Every run is resumable (re-running
skips finished ones).
"""

from __future__ import annotations

import copy
import os
import sys

import numpy as np
import pandas as pd

from repsim_jax import config_lib, studies
from repsim_jax.cpu import host

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
SETTINGS = {
    "small": dict(source="pretrain", target="medical_gray", seeds="0,1,2", lams="0.3",
                  model="resnet_small", size=32, pretrain_steps=1000, finetune_steps=300,
                  data_dir=""),
    "full": dict(source="weights/r50.safetensors", target="dermamnist", seeds="0,1,2",
                 lams="0.1,0.3,1", model="resnet50", size=64, pretrain_steps=0,
                 finetune_steps=3000, data_dir="data"),
}


def plan(workdir: str, s: dict) -> list[studies.Run]:
  base = config_lib.load_config(os.path.join(CONFIGS, "study.py"), studies.config_arg(
      s, "pretrain_steps", "finetune_steps", "size", "model", "data_dir"))
  init = s["source"]
  if init == "pretrain":
    init = studies.sources(workdir, {"natural": base.pretrain}, s.get("launch"))["natural"]
  f = base.finetune
  f.model.init = init
  if s["target"] != f.data.name:
    f.data.source, f.data.name, f.data.size = "medmnist", s["target"], s["size"]
  methods = {"full_ft": config_lib.method_config("full_ft")}
  for lam in studies.csv_list(s["lams"], float):
    methods[f"repsim_lam{lam:g}"] = config_lib.method_config("repsim", q_mode="learned", lam=lam)
  out = []
  for seed in studies.csv_list(s["seeds"], int):
    for name, mcfg in methods.items():
      c = copy.deepcopy(f)
      c.seed, c.method = seed, mcfg
      out.append(studies.Run(c, {"method": name, "seed": seed}))
  return out


def run_study(workdir: str, s: dict) -> pd.DataFrame:
  runs = plan(workdir, s)
  rows = []
  for run, res in zip(runs, studies.execute(workdir, runs, s.get("launch"))):
    test = res["final"]["test"]
    rows.append({**run.key, **{k: test[k] for k in ("accuracy", "auc", "balanced_accuracy")},
                 **{f"cka_{k}": v for k, v in res["similarity"]["linear_cka"].items()}})
  df = pd.DataFrame(rows)
  write_outputs(df, workdir)
  return df


def headline(df: pd.DataFrame) -> pd.DataFrame:
  """Per method: mean metrics and the change against full fine-tuning."""
  mean = df.groupby("method", sort=False).mean(numeric_only=True).drop(columns="seed")
  ft = mean.loc["full_ft"]
  out = mean[["accuracy", "auc", "cka_pre_logits"]].copy()
  out["cka_relative_change"] = mean["cka_pre_logits"] / ft["cka_pre_logits"] - 1.0
  out["cka_change_pct"] = 100.0 * out["cka_relative_change"]
  out["accuracy_points_vs_ft"] = 100.0 * (mean["accuracy"] - ft["accuracy"])
  return out


def write_outputs(df: pd.DataFrame, workdir: str) -> None:
  summary = df.groupby("method", sort=False).agg(["mean", "std"]).drop(columns="seed")
  summary.columns = [f"{c}_{s}" for c, s in summary.columns]
  summary = summary.reset_index()
  head = headline(df).reset_index()
  layers = [c for c in df.columns if c.startswith("cka_")]
  lines = ["# RepSim vs full fine-tuning", "",
           f"{df.seed.nunique()} seeds; means over seeds. CKA: linear CKA of each layer to the "
           "pretrained model on the target test split.", ""]
  lines += studies.markdown_table(head, {
      "method": "method", "accuracy": "accuracy", "auc": "AUC", "cka_pre_logits": "CKA pre_logits",
      "cka_change_pct": "CKA change vs full FT (%)",
      "accuracy_points_vs_ft": "accuracy (points) vs full FT"})
  mean = df.groupby("method", sort=False)[layers].mean().reset_index()
  lines += ["", "Linear CKA to the pretrained model per layer (mean over seeds):", ""]
  lines += studies.markdown_table(mean, {"method": "method", **{l: l[4:] for l in layers}},
                                  digits=3)
  lines += ["", "Per-run rows: `results.csv`; mean ± std: `summary.csv`; plot: `cka_by_layer.png`."]
  studies.write_outputs(workdir, {"results": df, "summary": summary, "headline": head},
                        {"cka_by_layer.png": lambda p: plot_cka(df, p)}, lines)


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
  return studies.main(__doc__, SETTINGS, run_study, argv)


if __name__ == "__main__":
  host.malloc_on_huge_pages()  # may re-exec this process, as repsim_jax.main does
  sys.exit(0 if main() is not None else 1)
