"""Classification metrics that fit the task, computed on the host from gathered scores.

Evaluation gathers logits for a whole split (a few thousand rows for medical sets), so exact
NumPy metrics are cheaper and clearer than streaming approximations on device.

Why not scikit-learn: the fixed stack has no sklearn (it would be a ~40 MB dependency for two
functions), and the AUC here must be MedMNIST's own: its evaluator averages one-vs-rest AUCs over
classes for multi-class and ordinal tasks and over labels for multi-label ones, with ties ranked
as averages (the Mann-Whitney U statistic), which is what `binary_auc` and `classification_metrics`
compute; tests compare them with closed forms.
"""

from __future__ import annotations

import numpy as np

TASKS = ("multiclass", "binary", "multilabel", "ordinal")


def softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def binary_auc(scores: np.ndarray, positives: np.ndarray) -> float:
  """ROC AUC by the Mann-Whitney U statistic (average ranks for ties); NaN if one class is absent."""
  scores = np.asarray(scores, np.float64)
  positives = np.asarray(positives).astype(bool)
  n_pos = int(positives.sum())
  n_neg = positives.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  ranks = np.empty(scores.size, np.float64)
  # Average rank within each run of tied scores.
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  avg = first + (counts + 1) / 2.0
  ranks[order] = np.repeat(avg, counts)
  return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(logits: np.ndarray, labels: np.ndarray, task: str) -> dict[str, float]:
  """Metrics for `task` from logits (N, C) and integer labels (N,) or multi-hot (N, L).

  multiclass / ordinal / binary (softmax over C outputs): accuracy, balanced accuracy, macro F1,
  macro one-vs-rest AUC (binary: the AUC of the positive class), expected calibration error. multilabel (sigmoid): mean
  per-label accuracy at 0.5, macro AUC and one `auc_<i>` per label.
  """
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  if task == "multilabel":
    probs = sigmoid(logits)
    aucs = [binary_auc(probs[:, i], labels[:, i]) for i in range(labels.shape[1])]
    out = {"accuracy": float(((probs > 0.5) == labels.astype(bool)).mean()),
           "auc": float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan")}
    out.update({f"auc_{i}": a for i, a in enumerate(aucs)})
    return out
  if task not in TASKS:
    raise ValueError(f"task={task!r}: expected one of {TASKS}")
  num_classes = logits.shape[1]
  probs = softmax(logits)
  pred = probs.argmax(-1)
  recalls, f1s = [], []
  for c in range(num_classes):
    tp = np.sum((pred == c) & (labels == c))
    support = np.sum(labels == c)
    predicted = np.sum(pred == c)
    if support:
      recalls.append(tp / support)
    f1s.append(2 * tp / (support + predicted) if support + predicted else 0.0)
  if num_classes == 2:
    auc = binary_auc(probs[:, 1], labels == 1)
  else:
    per_class = [binary_auc(probs[:, c], labels == c) for c in range(num_classes)]
    auc = float(np.nanmean(per_class)) if not np.all(np.isnan(per_class)) else float("nan")
  return {"accuracy": float(np.mean(pred == labels)),
          "balanced_accuracy": float(np.mean(recalls)),
          "f1": float(np.mean(f1s)),
          "auc": float(auc),
          "ece": expected_calibration_error(probs, labels)}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
  """Top-label ECE (Guo et al. 2017): examples binned by confidence (the largest probability)
  into `num_bins` equal-width bins of (0, 1]; Σ_b |B_b|/n · |accuracy(B_b) − confidence(B_b)|."""
  probs = np.asarray(probs, np.float64)
  conf, correct = probs.max(-1), probs.argmax(-1) == np.asarray(labels)
  # Bin b holds confidences in (b/num_bins, (b+1)/num_bins].
  bins = np.clip(np.ceil(conf * num_bins).astype(int) - 1, 0, num_bins - 1)
  total = 0.0
  for b in np.unique(bins):
    sel = bins == b
    total += sel.sum() * abs(correct[sel].mean() - conf[sel].mean())
  return float(total / max(len(conf), 1))
