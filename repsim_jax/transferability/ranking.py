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


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def plot_tau(tau: pd.DataFrame, path) -> None:
  """τ_w per target (rows) and score (a colour and marker each, so no two scores look alike
  even past the palette's 8 colours), with each score's mean over targets in the legend."""
  from repsim_jax import plots  # pylint: disable=g-import-not-at-top
  targets, names = [str(t) for t in tau.index], list(tau.columns)
  height = 1.6 + 0.32 * len(targets)
  with plots.figure(width=6.4, height=height) as (fig, (ax,)):
    y = np.arange(len(targets))[::-1]
    offsets = np.linspace(-0.25, 0.25, len(names)) if len(names) > 1 else [0.0]
    for i, name in enumerate(names):
      vals = tau[name].to_numpy(dtype=float)
      mean = tau[name].mean()  # NaN (and no numpy warning) for a score without any τ_w
      ax.scatter(vals, y + offsets[i], s=22, marker=_MARKERS[i % len(_MARKERS)],
                 color=plots.PALETTE[i % len(plots.PALETTE)],
                 label=f"{name} (mean {mean:.3f})")
    ax.axvline(0.0, color="k", lw=0.6)
    ax.set_yticks(y, targets)
    ax.set_xlim(-1.05, 1.05)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlabel("weighted Kendall τ of score vs. fine-tuned result (1 = same ranking)")
    ax.set_ylabel("target")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 1.0))
    rows = -(-len(names) // 3)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.12 + 0.2 * rows) / height))
    plots.save(fig, path)


def plot_critical_difference(ranks: Mapping[str, float], cd: float, path,
                             num_targets: int | None = None, alpha: float = 0.05) -> None:
  """Critical-difference diagram (Demšar 2006): mean ranks on an axis (1 = best), the better half
  of the scores labelled on the left and the rest on the right, bars joining scores whose mean
  ranks differ by at most the Nemenyi critical difference."""
  from repsim_jax import plots  # pylint: disable=g-import-not-at-top
  items = sorted(ranks.items(), key=lambda kv: kv[1])
  k = len(items)
  half = (k + 1) // 2
  rows = max(half, k - half)
  with plots.figure(width=7.0, height=1.5 + 0.28 * rows) as (fig, (ax,)):
    ax.set_xlim(-0.8, k + 1.8)
    ax.set_ylim(-(rows + 1) * 0.3, 1.1)
    ax.hlines(0, 1, k, color="k")
    for r in range(1, k + 1):
      ax.vlines(r, 0, 0.08, color="k")
      ax.text(r, 0.15, str(r), ha="center", fontsize=8)
    for i, (name, r) in enumerate(items):
      left = i < half
      y = -((i if left else k - 1 - i) + 1) * 0.3
      x_end = 0.9 if left else k + 0.1
      ax.plot([r, r, x_end], [0, y, y], color="0.35", lw=0.8)
      ax.text(x_end + (-0.05 if left else 0.05), y, f"{name} ({r:.2f})", va="center",
              ha="right" if left else "left", fontsize=8)
    level = 0  # cliques: maximal runs of consecutive scores spanning <= CD
    for i in range(k):
      j = i
      while j + 1 < k and items[j + 1][1] - items[i][1] <= cd:
        j += 1
      if j > i and (i == 0 or items[j][1] - items[i - 1][1] > cd):
        ax.hlines(-0.12 - 0.06 * level, items[i][1] - 0.03, items[j][1] + 0.03,
                  color=plots.PALETTE[3], lw=3)
        level += 1
    ax.hlines(0.75, 1, 1 + cd, color="k", lw=1.5)
    ax.text(1 + cd / 2, 0.85, f"critical difference = {cd:.2f}", ha="center", fontsize=8)
    over = f" over {num_targets} targets" if num_targets else ""
    ax.set_title(f"mean rank{over} (1 = best); thick bars join scores not significantly different "
                 f"(Nemenyi, α = {alpha:g})", fontsize=8)
    ax.axis("off")
    plots.save(fig, path)


# ----------------------------------------------------------------------------- driver

def _warn_about_coverage(scores: Mapping[str, pd.DataFrame], truth: pd.DataFrame,
                         exclude_self: bool) -> None:
  """One warning line for each target the ranking cannot use or can barely use: no scores for
  it, or fewer than 3 sources with both a score and a ground truth (τ_w of 2 is ±1)."""
  import sys  # pylint: disable=g-import-not-at-top
  scored = set().union(*[set(map(str, t.columns)) for t in scores.values()]) if scores else set()
  for target in map(str, truth.columns):
    if target not in scored:
      print(f"warning: ranking: target {target!r} has a ground truth but no scores; left out",
            file=sys.stderr, flush=True)
      continue
    sources = set(map(str, truth.index[truth[target].notna()]))
    if exclude_self:
      sources.discard(target)
    n = max((len(sources & set(map(str, t.index[t[target].notna()])))
             for t in scores.values() if target in t.columns), default=0)
    if n < 3:
      print(f"warning: ranking: target {target!r}: only {n} source(s) with both a score and a "
            "ground truth; its τ_w can only be ±1 or undefined", file=sys.stderr, flush=True)


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
  _warn_about_coverage(scores, truth, exclude_self)
  tau = tau_by_score(scores, truth, exclude_self)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  io.write_text(out / "tau_table.csv", tau.to_csv())
  summary = {
      "mean_tau": {str(c): (float(tau[c].mean()) if tau[c].notna().any() else None)
                   for c in tau.columns},
      "exclude_self": exclude_self,
      "num_targets": int(tau.shape[0]),
  }
  plot_tau(tau, out / "tau_per_target.png")
  if tau.shape[1] >= 3 and tau.dropna().shape[0] >= 2:
    fn = friedman_nemenyi(tau, alpha)
    summary["friedman_nemenyi"] = fn
    plot_critical_difference(fn["mean_ranks"], fn["critical_difference"],
                             out / "critical_difference.png", fn["num_targets"], fn["alpha"])
  io.write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
  return summary
