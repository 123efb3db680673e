"""Study: which transferability score predicts which source fine-tunes best? (Juodelyte et al.
2024: sources x targets, every score ranked against real fine-tuning.)

  python experiments/transferability.py --workdir=runs/study_transferability [--setting=small]
      [--sources=sup_natural=supervised:natural,simclr_natural=simclr:natural,...]
      [--extra_sources="imagenet=resnet18@weights/r18.safetensors;rad=runs/radimagenet_r18"]
      [--targets=natural,medical_gray,medical_rgb] [--lrs=0.01+0.05] [--finetune_steps=N]

1. Sources: `name=<objective>:<synthetic kind>` items are pretrained here (supervised, simclr,
   byol or dino on that kind; once each); `--extra_sources` adds any checkpoints the
   transferability job reads (`name=model@path`, or `name=<run dir>`).
2. Scores: the transferability job (`configs/transferability.py`) scores every source on every
   target's train split (every score of `repsim_jax.jobs.transferability.SCORES`).
3. Ground truth: the sweep job (`configs/sweep.py`) fine-tunes every (source, target) pair over
   the learning-rate grid; a pair's truth is the test AUC of its best-validation checkpoint.
4. Ranking (`repsim_jax.transferability.ranking`): weighted Kendall τ between each score and the
   truth per target, the mean over targets, a Friedman test and the Nemenyi critical difference.
Writes scores.csv, ground_truth.csv, tau.csv (targets x scores), mean_tau.csv, the ranking's
plots (tau_per_target.png, critical_difference.png) and report.md. `small`: synthetic data,
about 15 minutes on 2 CPU cores; `full`: MedMNIST targets from published checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pandas as pd

from repsim_jax import config_lib, io, jobs, studies
from repsim_jax.cpu import host

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
SYNTHETIC = ("natural", "medical_gray", "medical_rgb")

SETTINGS = {
    "small": dict(sources="sup_natural=supervised:natural,sup_medical_rgb=supervised:medical_rgb,"
                  "sup_medical_gray=supervised:medical_gray,simclr_natural=simclr:natural,"
                  "byol_medical_rgb=byol:medical_rgb", extra_sources="",
                  targets="natural,medical_gray,medical_rgb", model="resnet_small", size=32,
                  pretrain_steps=1000, ssl_steps=1500, finetune_steps=200, lrs="0.01+0.05",
                  batch=64, max_examples=1000, data_dir=""),
    "full": dict(sources="", extra_sources="imagenet=resnet50@weights/r50.safetensors;"
                 "dino=resnet50@weights/dino_r50.pth;moco=resnet50@weights/mocov2_r50.pth",
                 targets="dermamnist,breastmnist,pneumoniamnist,organamnist,bloodmnist",
                 model="resnet50", size=64, pretrain_steps=0, ssl_steps=0, finetune_steps=2000,
                 lrs="1e-3+1e-2", batch=64, max_examples=0, data_dir="data"),
}


def source_configs(s: dict) -> dict:
  """{name: pretraining config} of the `objective:kind` sources."""
  b = config_lib.load_config(os.path.join(CONFIGS, "study.py"), studies.config_arg(
      s, "pretrain_steps", "ssl_steps", "size", "model", "batch", "data_dir"))
  out = {}
  for item in studies.csv_list(s["sources"]):
    name, _, spec = item.partition("=")
    objective, _, kind = spec.partition(":")
    if kind not in SYNTHETIC:
      raise ValueError(f"--sources: {item!r}: expected name=<objective>:<synthetic kind> "
                       f"(kinds: {', '.join(SYNTHETIC)})")
    out[name] = studies.source_config(b, objective)
    out[name].data.name = kind
  return out


def target_data(s: dict, data):
  """The targets' shared data block: the default run's fine-tuning target (new images) for the
  synthetic kinds, MedMNIST at `size` otherwise."""
  f = config_lib.load_config(os.path.join(CONFIGS, "default.py"), f"size={s['size']}").finetune
  data.update(f.data.to_dict())
  if studies.csv_list(s["targets"])[0] in SYNTHETIC:
    data.seed = 1
  else:
    data.source, data.size = "medmnist", s["size"]
  if s["data_dir"]:
    data.data_dir = s["data_dir"]
  return data


def source_spec(workdir: str, s: dict) -> str:
  inits = studies.sources(workdir, source_configs(s), s.get("launch"))
  items = [f"{name}={path}" for name, path in inits.items()]
  items += [i for i in s["extra_sources"].split(";") if i.strip()]
  if not items:
    raise ValueError("--sources / --extra_sources: no sources")
  return ";".join(items)


def run_study(workdir: str, s: dict) -> dict:
  spec = source_spec(workdir, s)
  scores_dir = os.path.join(workdir, "scores")
  for target in studies.csv_list(s["targets"]):
    c = config_lib.load_config(os.path.join(CONFIGS, "transferability.py"),
                               f"batch={s['batch']},max_examples={s['max_examples']}")
    c.sources = spec
    target_data(s, c.data)
    c.data.name = target
    jobs.run(c, scores_dir)
  w = config_lib.load_config(os.path.join(CONFIGS, "sweep.py"),
                             f"lrs={s['lrs']},steps={s['finetune_steps']},batch={s['batch']}")
  target_data(s, w.data)
  w.sweep.sources = spec
  w.sweep.targets = "+".join(studies.csv_list(s["targets"]))
  w.sweep.scores_csv = os.path.join(scores_dir, "scores.csv")
  w.sweep.rank_dir = "ranking"
  if s.get("launch") is not None:
    w.launch = s["launch"]
  out = jobs.run(w, os.path.join(workdir, "sweep"))
  write_outputs(workdir)
  return out


def write_outputs(workdir: str) -> None:
  """The study's tables and report from what the jobs wrote (scores, ground truth, ranking)."""
  rank_dir = os.path.join(workdir, "sweep", "ranking")
  scores = pd.read_csv(os.path.join(workdir, "scores", "scores.csv"))
  truth = pd.read_csv(os.path.join(workdir, "sweep", "ground_truth.csv"))
  tau = pd.read_csv(os.path.join(rank_dir, "tau_table.csv"))
  tau = tau.rename(columns={tau.columns[0]: "target"})
  with open(os.path.join(rank_dir, "summary.json")) as f:
    summary = json.load(f)
  mean = pd.DataFrame([{"score": k, "mean_tau": v} for k, v in summary["mean_tau"].items()])
  mean = mean.sort_values("mean_tau", ascending=False, na_position="last").reset_index(drop=True)
  fn = summary.get("friedman_nemenyi")
  if fn:
    mean["mean_rank"] = [fn["mean_ranks"].get(k) for k in mean.score]
  table = truth.pivot(index="source", columns="target", values="value").reset_index()
  lines = ["# Transferability scores against real fine-tuning", "",
           f"{truth.source.nunique()} sources x {truth.target.nunique()} targets. Ground truth: "
           f"test {truth.metric.iloc[0]} of each pair's best-validation checkpoint over the "
           "learning-rate grid (`sweep/ground_truth.csv`). τ_w: scipy's weighted Kendall τ "
           "between a score and the truth over the sources, per target.", "",
           "## Mean weighted τ over targets", ""]
  lines += studies.markdown_table(mean, digits=3)
  if fn:
    lines += ["", f"Friedman test over {fn['num_targets']} targets: χ² = {fn['statistic']:.3f}, "
              f"p = {fn['pvalue']:.4f}; Nemenyi critical difference at α = {fn['alpha']}: "
              f"{fn['critical_difference']:.3f} mean-rank units (`critical_difference.png`)."
              + (" No score ranks sources significantly better than another here."
                 if fn["pvalue"] >= fn["alpha"] else "")]
  lines += ["", "## τ_w per target", ""] + studies.markdown_table(tau, digits=3)
  lines += ["", "## Ground truth", ""] + studies.markdown_table(table, digits=4)
  lines += ["", "Scores: `scores.csv` (source, target, score, value); ground truth: "
            "`ground_truth.csv`; τ: `tau.csv`, `mean_tau.csv`; plots: `tau_per_target.png`, "
            "`critical_difference.png`."]
  for name in ("tau_per_target.png", "critical_difference.png"):
    src = os.path.join(rank_dir, name)
    if os.path.exists(src):
      io.atomic_write(os.path.join(workdir, name), lambda tmp, src=src: shutil.copyfile(src, tmp))
  studies.write_outputs(workdir, {"scores": scores, "ground_truth": truth, "tau": tau,
                                  "mean_tau": mean}, {}, lines)


def main(argv=None):
  return studies.main(__doc__, SETTINGS, run_study, argv)


if __name__ == "__main__":
  host.malloc_on_huge_pages()  # may re-exec this process, as repsim_jax.main does
  sys.exit(0 if main() is not None else 1)
