"""Ranking harness: how well do transferability scores rank sources per target?

Tables are pandas DataFrames with sources as rows (index named ``source``) and targets as
columns: the layout of ``shared/reference/medmnist-transferability`` (Juodelyte et al. 2024).
Procedure (the paper's): per target, drop the target's own model as a source (the row whose
source name equals the target name), drop sources missing either value, compute scipy's
``weightedtau(score, truth)`` with default settings, then average over targets. Scores are
compared across targets with a Friedman test and the Nemenyi critical difference (Demšar 2006).

CSV formats read by ``rank_scores``: scores ``source,target,score,value`` and ground truth
``source,target,metric,value`` (long format, one row per pair).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import scipy.stats

from repsim_jax import io

__all__ = [
    "read_reference_table", "read_scores_csv", "read_truth_csv", "lp_fu_combine",
    "weighted_tau_table", "mean_weighted_tau", "tau_by_score", "mean_ranks",
    "nemenyi_critical_difference", "friedman_nemenyi", "plot_tau", "plot_critical_difference",
    "rank_scores",
]


# ----------------------------------------------------------------------------- readers

def read_reference_table(path) -> pd.DataFrame:
  """Read a published table: unnamed row-number column, ``source`` column, one column per target."""
  df = pd.read_csv(path)
  if "source" not in df.columns:
    raise ValueError(f"path: {path} has no 'source' column (columns: {list(df.columns)})")
  df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed")])
  df = df.set_index("source")
  if df.index.has_duplicates:
    raise ValueError(f"path: {path} lists a source more than once")
  return df.astype(float)


def _pivot(long: pd.DataFrame, what: str, path) -> pd.DataFrame:
  if long.duplicated(["source", "target"]).any():
    raise ValueError(f"{what}: {path} has more than one value for a (source, target) pair")
  table = long.pivot(index="source", columns="target", values="value").astype(float)
  table.columns.name = None
  return table


def _read_long(path, key: str, what: str) -> pd.DataFrame:
  df = pd.read_csv(path)
  need = {"source", "target", key, "value"}
  if not need <= set(df.columns):
    raise ValueError(f"{what}: {path} needs columns {sorted(need)}, has {list(df.columns)}")
  df["source"] = df["source"].astype(str)
  df["target"] = df["target"].astype(str)
  return df


def read_scores_csv(path) -> dict[str, pd.DataFrame]:
  """Scores CSV (``source,target,score,value``) -> {score name: source x target table}."""
  df = _read_long(path, "score", "scores_csv")
  return {str(name): _pivot(group, "scores_csv", path) for name, group in df.groupby("score", sort=False)}


def read_truth_csv(path, metric: str | None = None) -> pd.DataFrame:
  """Ground-truth CSV (``source,target,metric,value``) -> source x target table of ``metric``.

  ``metric`` may be omitted when the file holds a single metric.
  """
  df = _read_long(path, "metric", "truth_csv")
  metrics = list(dict.fromkeys(df["metric"].astype(str)))
  if metric is None:
    if len(metrics) != 1:
      raise ValueError(f"metric: truth_csv holds several metrics {metrics}; name one")
    metric = metrics[0]
  if metric not in metrics:
    raise ValueError(f"metric: {metric!r} not in truth_csv (has {metrics})")
  return _pivot(df[df["metric"].astype(str) == metric], "truth_csv", path)


# ----------------------------------------------------------------------------- scores

def _minmax(col: pd.Series) -> pd.Series:
  lo, hi = col.min(), col.max()
  if not hi > lo:  # constant (or single) column: every source ties
    return col * 0.0 + 1.0
  return (col - lo) / (hi - lo)


def lp_fu_combine(lp: pd.DataFrame, fu: pd.DataFrame, *, exclude_self: bool = True) -> pd.DataFrame:
  """Per-target product of min-max normalised LP and FU (Juodelyte et al. 2024).

  As in the paper's tables, each score is normalised per target over every source that has it:
  the target's own model has an FU value (but no LP) and takes part in FU's normalisation; it
  is then left out of the product with ``exclude_self``. (Normalising FU over the other sources
  only changes dermamnist's τ_w from the published 0.702 to 0.699, its own model's FU being
  the column's extreme.) Sources without both values are NaN.
  """
  lp, fu = lp.align(fu, join="outer")
  out = pd.DataFrame(np.nan, index=lp.index, columns=lp.columns)
  for target in lp.columns:
    product = _minmax(lp[target].dropna()) * _minmax(fu[target].dropna())
    product = product.dropna()
    if exclude_self:
      product = product[product.index.astype(str) != str(target)]
    out.loc[product.index, target] = product
  return out


def weighted_tau_table(scores: pd.DataFrame, truth: pd.DataFrame, exclude_self: bool = True) -> dict[str, float]:
  """{target: weighted Kendall τ (scipy defaults) between score and truth over the sources}.

  Targets are the columns the two tables share (in ``scores``' order); NaN where fewer than
  two sources have both values.
  """
  out = {}
  for target in [c for c in scores.columns if c in truth.columns]:
    pair = pd.concat([scores[target].rename("s"), truth[target].rename("t")], axis=1, join="inner")
    if exclude_self:
      pair = pair[pair.index.astype(str) != str(target)]
    pair = pair.dropna()
    if len(pair) < 2:
      out[str(target)] = float("nan")
      continue
    out[str(target)] = float(scipy.stats.weightedtau(pair["s"].to_numpy(), pair["t"].to_numpy()).statistic)
  return out


def mean_weighted_tau(scores: pd.DataFrame, truth: pd.DataFrame, exclude_self: bool = True) -> float:
  """Mean over targets of ``weighted_tau_table`` (NaN targets ignored)."""
  vals = np.array(list(weighted_tau_table(scores, truth, exclude_self).values()), dtype=float)
  return float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")


def tau_by_score(scores: Mapping[str, pd.DataFrame], truth: pd.DataFrame,
                 exclude_self: bool = True) -> pd.DataFrame:
  """targets x scores table of τ_w."""
  cols = {name: pd.Series(weighted_tau_table(table, truth, exclude_self)) for name, table in scores.items()}
  df = pd.DataFrame(cols)
  df.index.name = "target"
  return df


def mean_ranks(tau: pd.DataFrame) -> pd.Series:
  """Mean rank of each score (column) across targets (rows); rank 1 = highest τ, ties averaged.

  Targets with a NaN for any score are left out (the Friedman test needs complete blocks).
  """
  complete = tau.dropna()
  ranks = complete.rank(axis=1, ascending=False, method="average")
  return ranks.mean(axis=0)


def nemenyi_critical_difference(num_scores: int, num_targets: int, alpha: float = 0.05) -> tuple[float, float]:
  """(q_alpha, CD): q_alpha = studentized range quantile(1 − alpha; k, ∞)/√2, CD = q_alpha √(k(k+1)/(6N))."""
  if num_scores < 2 or num_targets < 1:
    raise ValueError(f"num_scores, num_targets: expected k >= 2 and N >= 1, got {num_scores}, {num_targets}")
  if not 0 < alpha < 1:
    raise ValueError(f"alpha: expected a level in (0, 1), got {alpha}")
  q = float(scipy.stats.studentized_range.ppf(1.0 - alpha, num_scores, np.inf)) / math.sqrt(2.0)
  return q, q * math.sqrt(num_scores * (num_scores + 1) / (6.0 * num_targets))


def friedman_nemenyi(tau_by_score: pd.DataFrame, alpha: float = 0.05) -> dict:
  """Friedman test across targets (blocks) of the scores (treatments) + Nemenyi post-hoc.

  Args:
    tau_by_score: targets x scores τ_w table (rows with a NaN are dropped).
  Returns:
    dict: ``statistic``, ``pvalue`` (scipy.stats.friedmanchisquare), ``mean_ranks``
    {score: rank}, ``q_alpha``, ``critical_difference``, ``alpha``, ``num_targets``,
    ``num_scores``, ``significant``: {score: [scores whose mean ranks differ by > CD]}.
  """
  complete = tau_by_score.dropna()
  k, n = complete.shape[1], complete.shape[0]
  if k < 3:
    raise ValueError(f"tau_by_score: the Friedman test needs at least 3 scores (columns), got {k}")
  if n < 2:
    raise ValueError(f"tau_by_score: need at least 2 complete targets (rows), got {n}")
  res = scipy.stats.friedmanchisquare(*[complete[c].to_numpy() for c in complete.columns])
  ranks = mean_ranks(complete)
  q, cd = nemenyi_critical_difference(k, n, alpha)
  names = [str(c) for c in complete.columns]
  sig = {a: [b for b in names if b != a and abs(ranks[a] - ranks[b]) > cd] for a in names}
  return {
      "statistic": float(res.statistic), "pvalue": float(res.pvalue),
      "mean_ranks": {str(a): float(r) for a, r in ranks.items()},
      "q_alpha": q, "critical_difference": cd, "alpha": alpha,
      "num_targets": n, "num_scores": k, "significant": sig,
  }


# ----------------------------------------------------------------------------- plots

def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_tau(tau: pd.DataFrame, path) -> None:
  """Grouped bars of τ_w per target (x) and score (colour), mean τ_w in the legend."""
  plt = _pyplot()
  targets, names = list(tau.index), list(tau.columns)
  width = 0.8 / max(len(names), 1)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(targets) * max(1, len(names)) ** 0.5), 4.0))
  x = np.arange(len(targets))
  for i, name in enumerate(names):
    ax.bar(x + (i - (len(names) - 1) / 2) * width, tau[name].to_numpy(dtype=float), width,
           label=f"{name} (mean {np.nanmean(tau[name].to_numpy(dtype=float)):.3f})")
  ax.axhline(0.0, color="k", lw=0.5)
  ax.set_xticks(x, [str(t) for t in targets], rotation=45, ha="right")
  ax.set_ylabel("weighted Kendall τ")
  ax.legend(fontsize="small", ncol=2)
  io.save_figure(fig, path)
  plt.close(fig)


def plot_critical_difference(ranks: Mapping[str, float], cd: float, path) -> None:
  """Critical-difference diagram: mean ranks on an axis, scores whose ranks differ by <= CD joined."""
  plt = _pyplot()
  items = sorted(ranks.items(), key=lambda kv: kv[1])
  k = len(items)
  fig, ax = plt.subplots(figsize=(7.0, 1.0 + 0.3 * k))
  ax.set_xlim(0.5, k + 0.5)
  ax.set_ylim(-(k + 2) * 0.3, 1.0)
  ax.hlines(0, 1, k, color="k")
  for r in range(1, k + 1):
    ax.vlines(r, 0, 0.1, color="k")
    ax.text(r, 0.2, str(r), ha="center", fontsize=8)
  for i, (name, r) in enumerate(items):
    y = -(i + 1) * 0.3
    ax.plot([r, r], [0, y], color="tab:blue", lw=0.8)
    ax.text(r + 0.05, y, f"{name} ({r:.2f})", va="center", fontsize=8)
  # Cliques: maximal runs of consecutive (by rank) scores spanning <= CD.
  level = 0
  for i in range(k):
    j = i
    while j + 1 < k and items[j + 1][1] - items[i][1] <= cd:
      j += 1
    if j > i and (i == 0 or items[j][1] - items[i - 1][1] > cd):
      ax.hlines(0.55 + 0.08 * level, items[i][1], items[j][1], color="tab:red", lw=3)
      level += 1
  ax.hlines(0.85, 1, 1 + cd, color="k", lw=1.5)
  ax.text(1 + cd / 2, 0.9, f"CD = {cd:.2f}", ha="center", fontsize=8)
  ax.axis("off")
  io.save_figure(fig, path)
  plt.close(fig)


# ----------------------------------------------------------------------------- driver

def rank_scores(scores_csv, truth_csv, out_dir, *, metric: str | None = None, exclude_self: bool = True,
                alpha: float = 0.05) -> dict:
  """Evaluate every score of ``scores_csv`` against ``truth_csv`` and write the results.

  When the scores include ``lp`` and ``fu`` (and no ``lp_fu``), their combination
  ``lp_fu`` is added. Writes (atomically) ``tau_table.csv`` (targets x scores τ_w),
  ``summary.json`` (mean τ_w per score, Friedman/Nemenyi when >= 3 scores) and
  ``tau_per_target.png`` (+ ``critical_difference.png`` with the test). Returns the summary.
  """
  scores = read_scores_csv(scores_csv)
  truth = read_truth_csv(truth_csv, metric)
  if "lp" in scores and "fu" in scores and "lp_fu" not in scores:
    scores["lp_fu"] = lp_fu_combine(scores["lp"], scores["fu"], exclude_self=exclude_self)
  tau = tau_by_score(scores, truth, exclude_self)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  io.write_text(out / "tau_table.csv", tau.to_csv())
  summary = {
      "mean_tau": {str(c): (float(np.nanmean(tau[c])) if tau[c].notna().any() else None) for c in tau.columns},
      "exclude_self": exclude_self,
      "num_targets": int(tau.shape[0]),
  }
  plot_tau(tau, out / "tau_per_target.png")
  if tau.shape[1] >= 3 and tau.dropna().shape[0] >= 2:
    fn = friedman_nemenyi(tau, alpha)
    summary["friedman_nemenyi"] = fn
    plot_critical_difference(fn["mean_ranks"], fn["critical_difference"], out / "critical_difference.png")
  io.write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
  return summary
