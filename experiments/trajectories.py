"""Study: how does the representation drift during fine-tuning, and does the drift cost what the
pretrained model knew? (Similarity trajectories, DESIGN §9.)

  python experiments/trajectories.py --workdir=runs/study_trajectories [--setting=small|full]
      [--sources=supervised=pretrain:supervised,simclr=pretrain:simclr]
      [--methods=full_ft,linear_probe,lp_ft,l2sp,repsim,scratch] [--seeds=0,1] [--evals=6]

Every method fine-tunes every source for every seed (`scratch`: random init, once per seed) and
evaluates `evals` times during training: linear CKA of every layer to the pretrained model (target
test split), the target's test accuracy, AUC and expected calibration error, and the quality
indicators on the *source* task through the fine-tuned backbone (k-NN and linear-probe accuracy on
its val split, its train split voting / fitting). A source is `pretrain:<objective>` (pretrained
here on the synthetic natural source: supervised, simclr, byol or dino) or a run directory /
weights file with `--source_data` naming its labelled task. Writes trajectories.csv (one row
per run and evaluation), fits.csv (Pearson r, slope, p, n of each layer's CKA against each
indicator, over all runs and checkpoints, pooled and per source), findings.csv, trajectories.png
(the (CKA, accuracy) plane per source), indicators.png, sharpness.png (the SAM sharpness of the
training batch over training, measured inside the jitted step: `analysis.in_step_sharpness`) and
report.md. `small`: synthetic data,
about 15 minutes on 2 CPU cores; `full`: DermaMNIST at 64 px from ImageNet weights.
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
INDICATORS = {"knn_accuracy": "source k-NN accuracy", "linear_probe_accuracy":
              "source linear-probe accuracy", "ece": "target ECE", "accuracy": "target accuracy",
              "sam_sharpness": "SAM sharpness (train batch)"}

SETTINGS = {
    "small": dict(sources="supervised=pretrain:supervised,simclr=pretrain:simclr",
                  methods="full_ft,linear_probe,lp_ft,l2sp,repsim,scratch", seeds="0,1",
                  model="resnet_small", size=32, pretrain_steps=1000, ssl_steps=2000,
                  finetune_steps=300, evals=6, batch=64, lam=0.3, target="medical_gray",
                  source_data="natural", data_dir=""),
    "full": dict(sources="imagenet=weights/r50.safetensors", methods="full_ft,linear_probe,"
                 "lp_ft,l2sp,repsim,scratch", seeds="0,1,2", model="resnet50", size=64,
                 pretrain_steps=0, ssl_steps=0, finetune_steps=3000, evals=10, batch=64, lam=0.3,
                 target="dermamnist", source_data="imagenette", data_dir="data"),
}


def base_configs(s: dict):
  """The shared study base (configs/study.py) at this setting's sizes."""
  return config_lib.load_config(os.path.join(CONFIGS, "study.py"), studies.config_arg(
      s, "pretrain_steps", "ssl_steps", "finetune_steps", "size", "model", "lam", "batch",
      "data_dir"))


def source_task(pre, s: dict):
  """The labelled source task the indicators are measured on: the synthetic source the sources
  here pretrain on, or a TFDS / MedMNIST name (`full`)."""
  d = copy.deepcopy(pre.data)
  if s["source_data"] != "natural":
    d.source, d.name, d.image_size = "tfds", s["source_data"], s["size"]
  return d


def sources(workdir: str, s: dict, b) -> dict[str, str]:
  """{name: init}: `pretrain:<objective>` sources trained here (once each), others as given."""
  given = dict(item.partition("=")[::2] for item in studies.csv_list(s["sources"]))
  trained = studies.sources(workdir, {name: studies.source_config(b, init.split(":", 1)[1])
                                      for name, init in given.items()
                                      if init.startswith("pretrain:")}, s.get("launch"))
  return {name: trained.get(name, init) for name, init in given.items()}


def plan(workdir: str, s: dict) -> list[studies.Run]:
  b = base_configs(s)
  pre, f, repsim = b.pretrain, b.finetune, b.repsim
  inits = sources(workdir, s, b)
  f.data.name = s["target"]
  if s["target"] not in ("medical_gray", "medical_rgb", "natural"):
    f.data.source, f.data.size = "medmnist", s["size"]
  f.train.eval_every = max(1, s["finetune_steps"] // s["evals"])
  f.train.eval_splits = ("val", "test")
  f.analysis.eval_similarity = True
  # SAM sharpness of the global batch inside the step, on logged steps: sharpness over training.
  f.analysis.in_step_sharpness = "sam"
  f.train.log_every = f.train.eval_every
  f.analysis.source_data = source_task(pre, s)
  out = []
  for name in studies.csv_list(s["methods"]):
    for src, init in ([("none", "")] if name == "scratch" else inits.items()):
      for seed in studies.csv_list(s["seeds"], int):
        c = copy.deepcopy(f)
        c.seed, c.model.init = seed, init
        c.method = copy.deepcopy(repsim) if name == "repsim" else config_lib.method_config(
            "full_ft" if name == "scratch" else name)
        out.append(studies.Run(c, {"source": src, "method": name, "seed": seed}))
  return out


def trajectory(workdir: str, run: studies.Run, res: dict) -> pd.DataFrame:
  """One row per evaluation of a run: target test metrics, source indicators, CKA per layer."""
  test = studies.history(workdir, res, "test")[["step", "accuracy", "auc", "ece"]]
  src = studies.history(workdir, res, "source")
  out = test.merge(src, on="step", how="left")
  train = studies.history(workdir, res, "train")
  if "sharpness/sam" in train:
    out = out.merge(train[["step", "sharpness/sam"]].rename(
        columns={"sharpness/sam": "sam_sharpness"}), on="step", how="left")
  if run.cfg.model.init:
    sim = studies.history(workdir, res, "similarity")
    sim = sim[["step"] + [c for c in sim if c.startswith("linear_cka/")]]
    out = out.merge(sim.rename(columns=lambda c: c.replace("linear_cka/", "cka_")), on="step")
  for k, v in reversed(run.key.items()):
    out.insert(0, k, v)
  return out


def run_study(workdir: str, s: dict) -> pd.DataFrame:
  runs = plan(workdir, s)
  results = studies.execute(workdir, runs, s.get("launch"))
  df = pd.concat([trajectory(workdir, r, res) for r, res in zip(runs, results)],
                 ignore_index=True)
  write_outputs(df, workdir)
  return df


def layers(df: pd.DataFrame) -> list[str]:
  out = [c for c in df.columns if c.startswith("cka_")]
  if "cka_layer4" in out and "cka_pre_logits" in out and np.allclose(
      df["cka_layer4"].dropna(), df["cka_pre_logits"].dropna()):
    out.remove("cka_layer4")  # a ResNet's pre_logits is its mean-pooled layer4: same values
  return out


def fits(df: pd.DataFrame) -> pd.DataFrame:
  """Least-squares line of each indicator against each layer's CKA, over all runs from a
  pretrained source and all their checkpoints: pooled and per source."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  pre = df[df.method != "scratch"]
  rows = []
  groups = [("all", pre)] + [(f"source={s}", g) for s, g in pre.groupby("source", sort=False)]
  for group, g in groups:
    for layer in layers(df):
      for ind in (i for i in INDICATORS if i in g):
        d = g[[layer, ind]].dropna()
        if len(d) < 3 or d[layer].nunique() < 2:
          continue
        r = stats.linregress(d[layer], d[ind])
        rows.append({"group": group, "layer": layer[4:], "indicator": ind, "r": r.rvalue,
                     "slope": r.slope, "slope_stderr": r.stderr, "intercept": r.intercept,
                     "p_value": r.pvalue, "n": len(d)})
  return pd.DataFrame(rows)


def final(df: pd.DataFrame) -> pd.DataFrame:
  """Each run's last evaluation."""
  return df.loc[df.groupby(["source", "method", "seed"], sort=False).step.idxmax()]


def findings(df: pd.DataFrame, fit: pd.DataFrame) -> pd.DataFrame:
  """The paper's first finding (runs with high accuracy that keep high similarity exist) and
  third (supervised and self-supervised sources follow different paths), as measured numbers."""
  end = final(df[df.method != "scratch"])
  rows = []
  for src, g in end.groupby("source", sort=False):
    ft = g[g.method == "full_ft"]
    if ft.empty:
      continue
    bar = ft.accuracy.mean() - 0.01
    high = g[g.accuracy >= bar]
    best = high.loc[high.cka_pre_logits.idxmax()] if len(high) else None
    rows.append({"source": src, "full_ft_accuracy": ft.accuracy.mean(),
                 "full_ft_cka": ft.cka_pre_logits.mean(), "high_accuracy_runs": len(high),
                 "best_cka_among_them": np.nan if best is None else best.cka_pre_logits,
                 "its_method": "" if best is None else best.method,
                 "its_accuracy": np.nan if best is None else best.accuracy})
  out = pd.DataFrame(rows)
  sl = fit[(fit.layer == "pre_logits") & (fit.indicator == "accuracy")
           & fit.group.str.startswith("source=")].set_index("group")
  out["accuracy_vs_cka_slope"] = [sl.slope.get(f"source={s}", np.nan) for s in out.source]
  out["slope_stderr"] = [sl.slope_stderr.get(f"source={s}", np.nan) for s in out.source]
  return out


def write_outputs(df: pd.DataFrame, workdir: str) -> None:
  fit, n_seeds = fits(df), df.seed.nunique()
  found = findings(df, fit)
  lines = ["# Similarity trajectories during fine-tuning", "",
           f"{n_seeds} seeds; {df.groupby(['source', 'method', 'seed']).ngroups} runs, "
           f"{len(df)} evaluations. CKA: linear CKA to the pretrained model on the target test "
           "split. Indicators: k-NN (k = 20) and linear-probe accuracy on the source task's val "
           "split through the fine-tuned backbone; target test ECE (15 bins).", "",
           "## Findings", ""]
  for r in found.itertuples():
    kept = r.best_cka_among_them - r.full_ft_cka
    lines.append(
        f"- **{r.source}**: {r.high_accuracy_runs} runs end within 1 point of full FT's "
        f"accuracy ({r.full_ft_accuracy:.4f}) or above; the most similar of them ({r.its_method}, "
        f"accuracy {r.its_accuracy:.4f}) keeps CKA {r.best_cka_among_them:.4f} at pre_logits "
        f"against full FT's {r.full_ft_cka:.4f}: high-accuracy runs that keep high similarity "
        + ("exist here (first finding held)." if kept >= 0.1 else
           "were not found here (first finding did not hold: < 0.1 CKA more)."))
  if len(found) == 2:
    a, b = found.itertuples()
    apart = abs(a.accuracy_vs_cka_slope - b.accuracy_vs_cka_slope) > 1.96 * np.hypot(
        a.slope_stderr, b.slope_stderr)
    lines.append(
        f"- Paths (target accuracy against CKA at pre_logits, all methods and checkpoints): "
        f"slope {a.accuracy_vs_cka_slope:.4f} ± {a.slope_stderr:.4f} ({a.source}) against "
        f"{b.accuracy_vs_cka_slope:.4f} ± {b.slope_stderr:.4f} ({b.source}) (± one standard "
        "error): the sources " + ("follow different paths (third finding held: the slopes "
                                  "differ by more than 1.96 combined standard errors)." if apart
                                  else "do not follow measurably different paths here (third "
                                  "finding did not hold)."))
  lines += [""] + studies.markdown_table(found, digits=4)
  lines += ["", "## Linear fits over all runs and checkpoints", "",
            "Each indicator against each layer's CKA (least squares; Pearson r and its two-sided "
            "p-value), every run from a pretrained source pooled; per source in `fits.csv`.", ""]
  lines += studies.markdown_table(fit[fit.group == "all"], {"group": "runs", "layer": "layer", "indicator":
                                        "indicator", "r": "r", "slope": "slope", "p_value": "p",
                                        "n": "n"}, digits=4)
  end = final(df)
  cols = ["accuracy", "ece", "knn_accuracy", "linear_probe_accuracy", "sam_sharpness"]
  summary = end.groupby(["source", "method"], sort=False).agg(
      **{c: (c, "mean") for c in [c for c in cols if c in df] + layers(df)}).reset_index()
  lines += ["", "## At the end of training (mean over seeds)", ""]
  lines += studies.markdown_table(summary, digits=4)
  lines += ["", "Rows per evaluation: `trajectories.csv`; fits: `fits.csv`; findings: "
            "`findings.csv`; end of training: `final.csv`; plots: `trajectories.png`, "
            "`indicators.png`" + (", `sharpness.png` (SAM sharpness of the training batch, "
                                  "inside the step)" if "sam_sharpness" in df else "") + "."]
  studies.write_outputs(workdir, {"trajectories": df, "fits": fit, "findings": found,
                                  "final": summary},
                        {"trajectories.png": lambda p: plot_trajectories(df, p),
                         "indicators.png": lambda p: plot_indicators(df, fit, p),
                         **({"sharpness.png": lambda p: plot_sharpness(df, p)}
                            if "sam_sharpness" in df else {})}, lines)


def plot_trajectories(df: pd.DataFrame, path: str) -> None:
  """Per source: each method's path in the (CKA at pre_logits, target accuracy) plane, the mean
  over seeds at each evaluation, from a small marker (first) to a large one (last)."""
  from repsim_jax import plots  # pylint: disable=g-import-not-at-top
  srcs = [s for s in dict.fromkeys(df.source) if s != "none"]
  methods = list(dict.fromkeys(df.method))
  scratch = final(df[df.method == "scratch"]).accuracy
  with plots.figure(ncols=len(srcs), width=4.2, height=3.6) as (fig, axes):
    for ax, src in zip(axes, srcs):
      for i, m in enumerate(methods):
        g = df[(df.source == src) & (df.method == m)]
        if g.empty:
          continue
        mu = g.groupby("step")[["cka_pre_logits", "accuracy"]].mean()
        color = plots.PALETTE[i % len(plots.PALETTE)]
        ax.plot(mu.cka_pre_logits, mu.accuracy, "-", color=color, label=m, lw=1.2)
        ax.scatter(mu.cka_pre_logits, mu.accuracy, s=np.linspace(6, 40, len(mu)), color=color)
      if len(scratch):
        ax.axhline(scratch.mean(), color="0.4", ls="--", lw=1,
                   label=f"scratch (final, mean of {len(scratch)} seed(s))")
      ax.set_xlabel("linear CKA to the pretrained model (pre_logits)")
      ax.set_ylabel("target test accuracy")
      ax.set_title(f"source: {src}; mean over {df.seed.nunique()} seed(s) per step", fontsize=9)
    axes[-1].annotate("marker size grows with the training step", (1.0, -0.25),
                      xycoords="axes fraction", ha="right", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4),
               bbox_to_anchor=(0.5, 1.0))
    fig.subplots_adjust(top=0.8, bottom=0.2, wspace=0.3)
    plots.save(fig, path)


def plot_sharpness(df: pd.DataFrame, path: str) -> None:
  """SAM sharpness of the training batch over training, a panel per source, a line per method:
  mean ± std over seeds at each evaluation step."""
  from repsim_jax import plots  # pylint: disable=g-import-not-at-top
  srcs = list(dict.fromkeys(df.source))
  methods = list(dict.fromkeys(df.method))
  with plots.figure(ncols=len(srcs), width=3.8, height=3.2) as (fig, axes):
    for ax, src in zip(axes, srcs):
      for i, m in enumerate(methods):
        g = df[(df.source == src) & (df.method == m)].dropna(subset=["sam_sharpness"])
        if g.empty:
          continue
        agg = g.groupby("step").sam_sharpness.agg(["mean", "std"]).fillna(0.0)
        ax.errorbar(agg.index, agg["mean"], yerr=agg["std"], marker="o", ms=3, capsize=2,
                    label=m, color=plots.PALETTE[i % len(plots.PALETTE)])
      ax.set_xlabel("training step")
      ax.set_ylabel("SAM sharpness of the train batch (ρ = 0.05)")
      ax.set_title(f"source: {src}; mean ± std over {df.seed.nunique()} seed(s)", fontsize=9)
    handles, labels = [], []
    for ax in axes:
      for h, lab in zip(*ax.get_legend_handles_labels()):
        if lab not in labels:
          handles.append(h)
          labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6),
               bbox_to_anchor=(0.5, 1.0))
    fig.subplots_adjust(top=0.8, wspace=0.35)
    plots.save(fig, path)


def plot_indicators(df: pd.DataFrame, fit: pd.DataFrame, path: str) -> None:
  """Each indicator against CKA at pre_logits, every run from a pretrained source at every
  evaluation (colour: method; marker: source), with the pooled least-squares line."""
  from repsim_jax import plots  # pylint: disable=g-import-not-at-top
  pre = df[df.method != "scratch"]
  methods, srcs = list(dict.fromkeys(pre.method)), list(dict.fromkeys(pre.source))
  markers = "os^Dv"
  inds = ["knn_accuracy", "linear_probe_accuracy", "ece"]
  with plots.figure(ncols=len(inds), width=3.6, height=3.2) as (fig, axes):
    for ax, ind in zip(axes, inds):
      for (i, m), (j, s) in [(a, b) for a in enumerate(methods) for b in enumerate(srcs)]:
        g = pre[(pre.method == m) & (pre.source == s)]
        ax.scatter(g.cka_pre_logits, g[ind], s=10, marker=markers[j % len(markers)],
                   color=plots.PALETTE[i % len(plots.PALETTE)], alpha=0.8,
                   label=f"{m} / {s}")
      r = fit[(fit.group == "all") & (fit.layer == "pre_logits") & (fit.indicator == ind)]
      if len(r):
        r = r.iloc[0]
        x = np.linspace(pre.cka_pre_logits.min(), pre.cka_pre_logits.max(), 2)
        ax.plot(x, r.intercept + r.slope * x, "k-", lw=1)
        ax.set_title(f"r = {r.r:.2f}, p = {r.p_value:.2g}, n = {r.n}", fontsize=9)
      ax.set_xlabel("linear CKA to the pretrained model (pre_logits)")
      ax.set_ylabel(INDICATORS[ind])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 5),
               bbox_to_anchor=(0.5, 1.0), fontsize=7)
    fig.subplots_adjust(top=0.8, wspace=0.35)
    plots.save(fig, path)


def main(argv=None):
  return studies.main(__doc__, SETTINGS, run_study, argv)


if __name__ == "__main__":
  host.malloc_on_huge_pages()  # may re-exec this process, as repsim_jax.main does
  sys.exit(0 if main() is not None else 1)
