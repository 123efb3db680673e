"""Figures with one style: labelled axes, a colour-blind-safe palette, values where a reader needs
them, error bars that say what they are. Every figure the project writes goes through here.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import numpy as np

# Okabe & Ito (2008): distinguishable with every common colour-vision deficiency.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
           "#000000")


@contextlib.contextmanager
def figure(ncols: int = 1, width: float = 4.2, height: float = 3.2, nrows: int = 1, **kw):
  """(fig, axes) with the house style, closed on exit; save with `save` inside the block.
  `width` and `height` are per panel; axes is the row of panels, or the (nrows, ncols) grid."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rc = {"axes.prop_cycle": matplotlib.cycler(color=PALETTE), "axes.spines.top": False,
        "axes.spines.right": False, "axes.grid": True, "axes.grid.axis": "y",
        "grid.alpha": 0.3, "font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8,
        "legend.frameon": False}
  with plt.rc_context(rc):
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                             squeeze=False, **kw)
    try:
      yield fig, (axes[0] if nrows == 1 else axes)
    finally:
      plt.close(fig)


def save(fig, path: str) -> None:
  from repsim_jax import io  # pylint: disable=g-import-not-at-top
  if not fig.legends:
    fig.tight_layout()
  io.save_figure(fig, path)


def grouped_bars(ax, categories: Sequence[str], series: Mapping[str, Sequence[float]], *,
                 errors: Mapping[str, Sequence[float]] | None = None, ylabel: str,
                 xlabel: str = "", values: bool = True, fmt: str = "{:.2f}",
                 ylim: tuple[float, float] | None = None) -> None:
  """One group of bars per category, one bar (and colour) per series, each labelled with its
  value; `errors` draws ± bars (say what they are in `ylabel` or the title)."""
  n = max(len(series), 1)
  width = 0.8 / n
  x = np.arange(len(categories))
  for i, (name, vals) in enumerate(series.items()):
    vals = np.asarray(vals, float)
    err = None if errors is None else np.asarray(errors[name], float)
    bars = ax.bar(x + (i - (n - 1) / 2) * width, vals, width, yerr=err, capsize=2 if err is not
                  None else 0, label=name, color=PALETTE[i % len(PALETTE)])
    if values:
      ax.bar_label(bars, labels=[fmt.format(v) if np.isfinite(v) else "" for v in vals],
                   fontsize=7, padding=1)
  ax.set_xticks(x, categories, rotation=20 if max(map(len, categories), default=0) > 8 else 0,
                ha="right" if max(map(len, categories), default=0) > 8 else "center")
  ax.set_ylabel(ylabel)
  if xlabel:
    ax.set_xlabel(xlabel)
  if ylim:
    ax.set_ylim(*ylim)


def legend_above(fig, ax, top: float = 0.9) -> None:
  """One legend for the figure, above the panels (which keep the figure below `top`), where it
  covers no data."""
  handles, labels = ax.get_legend_handles_labels()
  fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6),
             bbox_to_anchor=(0.5, 1.0))
  fig.tight_layout(rect=(0, 0, 1, top))
