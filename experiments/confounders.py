"""Study: does the pretraining source make a model lean on confounders? ("Source Matters",
Juodelyte et al. 2024; DESIGN §6.)

  python experiments/confounders.py --workdir=runs/study_confounders [--setting=small]
      [--sources=natural=pretrain:natural,medical=pretrain:medical_rgb,random=]
      [--kinds=tag,patch,lowpass,noise] [--ps=0,0.1,0.2,0.5,0.8,1] [--folds=3]
      [--methods=full_ft,repsim] [--data_dir=DIR]

For every source x confounder kind x p x fold x method it fine-tunes on the binary target with
the confounder on a fraction p of the positive training images, and evaluates AUC on the i.i.d.,
o.o.d. (association reversed) and clean test sets. A source is `pretrain:<synthetic kind>`
(pretrained here, supervised, once), a run directory or weights file (anything
`config.model.init` reads; `model@file` when it needs another model than the setting's, e.g.
`resnet50_keras@RadImageNet-ResNet50_notop.h5`), or empty (random init; RepSim is skipped for
it, having no pretrained representation to keep). Writes `results.csv` (one row per run), `summary.csv` (mean,
std, n over folds), `auc_vs_p.png` (one panel per test set and kind, mean ± std over folds) and
`report.md`: per kind and method, which source degrades more on o.o.d. (the i.i.d. - o.o.d. AUC
gap at the largest p, per fold) and a permutation t-test between every pair of sources
(`scipy.stats.ttest_ind` with 10,000 permutations). Every run directory is named by its config
identity, so a killed study re-runs only what is missing.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import sys

import numpy as np
import pandas as pd

from repsim_jax import config_lib, io, studies
from repsim_jax.cpu import host

TESTS = {"iid": "test", "ood": "test_ood", "clean": "test_clean"}

# `small`: synthetic data, 2 CPU cores. `full`: MedMNIST PneumoniaMNIST at 224 px (download
# pneumoniamnist_224.npz into --data_dir) from ImageNet ResNet-50 weights (`python -m
# repsim_jax.models.export torchvision:resnet50 weights/r50.safetensors`), RadImageNet's released
# ResNet-50 (its Keras `RadImageNet-ResNet50_notop.h5`, read with h5py) and random init, on
# accelerators.
SETTINGS = {
    "small": dict(
        # Normal tissue against a dark lesion (classes 0 and 4 of 8): a label signal the bright
        # tag does not resemble.
        target=dict(source="synthetic", name="medical_gray", num_classes=8, keep_classes=(0, 4),
                    size=32, train_size=2400, val_size=800, test_size=1600, difficulty=0.5),
        model="resnet_small", sources="natural=pretrain:natural,medical=pretrain:medical_rgb,random=",
        kinds="tag,lowpass", ps="0,0.5,1", folds=3, methods="full_ft,repsim",
        pretrain_steps=600, finetune_steps=150, batch=64, data_dir=""),
    "full": dict(
        target=dict(source="medmnist", name="pneumoniamnist", size=224),
        model="resnet50", sources="imagenet=weights/r50.safetensors,radimagenet="
        "resnet50_keras@weights/RadImageNet-ResNet50_notop.h5,random=",
        kinds="tag,patch,lowpass,noise", ps="0,0.1,0.2,0.5,0.8,1", folds=5,
        methods="full_ft,repsim", pretrain_steps=0, finetune_steps=2000, batch=64,
        data_dir="data"),
}


def parse_sources(spec: str) -> dict[str, str]:
  out = {}
  for item in filter(None, spec.split(",")):
    if "=" not in item:
      raise ValueError(f"--sources: {item!r}: expected name=init (init: a run dir, a weights "
                       "file or model@file, pretrain:<synthetic kind>, or empty for random init)")
    name, init = item.split("=", 1)
    out[name.strip()] = init.strip()
  return out


def model_and_init(init: str, model: str) -> tuple[str, str]:
  """`model@file` -> (model, file); a plain init keeps the setting's model."""
  if "@" in init and not os.path.exists(init):
    return tuple(part.strip() for part in init.split("@", 1))
  return model, init


def pretrain_source(kind: str, s: dict, data_dir: str):
  """The config of a supervised pretraining run on a synthetic source of this kind."""
  c = config_lib.train_config()
  c.data.name, c.data.size, c.data.data_dir = kind, s["target"]["size"], data_dir
  c.data.num_classes = 8
  c.data.train_size, c.data.val_size, c.data.test_size, c.data.difficulty = 4000, 400, 400, 0.1
  c.model.name = s["model"]
  c.train.num_steps, c.train.batch_size, c.train.eval_splits = s["pretrain_steps"], s["batch"], ("val",)
  c.optim.lr = 0.1
  return c


def finetune_config(s, init, kind, p, fold, method, data_dir, seed=0):
  c = config_lib.train_config()
  c.seed = seed
  c.data.update(copy.deepcopy(s["target"]))
  c.data.data_dir = data_dir
  c.data.folds, c.data.fold = s["folds"], fold
  c.data.confounder.update(dict(kind=kind, p=float(p), seed=fold))
  c.model.name, c.model.init = model_and_init(init, s["model"])
  c.method = config_lib.method_config(method)
  c.optim.lr, c.optim.warmup_steps = 0.02, 10
  c.train.num_steps, c.train.batch_size = s["finetune_steps"], s["batch"]
  c.train.eval_splits = ("val", *TESTS.values())
  c.train.checkpoint_every = 0
  c.analysis.final_similarity = False
  return c


def run_study(workdir: str, s: dict) -> pd.DataFrame:
  """Runs (or reads back) every run of setting `s` (a full SETTINGS entry, as `studies.main`
  gives it) and writes the CSVs, plots and report into `workdir`."""
  data_dir = s["data_dir"] or os.path.join(workdir, "data")
  sources = parse_sources(s["sources"])
  trained = studies.sources(workdir, {
      f"pretrain_{init.split(':', 1)[1]}": pretrain_source(init.split(":", 1)[1], s, data_dir)
      for init in sources.values() if init.startswith("pretrain:")}, s.get("launch"))
  inits = {name: trained.get(f"pretrain_{init.split(':', 1)[-1]}", init)
           for name, init in sources.items()}
  plan = []
  for (name, init), kind, p, fold, method in itertools.product(
      inits.items(), studies.csv_list(s["kinds"]), studies.csv_list(s["ps"], float),
      range(int(s["folds"])), studies.csv_list(s["methods"])):
    if method != "full_ft" and not init:
      continue  # a method that keeps the pretrained representation needs one
    plan.append(studies.Run(finetune_config(s, init, kind, p, fold, method, data_dir),
                            {"method": method, "kind": kind, "p": p, "fold": fold},
                            os.path.join("runs", name)))
  rows = [{"source": os.path.basename(run.group), **run.key,
           **{f"auc_{t}": res["final"][split]["auc"] for t, split in TESTS.items()},
           "run": res["run_dir"]} for run, res in zip(plan, studies.execute(workdir, plan, s.get("launch")))]
  df = pd.DataFrame(rows)
  write_outputs(df, workdir)
  return df


def summarise(df: pd.DataFrame) -> pd.DataFrame:
  cols = [f"auc_{t}" for t in TESTS]
  g = df.groupby(["source", "method", "kind", "p"], sort=False)[cols]
  out = g.agg(["mean", "std", "count"])
  out.columns = [f"{c}_{s}" for c, s in out.columns]
  return out.reset_index()


def gap_tests(df: pd.DataFrame) -> pd.DataFrame:
  """Per (kind, method, p): each source's i.i.d. - o.o.d. AUC gap over folds, and a permutation
  t-test between every pair of sources."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  rows = []
  for (kind, method, p), g in df.assign(gap=lambda d: d.auc_iid - d.auc_ood).groupby(
      ["kind", "method", "p"], sort=False):
    gaps = {s: gs.sort_values("fold").gap.to_numpy() for s, gs in g.groupby("source", sort=False)}
    for a, b in itertools.combinations(gaps, 2):
      # DESIGN's `permutations=10000`, in the API scipy >= 1.17 keeps for it.
      t = stats.ttest_ind(gaps[a], gaps[b], method=stats.PermutationMethod(
          n_resamples=10000, rng=np.random.default_rng(0)))
      rows.append({"kind": kind, "method": method, "p": float(p), "source_a": a,
                   "source_b": b, "gap_a": float(gaps[a].mean()), "gap_b": float(gaps[b].mean()),
                   "t": float(t.statistic), "p_value": float(t.pvalue), "n_a": len(gaps[a]),
                   "n_b": len(gaps[b])})
  return pd.DataFrame(rows)


def write_outputs(df: pd.DataFrame, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  io.write_text(os.path.join(workdir, "results.csv"), df.to_csv(index=False))
  summary = summarise(df)
  io.write_text(os.path.join(workdir, "summary.csv"), summary.to_csv(index=False))
  tests = gap_tests(df)
  io.write_text(os.path.join(workdir, "tests.csv"), tests.to_csv(index=False))
  plot_auc(df, os.path.join(workdir, "auc_vs_p.png"))
  folds = int(df.fold.nunique())
  lines = ["# Confounders: which pretraining source leans more on a shortcut?", "",
           f"Binary target, confounder on a fraction p of the positive training images; AUC on "
           f"the i.i.d. (same rule), o.o.d. (every negative carries it, no positive) and clean "
           f"test sets; {folds} folds (mean ± std over folds).", "",
           "## The shortcut gap at the largest p", "",
           "gap = i.i.d. AUC - o.o.d. AUC (per fold; larger: leans more on the confounder). "
           "Permutation t-test (10,000 permutations) between sources.", "",
           "| kind | method | source A | gap A | source B | gap B | t | p-value | verdict |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  top = tests[tests.p == df.p.max()] if len(tests) else tests
  for r in top.itertuples():
    more = r.source_a if r.gap_a > r.gap_b else r.source_b
    verdict = f"{more} degrades more" + (" (significant at 0.05)" if r.p_value < 0.05
                                         else " (not significant at 0.05)")
    lines.append(f"| {r.kind} | {r.method} | {r.source_a} | {r.gap_a:.4f} | {r.source_b} | "
                 f"{r.gap_b:.4f} | {r.t:.3f} | {r.p_value:.4f} | {verdict} |")
  if len(tests):
    n_a, n_b = int(tests.n_a.min()), int(tests.n_b.min())
    floor = 2.0 / math.comb(n_a + n_b, n_a)
    lines += ["", f"With {n_a} + {n_b} folds there are {math.comb(n_a + n_b, n_a)} ways to split "
              f"the gaps, so no two-sided permutation test can give a p-value below "
              f"{floor:.4f}" + (": more folds are needed for significance at 0.05 (5 + 5: "
                                "0.0079)." if floor >= 0.05 else ".")]
  lines += ["", "`tests.csv` holds the same test at every p."]
  lines += ["", "## AUC per setting", "",
            "| source | method | kind | p | i.i.d. | o.o.d. | clean |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in summary.itertuples():
    cell = lambda t: f"{getattr(r, f'auc_{t}_mean'):.4f} ± {np.nan_to_num(getattr(r, f'auc_{t}_std')):.4f}"  # noqa: E731
    lines.append(f"| {r.source} | {r.method} | {r.kind} | {r.p:g} | {cell('iid')} | "
                 f"{cell('ood')} | {cell('clean')} |")
  lines += ["", "Per-run rows: `results.csv`; means: `summary.csv`; tests: `tests.csv`; plot: "
            "`auc_vs_p.png`."]
  io.write_text(os.path.join(workdir, "report.md"), "\n".join(lines) + "\n")


def plot_auc(df: pd.DataFrame, path: str) -> None:
  """AUC against p, one panel per (test set, kind); a line per source and method; mean ± std
  over folds."""
  from repsim_jax import plots  # pylint: disable=g-import-not-at-top
  kinds = list(dict.fromkeys(df.kind))
  lines = list(dict.fromkeys(zip(df.source, df.method)))
  n = int(df.fold.nunique())
  with plots.figure(ncols=len(TESTS), width=3.2, height=2.7, nrows=len(kinds)) as (fig, axes):
    axes = np.asarray(axes).reshape(len(kinds), len(TESTS))
    for (i, kind), (j, test) in itertools.product(enumerate(kinds), enumerate(TESTS)):
      ax = axes[i, j]
      for k, (src, method) in enumerate(lines):
        g = df[(df.kind == kind) & (df.source == src) & (df.method == method)]
        agg = g.groupby("p")[f"auc_{test}"].agg(["mean", "std"]).fillna(0.0)
        ax.errorbar(agg.index + 0.01 * (k - len(lines) / 2), agg["mean"], yerr=agg["std"],
                    marker="o", capsize=2, color=plots.PALETTE[k % len(plots.PALETTE)],
                    linestyle="-" if method == "full_ft" else "--", label=f"{src} / {method}")
      ax.axhline(0.5, color="0.6", lw=0.8, zorder=0)
      ax.set_ylim(0, 1.02)
      ax.set_title(f"{kind}: {test} test set", fontsize=9)
      ax.set_xlabel("p (confounded fraction of positives)")
      ax.set_ylabel("AUC")
    # Offset in points under the x label, whatever the panels' height.
    axes[-1, -1].annotate(f"mean ± std over {n} folds; grey line: chance", (1.0, 0.0),
                          xycoords="axes fraction", xytext=(0, -34), textcoords="offset points",
                          ha="right", va="top", fontsize=8)
    plots.legend_above(fig, axes[0, 0], top=1 - 0.35 / (2.7 * len(kinds)))
    plots.save(fig, path)


def main(argv=None):
  return studies.main(__doc__, SETTINGS, run_study, argv)


if __name__ == "__main__":
  host.malloc_on_huge_pages()  # may re-exec this process, as repsim_jax.main does
  sys.exit(0 if main() is not None else 1)
