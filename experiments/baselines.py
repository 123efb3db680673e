"""Study: RepSim against every fine-tuning baseline (the RepSim paper's table).

  python experiments/baselines.py --workdir=runs/study_baselines [--setting=small|full]
      [--methods=full_ft,linear_probe,lp_ft,l2sp,delta,bss,sam,asam,repsim]
      [--targets=medical_gray,medical_rgb] [--seeds=0,1,2] [--finetune_steps=N] [--data_dir=DIR]
      [--strengths='delta.lam=0.001,0.01,0.1;bss.lam=0.001,0.01,0.1']

Every method fine-tunes the same pretrained model on every target for every seed. Per run:
test accuracy, balanced accuracy and AUC; linear CKA of every layer to the pretrained model (test
split); and at the end SAM sharpness (ρ = 0.05) and the Hessian's top eigenvalue on a fixed probe
set of val batches (BatchNorm in eval mode). The report gives each method's relative change against
full fine-tuning on the same target (mean over seeds), as the paper reports it (+30% similarity,
-42% sharpness for RepSim). `--strengths` gives methods a grid of one method key each: such a
method trains once per value (every seed), and per target the value with the best seed-mean val
accuracy is the one reported (`strengths.csv` lists every candidate). `small`: the default run's source (synthetic natural, pretrained
here once) and two synthetic targets, 2 seeds, about 16 minutes on 2 CPU cores
(`--seeds=0,1,2`: about 25). `full`: five MedMNIST sets
at 224 px (download `<name>_224.npz` into --data_dir) from ImageNet ResNet-50 weights (`python -m
repsim_jax.models.export torchvision:resnet50 weights/r50.safetensors`), on accelerators.
Outputs: results.csv (one row per run), summary.csv (mean, std, n per target and method),
relative.csv and relative_mean.csv (change against full FT per target and over targets),
sharpness_curves.csv and sharpness_over_training.png (the training batch's SAM sharpness at every
logged step, measured inside the jitted step: `analysis.in_step_sharpness`), metrics.png,
cka_by_layer.png, report.md.
"""

from __future__ import annotations

import copy
import itertools
import os
import sys

import numpy as np
import pandas as pd

from repsim_jax import config_lib, methods as methods_lib, studies
from repsim_jax.cpu import host

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
METHODS = "full_ft,linear_probe,lp_ft,l2sp,delta,bss,sam,asam,repsim"
SYNTHETIC = ("natural", "medical_gray", "medical_rgb")

SETTINGS = {
    "small": dict(source="pretrain", targets="medical_gray,medical_rgb", methods=METHODS,
                  seeds="0,1", model="resnet_small", size=32, pretrain_steps=1000,
                  finetune_steps=300, batch=64, lam=0.3, data_dir="", strengths=""),
    "full": dict(source="weights/r50.safetensors",
                 targets="pathmnist,dermamnist,bloodmnist,breastmnist,pneumoniamnist",
                 methods=METHODS, seeds="0,1,2", model="resnet50", size=224, pretrain_steps=0,
                 finetune_steps=3000, batch=64, lam=0.3, data_dir="data", strengths=""),
}
# Per-run metrics: final test metrics, then the end-of-run sharpness on the probe set.
TEST = ("accuracy", "balanced_accuracy", "auc")
SHARP = ("sam_sharpness", "hessian_top_eigenvalue")
HEADERS = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.", "auc": "AUC", "cka_pre_logits": "CKA pre_logits",
           "sam_sharpness": "SAM sharpness", "hessian_top_eigenvalue": "Hessian λ_max"}


def base_configs(s: dict):
  """(pretraining config, fine-tuning config, RepSim method) at this setting's sizes."""
  b = config_lib.load_config(os.path.join(CONFIGS, "study.py"), studies.config_arg(
      s, "pretrain_steps", "finetune_steps", "size", "model", "lam", "batch", "data_dir"))
  return b.pretrain, b.finetune, b.repsim


def method(name: str, repsim) -> config_lib.ml_collections.ConfigDict:
  return copy.deepcopy(repsim) if name == "repsim" else config_lib.method_config(name)


def target_data(f, target: str, size: int):
  """The fine-tuning data config for `target`: a synthetic kind keeps the default run's target
  settings; any other name is a MedMNIST set at `size`."""
  d = copy.deepcopy(f.data)
  d.name = target
  if target not in SYNTHETIC:
    d.source, d.size = "medmnist", size
  return d


def strength_grid(spec: str, repsim) -> dict[str, tuple[str, list[float]]]:
  """`delta.lam=0.01,0.1;bss.lam=0.01,1` -> {"delta": ("lam", [0.01, 0.1]), ...}."""
  out = {}
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    lhs, _, values = part.partition("=")
    name, _, key = lhs.partition(".")
    if name not in METHODS.split(",") or not key or not values:
      raise ValueError(f"--strengths: {part!r}: expected <method>.<key>=v1,v2,... with a method "
                       f"of {METHODS}")
    if key not in method(name, repsim):
      raise ValueError(f"--strengths: {part!r}: config.method has no key {key!r}")
    uses = methods_lib.get_method(method(name, repsim)).uses
    if key not in uses:  # a grid over a key the method ignores trains the same run again
      raise ValueError(f"--strengths: {part!r}: method {name!r} does not read config.method."
                       f"{key} (it reads {', '.join(uses)})")
    try:
      out[name] = (key, [float(v) for v in values.split(",")])
    except ValueError:
      raise ValueError(f"--strengths: {part!r}: the values must be numbers") from None
  return out


def plan(workdir: str, s: dict) -> list[studies.Run]:
  pre, f, repsim = base_configs(s)
  grid = strength_grid(s.get("strengths", ""), repsim)
  init = s["source"]
  if init == "pretrain":
    init = studies.sources(workdir, {"natural": pre}, s.get("launch"))["natural"]
  out = []
  for target in studies.csv_list(s["targets"]):
    for name in studies.csv_list(s["methods"]):
      key, values = grid.get(name, (None, [None]))
      for value, seed in itertools.product(values, studies.csv_list(s["seeds"], int)):
        c = copy.deepcopy(f)
        c.seed = seed
        c.data = target_data(f, target, s["size"])
        c.model.init = init
        c.method = method(name, repsim)
        if key:
          c.method[key] = type(c.method[key])(value)
        # Sharpness once, at the end, on the first val batches (a fixed probe set).
        c.analysis.sharpness_every = c.train.num_steps
        c.analysis.sharpness.measures = "sam,hessian_eig"
        # And the training batch's, inside the jitted step on logged steps: sharpness over training.
        c.analysis.in_step_sharpness = "sam"
        c.train.log_every = max(1, c.train.num_steps // 10)
        c.train.eval_splits = ("val", "test")
        # The strength column only in studies with a grid (run names stay those of earlier runs).
        strength = {"strength": f"{key}={value:g}" if key else "default"} if grid else {}
        out.append(studies.Run(c, {"target": target, "method": name, **strength, "seed": seed}))
  return out


def select_strengths(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
  """(the runs of each (target, method)'s best strength by seed-mean val accuracy, every
  candidate's seed-mean val accuracy with `selected`). Without a strength column: (df, empty)."""
  if "strength" not in df:
    return df, pd.DataFrame()
  cand = (df.groupby(["target", "method", "strength"], sort=False).val_accuracy
          .agg(["mean", "count"]).reset_index()
          .rename(columns={"mean": "val_accuracy_mean", "count": "n"}))
  best = cand.loc[cand.groupby(["target", "method"], sort=False).val_accuracy_mean.idxmax()]
  chosen = set(zip(best.target, best.method, best.strength))
  cand["selected"] = [k in chosen for k in zip(cand.target, cand.method, cand.strength)]
  cand.insert(3, "value", [float(s.split("=")[1]) if "=" in s else np.nan for s in cand.strength])
  keep = [k in chosen for k in zip(df.target, df.method, df.strength)]
  return df[keep].reset_index(drop=True), cand


def row(run: studies.Run, res: dict) -> dict:
  test = res["final"]["test"]
  out = {**run.key, **{k: test[k] for k in TEST}, "val_accuracy": res["final"]["val"]["accuracy"]}
  out.update({f"cka_{k}": v for k, v in res["similarity"]["linear_cka"].items()})
  out.update({k: res["final"]["sharpness"][k] for k in SHARP})
  out["run"] = res["run_dir"]
  return out


def curve(workdir: str, run: studies.Run, res: dict) -> pd.DataFrame:
  """The run's in-step SAM sharpness at every logged step."""
  train = studies.history(workdir, res, "train")
  out = train[["step", "sharpness/sam"]].rename(columns={"sharpness/sam": "sam_sharpness"})
  for k, v in reversed(run.key.items()):
    out.insert(0, k, v)
  return out


def run_study(workdir: str, s: dict) -> pd.DataFrame:
  runs = plan(workdir, s)
  results = studies.execute(workdir, runs, s.get("launch"))
  df = pd.DataFrame([row(r, res) for r, res in zip(runs, results)])
  curves = pd.concat([curve(workdir, r, res) for r, res in zip(runs, results)],
                     ignore_index=True)
  write_outputs(df, workdir, curves)
  return df


def metric_columns(df: pd.DataFrame) -> list[str]:
  return [c for c in df.columns if c in TEST or c in SHARP or c.startswith("cka_")]


def summarise(df: pd.DataFrame) -> pd.DataFrame:
  g = df.groupby(["target", "method"], sort=False)[metric_columns(df)]
  out = g.agg(["mean", "std", "count"])
  out.columns = [f"{c}_{s}" for c, s in out.columns]
  return out.reset_index()


def relative(df: pd.DataFrame) -> pd.DataFrame:
  """Per target and method: the seed-mean of each metric against full FT's on the same target
  (relative change in % for similarity and sharpness, difference in points for the test
  metrics)."""
  cols = metric_columns(df)
  mean = df.groupby(["target", "method"], sort=False)[cols].mean()
  rows = []
  for (target, name), m in mean.iterrows():
    ft = mean.loc[(target, "full_ft")]
    r = {"target": target, "method": name}
    for c in cols:
      if c in TEST:
        r[f"{c}_points"] = 100.0 * (m[c] - ft[c])
      else:
        r[f"{c}_change_pct"] = 100.0 * (m[c] / ft[c] - 1.0)
    rows.append(r)
  return pd.DataFrame(rows)


def across_targets(rel: pd.DataFrame) -> pd.DataFrame:
  """Each method's relative changes, averaged over targets."""
  return rel.groupby("method", sort=False).mean(numeric_only=True).reset_index()


def write_outputs(all_runs: pd.DataFrame, workdir: str, curves: pd.DataFrame | None = None) -> None:
  """Tables, plots and report of the runs; with a strength grid, of each method's chosen one
  (results.csv keeps every run)."""
  df, candidates = select_strengths(all_runs)
  if curves is not None and not candidates.empty:
    curves = curves.merge(df[["target", "method", "strength", "seed"]])
  summary, rel = summarise(df), relative(df)
  overall = across_targets(rel)
  n_seeds, targets = df.seed.nunique(), list(dict.fromkeys(df.target))
  lines = ["# RepSim vs the fine-tuning baselines", "",
           f"Targets: {', '.join(targets)}; {n_seeds} seeds per (target, method). CKA: linear "
           "CKA of each layer to the pretrained model on the target test split. Sharpness: at "
           "the end of training, on a fixed probe set of val batches (SAM: ρ = 0.05, one ascent "
           "step; Hessian: top eigenvalue by Lanczos).", ""]
  if "full_ft" in set(df.method) and "repsim" in set(df.method):
    r = overall.set_index("method").loc["repsim"]
    verdict = lambda ok: "held" if ok else "did not hold"  # noqa: E731
    lines += ["## The paper's claims", "",
              f"- Similarity (+30% CKA at pre_logits): {r.cka_pre_logits_change_pct:+.1f}% "
              f"here, mean over targets: {verdict(r.cka_pre_logits_change_pct >= 30)}.",
              f"- Sharpness (-42% SAM sharpness): {r.sam_sharpness_change_pct:+.1f}% here: "
              f"{verdict(r.sam_sharpness_change_pct <= -42)}"
              + (" (sharpness is lower)" if -42 < r.sam_sharpness_change_pct < 0 else "") + ".",
              f"- Hessian top eigenvalue: {r.hessian_top_eigenvalue_change_pct:+.1f}%.",
              f"- Accuracy: {r.accuracy_points:+.2f} points against full fine-tuning.", ""]
  if not candidates.empty:
    lines += ["## Strengths chosen on validation accuracy", "",
              "Each gridded method's strength with the best seed-mean val accuracy per target is "
              "the one in every table and plot below (`strengths.csv`).", ""]
    shown = candidates.assign(selected=candidates.selected.map({True: "yes", False: ""}))
    lines += studies.markdown_table(shown, {
        "target": "target", "method": "method", "strength": "strength",
        "val_accuracy_mean": "val accuracy (seed mean)", "n": "seeds", "selected": "chosen"},
        digits=4) + [""]
  lines += ["## Change against full fine-tuning (mean over targets)", "",
            "Relative change of the seed-mean in % (CKA, sharpness); test metrics in points.",
            ""]
  lines += studies.markdown_table(overall, rel_headers(overall), digits=2)
  lines += ["", "## Per target (mean ± std over seeds)", ""]
  for target in targets:
    sub = summary[summary.target == target].copy()
    cols = [c for c in HEADERS if f"{c}_mean" in sub]
    for c in cols:
      sub[c] = [studies.pm(m, sd) for m, sd in zip(sub[f"{c}_mean"], sub[f"{c}_std"])]
    lines += [f"### {target}", ""] + studies.markdown_table(
        sub, {"method": "method", **{c: HEADERS[c] for c in cols}}) + [""]
  lines += ["## Per target, change against full fine-tuning", ""]
  lines += studies.markdown_table(rel, {"target": "target", **rel_headers(rel)}, digits=2)
  lines += ["", "Per-run rows: `results.csv`; mean, std, n: `summary.csv`; changes: "
            "`relative.csv` (per target), `relative_mean.csv` (over targets); plots: "
            "`metrics.png`, `cka_by_layer.png`" + (", `sharpness_over_training.png` (in-step "
                                                   "SAM sharpness: `sharpness_curves.csv`)"
                                                   if curves is not None else "") + "."]
  tables = {"results": all_runs, "summary": summary, "relative": rel, "relative_mean": overall}
  if not candidates.empty:
    tables["strengths"] = candidates
  figures = {"metrics.png": lambda p: plot_metrics(df, p),
             "cka_by_layer.png": lambda p: plot_cka(df, p)}
  if curves is not None:
    tables["sharpness_curves"] = curves
    figures["sharpness_over_training.png"] = lambda p: plot_curves(curves, p)
  studies.write_outputs(workdir, tables, figures, lines)


def rel_headers(rel: pd.DataFrame) -> dict:
  out = {"method": "method"}
  for c in rel.columns:
    if c.endswith("_points"):
      out[c] = f"{HEADERS[c[:-len('_points')]]} (points)"
    elif c.endswith("_change_pct") and c[:-len("_change_pct")] in HEADERS:
      out[c] = f"{HEADERS[c[:-len('_change_pct')]]} (%)"
  return out


def plot_metrics(df: pd.DataFrame, path: str) -> None:
  """Accuracy, CKA at pre_logits, SAM sharpness and Hessian top eigenvalue per method, a bar per
  target, mean ± std over seeds."""
  from repsim_jax import plots  # pylint: disable=g-import-not-at-top
  panels = [("accuracy", "test accuracy"), ("cka_pre_logits", "linear CKA to pretrained\n(pre_logits)"),
            ("sam_sharpness", "SAM sharpness (ρ = 0.05)"),
            ("hessian_top_eigenvalue", "Hessian top eigenvalue")]
  names = list(dict.fromkeys(df.method))
  g = df.groupby(["target", "method"], sort=False)
  mean, std = g.mean(numeric_only=True), g.std(numeric_only=True).fillna(0.0)
  targets = list(dict.fromkeys(df.target))
  with plots.figure(ncols=2, nrows=2, width=0.55 * len(names) + 2.0, height=2.8) as (fig, axes):
    for ax, (col, label) in zip(axes.flat, panels):
      plots.grouped_bars(ax, names, {t: [mean.loc[(t, m), col] for m in names] for t in targets},
                         errors={t: [std.loc[(t, m), col] for m in names] for t in targets},
                         ylabel=label, values=False)
      ax.tick_params(axis="x", labelrotation=35)
    axes[-1, -1].annotate(f"mean ± std over {df.seed.nunique()} seeds", (1.0, -0.45),
                          xycoords="axes fraction", ha="right", fontsize=8)
    plots.legend_above(fig, axes[0, 0], top=0.93)
    plots.save(fig, path)


def plot_curves(curves: pd.DataFrame, path: str) -> None:
  """In-step SAM sharpness of the training batch over training, a panel per target, a line per
  method, mean ± std over seeds."""
  from repsim_jax import plots  # pylint: disable=g-import-not-at-top
  targets = list(dict.fromkeys(curves.target))
  with plots.figure(ncols=len(targets), width=4.4, height=3.4) as (fig, axes):
    for ax, target in zip(axes, targets):
      sub = curves[curves.target == target]
      for i, (m, g) in enumerate(sub.groupby("method", sort=False)):
        agg = g.groupby("step").sam_sharpness.agg(["mean", "std"]).fillna(0.0)
        ax.errorbar(agg.index, agg["mean"], yerr=agg["std"], marker="o", ms=3, capsize=2,
                    label=m, color=plots.PALETTE[i % len(plots.PALETTE)],
                    linestyle="-" if i < len(plots.PALETTE) else "--")
      ax.set_yscale("log")
      ax.set_xlabel("training step")
      ax.set_ylabel("SAM sharpness of the train batch (ρ = 0.05)")
      ax.set_title(f"{target}: mean ± std over {sub.seed.nunique()} seeds", fontsize=9)
    plots.legend_above(fig, axes[0], top=0.8)
    plots.save(fig, path)


def plot_cka(df: pd.DataFrame, path: str) -> None:
  """Linear CKA to the pretrained model per layer, a panel per target, mean ± std over seeds."""
  from repsim_jax import plots  # pylint: disable=g-import-not-at-top
  layers = [c for c in df.columns if c.startswith("cka_")]
  if "cka_layer4" in layers and "cka_pre_logits" in layers and np.allclose(
      df["cka_layer4"], df["cka_pre_logits"]):
    layers.remove("cka_pre_logits")  # a ResNet's pre_logits is its mean-pooled layer4
  targets = list(dict.fromkeys(df.target))
  with plots.figure(ncols=len(targets), width=4.4, height=3.4) as (fig, axes):
    x = np.arange(len(layers))
    for ax, target in zip(axes, targets):
      sub = df[df.target == target]
      for i, (m, gm) in enumerate(sub.groupby("method", sort=False)):
        ax.errorbar(x + (i - 4) * 0.03, gm[layers].mean().values,
                    yerr=gm[layers].std().fillna(0).values, marker="o", ms=3, capsize=2,
                    label=m, color=plots.PALETTE[i % len(plots.PALETTE)],
                    linestyle="-" if i < len(plots.PALETTE) else "--")
      ax.set_xticks(x, [l[4:] for l in layers])
      ax.set_xlabel("layer (shallow to deep)")
      ax.set_ylabel("linear CKA to the pretrained model")
      ax.set_ylim(0, 1.05)
      ax.set_title(f"{target}: mean ± std over {sub.seed.nunique()} seeds", fontsize=9)
    plots.legend_above(fig, axes[0], top=0.8)
    plots.save(fig, path)


def main(argv=None):
  return studies.main(__doc__, SETTINGS, run_study, argv)


if __name__ == "__main__":
  host.malloc_on_huge_pages()  # may re-exec this process, as repsim_jax.main does
  sys.exit(0 if main() is not None else 1)
