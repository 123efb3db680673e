"""Study: supervised against self-supervised pretraining for transfer, along three axes of the
target (after Zhao et al.): class imbalance, data scarcity and domain mismatch.

  python experiments/transfer_vs_ssl.py --workdir=runs/study_transfer_vs_ssl [--setting=small]
      [--objectives=supervised,simclr,byol,dino] [--seeds=0,1] [--finetune_steps=N]

The same backbone is pretrained on the same source (the synthetic natural images in `small`)
once per objective, then fully fine-tuned on each target of each axis for every seed:
- imbalance: the base target's train split subsampled to largest/smallest class ratios 1, 5, 20
  (`config.data.train_imbalance`; val and test stay as stored);
- scarcity: 1 %, 10 % and 100 % of each class of the train split (`config.data.train_fraction`);
- domain: a near target (new images of the source's kind), a far RGB target and a far grayscale
  one (`small`); three MedMNIST sets in `full`.
Per run: test accuracy, balanced accuracy, macro one-vs-rest AUC and macro F1. Writes
results.csv (one row per run; `factor` is the axis, `level` its value), summary.csv (mean,
std, n per factor, level and source),
best.csv (per axis point: the best source and SSL's best minus supervised), a plot per axis
(imbalance.png, scarcity.png, domain.png) and report.md. `small`: about 20 minutes on 2 CPU
cores; `full`: ResNet-50 pretrained on a TFDS source (`--source=imagenette`, prepared in
--data_dir) and fine-tuned on MedMNIST sets at 64 px, on accelerators.
"""

from __future__ import annotations

import copy
import os
import sys

import pandas as pd

from repsim_jax import config_lib, studies
from repsim_jax.cpu import host

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
METRICS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auc": "AUC",
           "f1": "macro F1"}
AXES = {"imbalance": "largest / smallest class in train", "scarcity": "fraction of train used",
        "domain": "target domain"}

SETTINGS = {
    "small": dict(source="natural", objectives="supervised,simclr,byol,dino", seeds="0,1", model="resnet_small",
                  size=32, pretrain_steps=1000, ssl_steps=1500, finetune_steps=200, batch=64,
                  base_target="medical_gray", train_size=3000, imbalances="1,5,20",
                  fractions="0.01,0.1,1", domains="near=natural,far_rgb=medical_rgb,"
                  "far_gray=medical_gray", data_dir=""),
    "full": dict(source="imagenette", objectives="supervised,simclr,byol,dino", seeds="0,1,2", model="resnet50",
                 size=64, pretrain_steps=20000, ssl_steps=20000, finetune_steps=3000, batch=256,
                 base_target="dermamnist", train_size=0, imbalances="1,5,20",
                 fractions="0.01,0.1,1", domains="rgb=dermamnist,gray=pneumoniamnist,"
                 "far=organamnist", data_dir="data"),
}
SYNTHETIC = ("natural", "medical_gray", "medical_rgb")


def base_configs(s: dict):
  """The shared study base (configs/study.py), its sources on a TFDS set unless `natural`."""
  b = config_lib.load_config(os.path.join(CONFIGS, "study.py"), studies.config_arg(
      s, "pretrain_steps", "ssl_steps", "finetune_steps", "size", "model", "batch", "data_dir"))
  if s["source"] != "natural":  # a TFDS source at the targets' size
    for c in (b.pretrain, *b.ssl.values()):
      c.data.update(dict(source="tfds", name=s["source"], image_size=s["size"]))
  return b


def target(f, name: str, s: dict, **data):
  d = copy.deepcopy(f.data)
  d.name = name
  if name in SYNTHETIC:
    d.imbalance, d.seed = 1.0, 1  # new images, balanced before any subsampling
    if s["train_size"]:
      d.train_size = s["train_size"]
  else:
    d.source, d.size = "medmnist", s["size"]
  d.update(data)
  return d


def axis_points(f, s: dict) -> list[tuple[str, str, object]]:
  """[(axis, value label, data config)] for every point of the three axes."""
  out = [("imbalance", f"{r:g}", target(f, s["base_target"], s, train_imbalance=float(r)))
         for r in studies.csv_list(s["imbalances"], float)]
  out += [("scarcity", f"{x:g}", target(f, s["base_target"], s, train_fraction=float(x)))
          for x in studies.csv_list(s["fractions"], float)]
  for item in studies.csv_list(s["domains"]):
    label, _, name = item.partition("=")
    out.append(("domain", label, target(f, name, s)))
  return out


def plan(workdir: str, s: dict) -> list[studies.Run]:
  b = base_configs(s)
  f = b.finetune
  objectives = studies.csv_list(s["objectives"])
  inits = studies.sources(workdir, {o: studies.source_config(b, o) for o in objectives},
                          s.get("launch"))
  out = []
  for axis, value, d in axis_points(f, s):
    for objective in objectives:
      for seed in studies.csv_list(s["seeds"], int):
        c = copy.deepcopy(f)
        c.seed, c.data, c.model.init = seed, copy.deepcopy(d), inits[objective]
        c.analysis.final_similarity = False
        out.append(studies.Run(c, {"factor": axis, "level": value, "source": objective,
                                   "seed": seed}))
  return out


def run_study(workdir: str, s: dict) -> pd.DataFrame:
  runs = plan(workdir, s)
  rows = [{**r.key, **{m: res["final"]["test"][m] for m in METRICS}, "run": res["run_dir"]}
          for r, res in zip(runs, studies.execute(workdir, runs, s.get("launch")))]
  df = pd.DataFrame(rows)
  write_outputs(df, workdir)
  return df


def summarise(df: pd.DataFrame) -> pd.DataFrame:
  out = df.groupby(["factor", "level", "source"], sort=False)[list(METRICS)].agg(
      ["mean", "std", "count"])
  out.columns = [f"{c}_{s}" for c, s in out.columns]
  return out.reset_index()


def best(summary: pd.DataFrame, metric: str = "balanced_accuracy") -> pd.DataFrame:
  """Per axis point: the source with the highest mean `metric`, and the best SSL source's mean
  minus the supervised one's (points)."""
  rows = []
  for (axis, value), g in summary.groupby(["factor", "level"], sort=False):
    m = g.set_index("source")[f"{metric}_mean"]
    ssl = m.drop("supervised", errors="ignore")
    rows.append({"factor": axis, "level": value, "best_source": m.idxmax(),
                 "best": m.max(), "supervised": m.get("supervised", float("nan")),
                 "best_ssl_source": ssl.idxmax() if len(ssl) else "",
                 "ssl_minus_supervised_points": 100.0 * (ssl.max() - m.get("supervised"))
                 if len(ssl) and "supervised" in m else float("nan")})
  return pd.DataFrame(rows)


def write_outputs(df: pd.DataFrame, workdir: str) -> None:
  summary = summarise(df)
  top = best(summary)
  lines = ["# Supervised vs self-supervised pretraining for transfer", "",
           f"Sources: {', '.join(dict.fromkeys(df.source))}, one backbone pretrained on the "
           f"same images; full fine-tuning; {df.seed.nunique()} seeds per point (mean ± std).",
           "", "## Which pretraining transfers best (balanced accuracy)", ""]
  lines += studies.markdown_table(top, {
      "factor": "axis", "level": "value", "best_source": "best source", "best": "its mean",
      "supervised": "supervised", "best_ssl_source": "best SSL source",
      "ssl_minus_supervised_points": "best SSL - supervised (points)"}, digits=4)
  wins = top[top.ssl_minus_supervised_points > 0]
  lines += ["", f"SSL beats supervised at {len(wins)} of {len(top)} points"
            + (f" ({', '.join(f'{r.factor} {r.level}' for r in wins.itertuples())})"
               if len(wins) else "") + "."]
  for axis in AXES:
    sub = summary[summary.factor == axis].copy()
    if sub.empty:
      continue
    for m in METRICS:
      sub[m] = [studies.pm(mu, sd) for mu, sd in zip(sub[f"{m}_mean"], sub[f"{m}_std"])]
    lines += ["", f"## {axis}: {AXES[axis]}", ""]
    lines += studies.markdown_table(sub, {"level": "value", "source": "source", **METRICS})
  lines += ["", "Per-run rows: `results.csv`; mean, std, n: `summary.csv`; best per point: "
            "`best.csv`; plots: " + ", ".join(f"`{a}.png`" for a in AXES) + "."]
  figures = {f"{axis}.png": (lambda p, a=axis: plot_axis(df, a, p))
             for axis in AXES if axis in set(df.factor)}
  studies.write_outputs(workdir, {"results": df, "summary": summary, "best": top}, figures,
                        lines)


def plot_axis(df: pd.DataFrame, axis: str, path: str) -> None:
  """The four metrics along one axis, a line per source, mean ± std over seeds."""
  from repsim_jax import plots  # pylint: disable=g-import-not-at-top
  sub = df[df.factor == axis]
  values = list(dict.fromkeys(sub.level))
  with plots.figure(ncols=len(METRICS), width=2.9, height=2.8) as (fig, axes):
    for ax, (m, label) in zip(axes, METRICS.items()):
      for i, (src, g) in enumerate(sub.groupby("source", sort=False)):
        agg = g.groupby("level", sort=False)[m].agg(["mean", "std"]).reindex(values)
        ax.errorbar(range(len(values)), agg["mean"], yerr=agg["std"].fillna(0.0), marker="o",
                    capsize=2, label=src, color=plots.PALETTE[i % len(plots.PALETTE)])
      ax.set_xticks(range(len(values)), values)
      ax.set_xlabel(AXES[axis])
      ax.set_ylabel(f"test {label}")
    axes[-1].annotate(f"mean ± std over {sub.seed.nunique()} seed(s)", (1.0, -0.42),
                      xycoords="axes fraction", ha="right", fontsize=8)
    plots.legend_above(fig, axes[0], top=0.85)
    plots.save(fig, path)


def main(argv=None):
  return studies.main(__doc__, SETTINGS, run_study, argv)


if __name__ == "__main__":
  host.malloc_on_huge_pages()  # may re-exec this process, as repsim_jax.main does
  sys.exit(0 if main() is not None else 1)
