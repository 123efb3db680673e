"""The gradient-aware score of Juodelyte et al. (2024): feature quality (LP) x gradient ratio (FU).

- LP: mean true-class probability of a k-NN classifier (k=5, uniform weights) on features
  projected to 50 dimensions by NCA, fitted and scored on the same set. As with
  scikit-learn's ``KNeighborsClassifier.predict_proba`` on its own training data, each
  example counts as its own nearest neighbour (``include_self=True``).
- NCA (Goldberger et al. 2004) is fitted by gradient ascent (Adam) in JAX on
  Σ_i Σ_{j: y_j = y_i} p_ij, p_ij = softmax_{j≠i}(−‖A x_i − A x_j‖²), A initialised at the
  leading principal axes (scikit-learn's ``init='pca'``). To make n = 10⁴, d = 2048
  tractable the features are first reduced by PCA to ``pca_dim`` (256) dimensions and the
  objective is optimised on random minibatches of ``batch_size`` (1024) examples (full
  batch when n <= batch_size); ``steps`` Adam steps.
- FU: mean (over minibatches) gradient norm of an early conv layer divided by the mean
  gradient norm of the first conv layer, both under a triplet margin loss (margin 0.05) on
  the L2-normalised ``pre_logits`` embedding. The triplet loss uses every valid
  (anchor, positive, negative) triplet of the batch and averages over the triplets with
  positive loss (the conventions of pytorch-metric-learning's ``TripletMarginLoss``).
  A layer's gradient norm is the l2 norm over all leaves of its parameter subtree
  (kernel and bias).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from repsim_jax.transferability import _checks
from repsim_jax.transferability.scores import pca_transform

__all__ = [
    "nca_objective", "nca_fit", "knn_true_class_probability", "lp_score",
    "triplet_margin_loss", "fu_score", "lp_fu",
]


# ----------------------------------------------------------------------------- NCA / LP

def nca_objective(a, z, labels):
  """Mean NCA objective (1/n) Σ_i Σ_{j≠i, y_j = y_i} p_ij for projection ``a`` (p, k).

  Args:
    a: (p, k) projection; z: (n, p) inputs; labels: (n,) ints.
  """
  e = z @ a
  sq = jnp.sum(e * e, axis=1)
  d2 = sq[:, None] - 2.0 * e @ e.T + sq[None, :]
  d2 = jnp.where(jnp.eye(z.shape[0], dtype=bool), jnp.inf, d2)  # p_ii = 0
  p = jax.nn.softmax(-d2, axis=1)
  same = labels[:, None] == labels[None, :]
  return jnp.mean(jnp.sum(jnp.where(same, p, 0.0), axis=1))


@functools.lru_cache(maxsize=16)
def _adam(learning_rate: float) -> optax.GradientTransformation:
  # Cached so the jitted step (optimizer is a static argument) compiles once per rate and shape.
  return optax.adam(learning_rate)


@functools.partial(jax.jit, static_argnames=("optimizer",))
def _nca_step(a, opt_state, z, labels, optimizer):
  loss, g = jax.value_and_grad(lambda a_: -nca_objective(a_, z, labels))(a)
  updates, opt_state = optimizer.update(g, opt_state, a)
  return optax.apply_updates(a, updates), opt_state, -loss


def nca_fit(z, labels, *, n_components: int = 50, batch_size: int = 1024, steps: int = 200,
            learning_rate: float = 1e-2, seed: int = 0) -> np.ndarray:
  """Fit an NCA projection of ``z`` (n, p), returning A (p, k) with k = min(n_components, p).

  ``z`` should be PCA scores (columns = principal components, descending variance), so the
  initial A = [I_k; 0] is scikit-learn's PCA initialisation.
  """
  z = _checks.as_features(z, name="z", dtype=np.float32)
  lab = _checks.as_int_vector(labels, "labels")
  n, p = z.shape
  if lab.shape[0] != n:
    raise ValueError(f"labels: length {lab.shape[0]} does not match the {n} rows of z")
  k = min(int(n_components), p)
  if k < 1:
    raise ValueError(f"n_components: expected a positive integer, got {n_components}")
  a = jnp.eye(p, k, dtype=jnp.float32)
  optimizer = _adam(float(learning_rate))
  opt_state = optimizer.init(a)
  zj, yj = jnp.asarray(z), jnp.asarray(lab)
  rng = np.random.default_rng(seed)
  for _ in range(int(steps)):
    if n <= batch_size:
      zb, yb = zj, yj
    else:
      idx = jnp.asarray(rng.choice(n, size=batch_size, replace=False))
      zb, yb = zj[idx], yj[idx]
    a, opt_state, _ = _nca_step(a, opt_state, zb, yb, optimizer)
  return np.asarray(a)


@functools.partial(jax.jit, static_argnames=("k", "include_self"))
def _knn_block(queries, q_index, bank, bank_labels, q_labels, k, include_self):
  d2 = (jnp.sum(queries ** 2, axis=1)[:, None] - 2.0 * queries @ bank.T
        + jnp.sum(bank ** 2, axis=1)[None, :])
  is_self = q_index[:, None] == jnp.arange(bank.shape[0])[None, :]
  # Self at distance exactly 0 (first) or excluded; lax.top_k breaks ties by lower index.
  d2 = jnp.where(is_self, -jnp.inf if include_self else jnp.inf, d2)
  _, nbr = jax.lax.top_k(-d2, k)
  return jnp.mean(bank_labels[nbr] == q_labels[:, None], axis=1)


def knn_true_class_probability(z, labels, *, k: int = 5, include_self: bool = True,
                               block: int = 1024) -> np.ndarray:
  """k-NN (uniform weights, Euclidean) probability of each example's own label, (n,).

  The classifier is fitted on (z, labels) and queried on the same rows.
  """
  z = _checks.as_features(z, name="z", dtype=np.float32)
  lab = _checks.as_int_vector(labels, "labels")
  n = z.shape[0]
  if lab.shape[0] != n:
    raise ValueError(f"labels: length {lab.shape[0]} does not match the {n} rows of z")
  avail = n if include_self else n - 1
  if not 1 <= k <= avail:
    raise ValueError(f"k: expected 1..{avail} neighbours for {n} examples, got {k}")
  zj, yj = jnp.asarray(z), jnp.asarray(lab)
  block = min(block, n)
  out = []
  for start in range(0, n, block):
    # Fixed block shape (the last block wraps around) so the kernel compiles once.
    idx = jnp.arange(start, start + block) % n
    out.append(_knn_block(zj[idx], idx, zj, yj, yj[idx], k, include_self))
  return np.asarray(jnp.concatenate(out))[:n]


def lp_score(features, labels, *, n_components: int = 50, k: int = 5, pca_dim: int | None = 256,
             batch_size: int = 1024, steps: int = 200, learning_rate: float = 1e-2,
             seed: int = 0) -> float:
  """LP: mean true-class 5-NN probability on NCA-projected features (see module docstring)."""
  f = _checks.as_features(features, dtype=None)
  lab, _ = _checks.as_class_labels(labels, f.shape[0])
  n, d = f.shape
  p = min(d, n) if pca_dim is None else min(int(pca_dim), d, n)
  z = pca_transform(f, n_components=p).astype(np.float32)
  a = nca_fit(z, lab, n_components=n_components, batch_size=batch_size, steps=steps,
              learning_rate=learning_rate, seed=seed)
  return float(np.mean(knn_true_class_probability(z @ a, lab, k=k)))


# ----------------------------------------------------------------------------- FU

def triplet_margin_loss(embeddings, labels, margin: float = 0.05, *, normalize: bool = True):
  """Batch-all triplet margin loss, averaged over the triplets with positive loss.

  Args:
    embeddings: (B, e); labels: (B,) ints.
  Returns:
    scalar: mean over {(a, p, n): y_a = y_p, a ≠ p, y_n ≠ y_a, loss > 0} of
    max(‖e_a − e_p‖ − ‖e_a − e_n‖ + margin, 0); 0 when no triplet has positive loss.
  """
  e = embeddings
  if normalize:
    e = e / jnp.maximum(jnp.linalg.norm(e, axis=1, keepdims=True), 1e-12)
  sq = jnp.sum(e * e, axis=1)
  d2 = sq[:, None] - 2.0 * e @ e.T + sq[None, :]
  dist = jnp.sqrt(jnp.maximum(d2, 1e-16))  # clamp: finite gradient on the diagonal
  same = labels[:, None] == labels[None, :]
  eye = jnp.eye(e.shape[0], dtype=bool)
  valid = (same & ~eye)[:, :, None] & (~same)[:, None, :]
  per = jnp.maximum(dist[:, :, None] - dist[:, None, :] + margin, 0.0)
  per = jnp.where(valid, per, 0.0)
  count = jnp.sum(per > 0)
  return jnp.sum(per) / jnp.maximum(count, 1)


def _split_path(path) -> tuple[str, ...]:
  if isinstance(path, str):
    return tuple(p for p in path.split("/") if p)
  return tuple(str(p) for p in path)


def _subtree(tree: Any, path: Sequence[str], arg: str) -> Any:
  """Resolve ``path`` in a params pytree; a leading 'params' collection is optional."""
  node = tree
  if path and hasattr(node, "keys") and path[0] not in node and "params" in node:
    node = node["params"]
  for part in path:
    if not hasattr(node, "keys") or part not in node:
      keys = list(node.keys()) if hasattr(node, "keys") else type(node).__name__
      raise ValueError(f"{arg}: parameter path {'/'.join(path)!r} not found (at {part!r}; available: {keys})")
    node = node[part]
  return node


def fu_score(apply_fn: Callable, params, images, labels, *, early_layer, first_layer,
             margin: float = 0.05, batch_size: int = 64, seed: int = 0,
             embedding_key: str = "pre_logits") -> float:
  """FU: mean gradient norm of ``early_layer`` over that of ``first_layer`` under a triplet loss.

  Args:
    apply_fn: ``apply_fn(params, images) -> (logits, reps)`` with ``reps[embedding_key]``
      the (B, e) embedding (inference mode: BatchNorm statistics are the caller's choice).
    params: the parameter pytree differentiated.
    images: (N, ...) inputs; labels: (N,) target labels in 0..C-1.
    early_layer, first_layer: parameter paths, e.g. ``"layer1_0/conv1"`` or a tuple of keys;
      a leading ``"params"`` collection may be omitted.
    batch_size: examples per triplet batch (the set is shuffled with ``seed`` first).
  Returns:
    mean_b ‖∇ early‖ / mean_b ‖∇ first‖ over the minibatches b.
  """
  lab, _ = _checks.as_class_labels(labels, None)
  images = np.asarray(images)
  if images.shape[0] != lab.shape[0]:
    raise ValueError(f"labels: length {lab.shape[0]} does not match the {images.shape[0]} images")
  early_path, first_path = _split_path(early_layer), _split_path(first_layer)
  _subtree(params, early_path, "early_layer")
  _subtree(params, first_path, "first_layer")
  if not margin >= 0:
    raise ValueError(f"margin: expected a non-negative number, got {margin}")

  def loss_fn(p, x, y):
    _, reps = apply_fn(p, x)
    if embedding_key not in reps:
      raise ValueError(f"apply_fn: reps has no {embedding_key!r} entry (keys: {list(reps)})")
    emb = reps[embedding_key]
    return triplet_margin_loss(emb.reshape(emb.shape[0], -1), y, margin)

  @jax.jit
  def norms(p, x, y):
    g = jax.grad(loss_fn)(p, x, y)
    return (optax.tree.norm(_subtree(g, early_path, "early_layer")),
            optax.tree.norm(_subtree(g, first_path, "first_layer")))

  order = np.random.default_rng(seed).permutation(lab.shape[0])
  early, first = [], []
  for start in range(0, lab.shape[0], batch_size):
    idx = order[start:start + batch_size]
    e_n, f_n = norms(params, jnp.asarray(images[idx]), jnp.asarray(lab[idx]))
    early.append(float(e_n))
    first.append(float(f_n))
  mean_first = float(np.mean(first))
  if not np.isfinite(mean_first) or mean_first == 0.0:
    raise ValueError("first_layer: zero gradient on every batch (no triplet with positive loss); FU is undefined")
  return float(np.mean(early)) / mean_first


def lp_fu(apply_fn: Callable, params, images, labels, *, early_layer, first_layer,
          features=None, margin: float = 0.05, batch_size: int = 64, seed: int = 0,
          embedding_key: str = "pre_logits", **lp_kwargs) -> dict:
  """Both terms for one (source, target) pair: ``{'lp': ..., 'fu': ...}``.

  ``features`` (n, e) defaults to ``reps[embedding_key]`` of ``apply_fn`` on ``images``.
  Sources are ranked per target by ``ranking.lp_fu_combine`` (min-max normalised product).
  """
  if features is None:
    images_np = np.asarray(images)
    chunks = []
    for start in range(0, images_np.shape[0], 256):
      _, reps = apply_fn(params, jnp.asarray(images_np[start:start + 256]))
      emb = np.asarray(reps[embedding_key])
      chunks.append(emb.reshape(emb.shape[0], -1))
    features = np.concatenate(chunks)
  lp = lp_score(features, labels, seed=seed, **lp_kwargs)
  fu = fu_score(apply_fn, params, images, labels, early_layer=early_layer, first_layer=first_layer,
                margin=margin, batch_size=batch_size, seed=seed, embedding_key=embedding_key)
  return {"lp": lp, "fu": fu}
