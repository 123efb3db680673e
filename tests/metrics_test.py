import numpy as np
import pytest

from repsim_jax import metrics


def _auc_bruteforce(scores, pos):
  p, n = scores[pos], scores[~pos]
  wins = (p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()
  return wins / (len(p) * len(n))


def test_binary_auc_matches_pairwise_count_with_ties():
  rng = np.random.default_rng(0)
  scores = np.round(rng.normal(size=300), 1)  # rounding creates many ties
  pos = rng.random(300) < 0.3
  assert metrics.binary_auc(scores, pos) == pytest.approx(_auc_bruteforce(scores, pos), abs=1e-12)


def test_auc_extremes_and_missing_class():
  assert metrics.binary_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
  assert metrics.binary_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
  assert np.isnan(metrics.binary_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_multiclass_metrics_against_hand_computation():
  labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
  pred = np.array([0, 0, 0, 1, 1, 2, 2, 2])
  logits = np.eye(3)[pred] * 5.0
  m = metrics.classification_metrics(logits, labels, "multiclass")
  assert m["accuracy"] == pytest.approx(6 / 8)
  # recalls: 3/4, 1/2, 2/2
  assert m["balanced_accuracy"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
  # F1 per class: 2tp/(support+predicted): 6/7, 2/4, 4/5
  assert m["f1"] == pytest.approx((6 / 7 + 2 / 4 + 4 / 5) / 3)
  probs = metrics.softmax(logits)
  expected_auc = np.mean([_auc_bruteforce(probs[:, c], labels == c) for c in range(3)])
  assert m["auc"] == pytest.approx(expected_auc)


def test_binary_task_auc_uses_positive_class():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(50, 2))
  labels = rng.integers(0, 2, 50)
  m = metrics.classification_metrics(logits, labels, "binary")
  p1 = metrics.softmax(logits)[:, 1]
  assert m["auc"] == pytest.approx(_auc_bruteforce(p1, labels == 1))


def test_multilabel_per_label_auc():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(40, 3))
  labels = (rng.random((40, 3)) < 0.4).astype(np.int32)
  m = metrics.classification_metrics(logits, labels, "multilabel")
  per = [_auc_bruteforce(logits[:, i], labels[:, i] == 1) for i in range(3)]
  for i in range(3):
    assert m[f"auc_{i}"] == pytest.approx(per[i])
  assert m["auc"] == pytest.approx(np.mean(per))
  assert m["accuracy"] == pytest.approx(np.mean((logits > 0) == (labels == 1)))
