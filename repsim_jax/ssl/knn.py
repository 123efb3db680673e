"""The k-NN monitor of SSL runs (DESIGN §8): weighted k-NN classification on frozen features.

Cosine similarity, the k nearest bank examples vote with weight exp(sim / temperature)
(Wu et al. 2018, as DINO's monitor). Multi-label tasks vote per label (positive when the
weighted share of neighbours with the label exceeds one half); accuracy is per label then.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _normalize(x):
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@jax.jit
def _neighbours(bank, queries):
  return _normalize(queries) @ _normalize(bank).T


def knn_scores(bank, bank_labels, queries, num_classes: int, k: int = 20,
               temperature: float = 0.07, multilabel: bool = False, chunk: int = 1024):
  """(num_queries, num_classes) vote scores of the k nearest bank examples."""
  bank_labels = np.asarray(bank_labels)
  k = min(k, len(bank))
  onehot = (bank_labels.astype(np.float32) if multilabel else
            np.eye(num_classes, dtype=np.float32)[bank_labels.astype(np.int64)])
  out = []
  for i in range(0, len(queries), chunk):
    sim = _neighbours(bank, queries[i:i + chunk])
    top, idx = jax.lax.top_k(sim, k)
    w = jnp.exp(top / temperature)
    votes = jnp.einsum("qk,qkc->qc", w, jnp.asarray(onehot)[idx])
    out.append(np.asarray(votes / w.sum(-1, keepdims=True) if multilabel else votes))
  return np.concatenate(out)


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07, multilabel: bool = False) -> float:
  scores = knn_scores(bank, bank_labels, queries, num_classes, k, temperature, multilabel)
  query_labels = np.asarray(query_labels)
  if multilabel:
    return float(np.mean((scores > 0.5) == (query_labels > 0)))
  return float(np.mean(np.argmax(scores, -1) == query_labels.astype(np.int64)))
