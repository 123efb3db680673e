"""Representation similarity measures (DESIGN §4).

Every measure takes two representations of the *same* n examples, ``x: (n, d_x)`` and
``y: (n, d_y)`` (NumPy or JAX arrays), and returns a scalar. All are jitted, trace-time
shape checks raise a one-line ``ValueError``, and they vmap across a stack of layers of equal
shape, e.g. ``jax.vmap(linear_cka)(xs, ys)`` with ``xs: (L, n, d)``.

Dtypes: inputs are promoted to at least float32 (ints, bf16 and f16 are upcast); float64 inputs
stay float64 when x64 is enabled (``with jax.enable_x64(True): ...``). Matrix products use
``Precision.HIGHEST`` so accelerators do not silently drop to TF32/bf16 passes: similarity
values are small differences of large sums and those passes cost several digits.

Measures:
  linear_cka, rbf_cka          Kornblith et al. 2019 (debiased: Song et al. 2012 HSIC_1).
  minibatch_cka, MinibatchCKA  Nguyen et al. 2021 (streaming, constant memory in n).
  cca_similarity, svcca, pwcca Mean squared CCA; Raghu et al. 2017; Morcos et al. 2018.
  procrustes_distance          Ding et al. 2021 (0 = identical up to rotation and scale).
  rsa                          Spearman correlation of correlation-distance RDMs.
  mutual_knn                   Huh et al. 2024 mutual k-nearest-neighbour alignment.

Layer-wise helpers (pure functions over dicts of arrays): pool_features,
layerwise_similarity, cross_layer_similarity, similarity_table, plot_heatmap.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from repsim_jax import io

__all__ = [
    "linear_cka",
    "rbf_cka",
    "unbiased_hsic",
    "minibatch_cka",
    "MinibatchCKA",
    "MinibatchCKAState",
    "cca_similarity",
    "svcca",
    "pwcca",
    "procrustes_distance",
    "rsa",
    "mutual_knn",
    "MEASURES",
    "pool_features",
    "layerwise_similarity",
    "cross_layer_similarity",
    "similarity_table",
    "plot_heatmap",
]

_HI = jax.lax.Precision.HIGHEST


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HI)


# --------------------------------------------------------------------------- input checks


def _prepare_pair(x, y, fname: str, min_n: int = 2, min_n_reason: str = ""):
  """Validates two (n, d) inputs on static shapes and casts them to a common float dtype."""
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  if x.ndim != 2:
    raise ValueError(f"{fname}: x must be a 2-D (n, d) array, got shape {tuple(x.shape)}")
  if y.ndim != 2:
    raise ValueError(f"{fname}: y must be a 2-D (n, d) array, got shape {tuple(y.shape)}")
  if x.shape[0] != y.shape[0]:
    raise ValueError(
        f"{fname}: x and y must have the same number of examples n, got {x.shape[0]} and"
        f" {y.shape[0]}")
  if x.shape[0] < min_n:
    reason = f" ({min_n_reason})" if min_n_reason else ""
    raise ValueError(f"{fname}: needs at least {min_n} examples{reason}, got n={x.shape[0]}")
  if x.shape[1] < 1 or y.shape[1] < 1:
    raise ValueError(f"{fname}: x and y need at least one feature, got shapes {x.shape}, {y.shape}")
  # At least float32: CKA-type sums in bf16/f16 are meaningless. float64 survives only under x64.
  dtype = jnp.result_type(x.dtype, y.dtype, jnp.float32)
  return x.astype(dtype), y.astype(dtype)


def _checked(fn):
  """Public pairwise measures: eager NaN/Inf or constant inputs raise (`_check_values`)."""
  @functools.wraps(fn)
  def wrapper(x, y, *args, **kwargs):
    if not isinstance(x, jax.core.Tracer) and not isinstance(y, jax.core.Tracer):
      jax.eval_shape(lambda a, b: fn(a, b, *args, **kwargs), x, y)  # shape errors come first
      _check_values(x, fn.__name__, "x")
      _check_values(y, fn.__name__, "y")
    return fn(x, y, *args, **kwargs)
  return wrapper


def _check_values(a, fname: str, name: str) -> None:
  """Eager inputs: NaN/Inf or constant features are an error (a similarity of them would be a
  meaningless number). Under jit the values are unknown here, and such inputs give NaN."""
  v = np.asarray(a)
  if not np.all(np.isfinite(v)):
    raise ValueError(f"{fname}: {name} contains NaN or Inf")
  if v.shape[0] > 1 and not np.any(v != v[:1]):
    raise ValueError(f"{fname}: {name} is the same for every example (no variance); "
                     "similarity is undefined")


def _center(x):
  return x - jnp.mean(x, axis=0, keepdims=True)


def _zero_diag(k):
  return jnp.where(jnp.eye(k.shape[0], dtype=bool), jnp.zeros((), k.dtype), k)


def _check_form(form: str, fname: str):
  if form not in ("auto", "feature", "gram"):
    raise ValueError(f"{fname}: form must be 'auto', 'feature' or 'gram', got {form!r}")


def _use_feature_form(n: int, dx: int, dy: int, form: str) -> bool:
  """Feature-space products cost n(dx^2+dy^2+dx*dy); Gram products cost n^2(dx+dy)."""
  if form != "auto":
    return form == "feature"
  return dx * dx + dy * dy + dx * dy < n * (dx + dy)


# --------------------------------------------------------------------------- CKA


def _center_gram(k, unbiased: bool):
  """Centres a Gram matrix as the Kornblith et al. reference colab does.

  With ``unbiased=True`` the result U satisfies <U_K, U_L> = n(n-3) HSIC_1(K, L), the
  unbiased estimator of Song et al. 2012, so CKA built from it is the debiased CKA.
  """
  n = k.shape[0]
  if unbiased:
    k = _zero_diag(k)
    means = jnp.sum(k, axis=0) / (n - 2)
    means = means - jnp.sum(means) / (2 * (n - 1))
    return _zero_diag(k - means[:, None] - means[None, :])
  means = jnp.mean(k, axis=0)
  means = means - jnp.mean(means) / 2
  return k - means[:, None] - means[None, :]


def _cka_from_grams(k, l, debiased: bool):
  kc = _center_gram(k, debiased)
  lc = _center_gram(l, debiased)
  return jnp.vdot(kc, lc) / (jnp.linalg.norm(kc) * jnp.linalg.norm(lc))


def _debias(dot, sq_rows_a, sq_rows_b, sq_norm_a, sq_norm_b, n):
  """n(n-3) HSIC_1 from feature-space quantities of *centred* features.

  For centred X (K = XXᵀ has zero row sums) and K̃ = K with zero diagonal:
  tr(K̃L̃) = ‖XᵀY‖² - aᵀb, 1ᵀK̃1 = -‖X‖², K̃1 = -a, with a_i = ‖x_i‖², b_i = ‖y_i‖².
  """
  return dot - n / (n - 2) * jnp.vdot(sq_rows_a, sq_rows_b) + sq_norm_a * sq_norm_b / (
      (n - 1) * (n - 2))


def _unit(x):
  """x / ‖x‖_F: CKA is scale invariant, and the feature form's ‖XᵀX‖² overflows float32 for
  features of size ~1e6 otherwise."""
  return x / jnp.maximum(jnp.linalg.norm(x), jnp.finfo(x.dtype).tiny)


def _linear_cka_feature(x, y, debiased: bool):
  n = x.shape[0]
  x, y = _unit(_center(x)), _unit(_center(y))
  xy = jnp.sum(jnp.square(_mm(x.T, y)))
  xx = jnp.sum(jnp.square(_mm(x.T, x)))
  yy = jnp.sum(jnp.square(_mm(y.T, y)))
  if debiased:
    a = jnp.sum(x * x, axis=1)
    b = jnp.sum(y * y, axis=1)
    sa, sb = jnp.sum(a), jnp.sum(b)
    xy = _debias(xy, a, b, sa, sb, n)
    xx = _debias(xx, a, a, sa, sa, n)
    yy = _debias(yy, b, b, sb, sb, n)
  return xy / jnp.sqrt(xx * yy)


def _linear_cka_gram(x, y, debiased: bool):
  x, y = _center(x), _center(y)  # CKA is translation invariant; centring first helps rounding.
  return _cka_from_grams(_mm(x, x.T), _mm(y, y.T), debiased)


@_checked
@functools.partial(jax.jit, static_argnames=("debiased", "form"))
def linear_cka(x, y, debiased: bool = False, form: str = "auto"):
  """Linear CKA (Kornblith et al. 2019).

  Args:
    x: (n, d_x) features.
    y: (n, d_y) features of the same n examples.
    debiased: use the unbiased HSIC estimator (Song et al. 2012) as in the reference colab;
      needs n >= 4.
    form: 'feature' computes ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) (cheap when n > d), 'gram' works
      with the n×n Gram matrices (cheap when n < d); 'auto' picks the cheaper by flop count.
      Both give the same value.

  Returns:
    Scalar in [0, 1] (debiased values can be slightly negative).
  """
  _check_form(form, "linear_cka")
  x, y = _prepare_pair(x, y, "linear_cka", min_n=4 if debiased else 2,
                       min_n_reason="the unbiased HSIC estimator divides by n(n-3)")
  n, dx = x.shape
  if _use_feature_form(n, dx, y.shape[1], form):
    return _linear_cka_feature(x, y, debiased)
  return _linear_cka_gram(x, y, debiased)


def _gram_rbf(x, threshold):
  """RBF Gram matrix with σ² = threshold² · median squared distance (reference colab)."""
  x = _center(x)  # distances are translation invariant; centring reduces cancellation.
  dots = _mm(x, x.T)
  sq = jnp.diagonal(dots)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2 * dots, 0)
  # The colab takes the median over the full matrix, zero diagonal included.
  med = jnp.median(d2)
  return jnp.exp(-d2 / (2 * jnp.square(threshold) * med))


@_checked
@functools.partial(jax.jit, static_argnames=("debiased",))
def rbf_cka(x, y, threshold=1.0, debiased: bool = False):
  """CKA with RBF kernels (Kornblith et al. 2019).

  Args:
    x: (n, d_x), y: (n, d_y).
    threshold: bandwidth σ = threshold · sqrt(median pairwise squared distance), per input.
    debiased: unbiased HSIC (needs n >= 4).

  Returns:
    Scalar CKA value.
  """
  x, y = _prepare_pair(x, y, "rbf_cka", min_n=4 if debiased else 2,
                       min_n_reason="the unbiased HSIC estimator divides by n(n-3)")
  threshold = jnp.asarray(threshold, x.dtype)
  return _cka_from_grams(_gram_rbf(x, threshold), _gram_rbf(y, threshold), debiased)


# --------------------------------------------------------------------------- minibatch CKA


def _unbiased_hsic_terms(x, y, form: str = "auto"):
  """(HSIC_1(x,y), HSIC_1(x,x), HSIC_1(y,y)) with linear kernels for one batch."""
  n = x.shape[0]
  scale = 1.0 / (n * (n - 3))
  # HSIC_1 is translation invariant, so centre (better rounding, and the centred formulas).
  x, y = _center(x), _center(y)
  if _use_feature_form(n, x.shape[1], y.shape[1], form):
    a = jnp.sum(x * x, axis=1)
    b = jnp.sum(y * y, axis=1)
    sa, sb = jnp.sum(a), jnp.sum(b)
    xy = _debias(jnp.sum(jnp.square(_mm(x.T, y))), a, b, sa, sb, n)
    xx = _debias(jnp.sum(jnp.square(_mm(x.T, x))), a, a, sa, sa, n)
    yy = _debias(jnp.sum(jnp.square(_mm(y.T, y))), b, b, sb, sb, n)
    return xy * scale, xx * scale, yy * scale
  kc = _center_gram(_mm(x, x.T), True)
  lc = _center_gram(_mm(y, y.T), True)
  return jnp.vdot(kc, lc) * scale, jnp.vdot(kc, kc) * scale, jnp.vdot(lc, lc) * scale


@_checked
@functools.partial(jax.jit, static_argnames=("form",))
def unbiased_hsic(x, y, form: str = "auto"):
  """Unbiased linear-kernel HSIC_1 (Song et al. 2012) of x: (n, d_x), y: (n, d_y); n >= 4."""
  _check_form(form, "unbiased_hsic")
  x, y = _prepare_pair(x, y, "unbiased_hsic", min_n=4,
                       min_n_reason="the unbiased HSIC estimator divides by n(n-3)")
  return _unbiased_hsic_terms(x, y, form)[0]


class MinibatchCKAState(NamedTuple):
  """Running sums of per-batch unbiased HSIC values (a pytree: jit/scan friendly)."""
  hsic_xy: jax.Array
  hsic_xx: jax.Array
  hsic_yy: jax.Array
  num_batches: jax.Array


def _mb_init(dtype=jnp.float32) -> MinibatchCKAState:
  z = jnp.zeros((), dtype)
  return MinibatchCKAState(z, z, z, jnp.zeros((), jnp.int32))


def _mb_update(state: MinibatchCKAState, x, y) -> MinibatchCKAState:
  x, y = _prepare_pair(x, y, "MinibatchCKA.update", min_n=4,
                       min_n_reason="each minibatch's unbiased HSIC divides by b(b-3)")
  xy, xx, yy = _unbiased_hsic_terms(x, y)
  dt = state.hsic_xy.dtype
  return MinibatchCKAState(state.hsic_xy + xy.astype(dt), state.hsic_xx + xx.astype(dt),
                           state.hsic_yy + yy.astype(dt), state.num_batches + 1)


def _mb_result(state: MinibatchCKAState):
  # Means over batches: the 1/num_batches factors cancel in the ratio.
  return state.hsic_xy / jnp.sqrt(state.hsic_xx * state.hsic_yy)


_mb_update_jit = jax.jit(_mb_update)


class MinibatchCKA:
  """Streaming linear CKA over minibatches (Nguyen et al. 2021); memory independent of n.

  CKA = mean_b HSIC_1(X_b, Y_b) / sqrt(mean_b HSIC_1(X_b, X_b) · mean_b HSIC_1(Y_b, Y_b)),
  with HSIC_1 the unbiased estimator, so small batches give no systematic bias.

  Example::

    acc = MinibatchCKA()
    for xb, yb in batches:      # each (b, d_x), (b, d_y), b >= 4
      acc.update(xb, yb)
    value = acc.result()

  The pure functional form for use inside jit/scan: ``MinibatchCKA.init()``,
  ``MinibatchCKA.update_state(state, x, y)``, ``MinibatchCKA.result_of(state)``.
  """

  init = staticmethod(_mb_init)
  update_state = staticmethod(_mb_update)
  result_of = staticmethod(_mb_result)

  def __init__(self):
    self.state: MinibatchCKAState | None = None

  def update(self, x_batch, y_batch) -> "MinibatchCKA":
    """Adds one minibatch: x_batch (b, d_x), y_batch (b, d_y). Returns self."""
    x_batch = jnp.asarray(x_batch)
    y_batch = jnp.asarray(y_batch)
    if self.state is None:
      dtype = jnp.result_type(x_batch.dtype, y_batch.dtype, jnp.float32)
      self.state = _mb_init(dtype)
    self.state = _mb_update_jit(self.state, x_batch, y_batch)
    return self

  def result(self) -> jax.Array:
    """Scalar minibatch CKA over all batches seen so far."""
    if self.state is None:
      raise ValueError("MinibatchCKA.result: no batches were added (call update first)")
    return _mb_result(self.state)


@jax.jit
def _minibatch_cka_stacked(xs, ys):
  def body(state, xy):
    return _mb_update(state, *xy), None

  dtype = jnp.result_type(xs.dtype, ys.dtype, jnp.float32)
  # scan, not vmap: keeps one batch's d×d products live at a time.
  state, _ = jax.lax.scan(body, _mb_init(dtype), (xs, ys))
  return _mb_result(state)


def minibatch_cka(xs, ys):
  """Minibatch linear CKA (Nguyen et al. 2021).

  Args:
    xs: (num_batches, b, d_x) array, or an iterable of (b_i, d_x) arrays.
    ys: matching (num_batches, b, d_y) array or iterable of (b_i, d_y) arrays.

  Returns:
    Scalar CKA from unbiased HSIC averaged over batches.
  """
  if hasattr(xs, "ndim") and hasattr(ys, "ndim"):
    if xs.ndim != 3 or ys.ndim != 3:
      raise ValueError(
          "minibatch_cka: stacked xs, ys must be (num_batches, batch, d) arrays, got shapes"
          f" {tuple(xs.shape)} and {tuple(ys.shape)}")
    if xs.shape[:2] != ys.shape[:2]:
      raise ValueError(
          "minibatch_cka: xs and ys must have equal (num_batches, batch) dims, got"
          f" {tuple(xs.shape[:2])} and {tuple(ys.shape[:2])}")
    return _minibatch_cka_stacked(xs, ys)
  acc = MinibatchCKA()
  count = 0
  for xb, yb in zip(xs, ys, strict=True):
    acc.update(xb, yb)
    count += 1
  if count == 0:
    raise ValueError("minibatch_cka: xs and ys contain no batches")
  return acc.result()


# --------------------------------------------------------------------------- CCA family


def _basis(x, mask=None):
  """Orthonormal basis (n, k) of centred x, columns beyond its numerical rank zeroed.

  Returns (u_masked, s, rank). Masks keep shapes static so this jits and vmaps.
  """
  n, d = x.shape
  u, s, _ = jnp.linalg.svd(x, full_matrices=False)
  # Same tolerance as numpy.linalg.matrix_rank.
  tol = s[0] * max(n, d) * jnp.finfo(x.dtype).eps
  keep = s > tol
  if mask is not None:
    keep = keep & mask(s)
  return u * keep.astype(u.dtype), s, jnp.sum(keep)


def _variance_mask(threshold):
  def mask(s):
    var = jnp.square(s)
    # Keep the fewest leading directions whose cumulative variance reaches `threshold`.
    before = (jnp.cumsum(var) - var) / jnp.sum(var)
    return before < threshold

  return mask


@_checked
@jax.jit
def cca_similarity(x, y):
  """Mean squared canonical correlation R²_CCA = ‖Q_yᵀQ_x‖²_F / min(rank x, rank y).

  Q_x, Q_y are orthonormal bases of the centred inputs (rank-revealing SVD). Needs n well
  above d: with n <= d every canonical correlation is 1.

  Args: x (n, d_x), y (n, d_y). Returns a scalar in [0, 1].
  """
  x, y = _prepare_pair(x, y, "cca_similarity")
  ux, _, rx = _basis(_center(x))
  uy, _, ry = _basis(_center(y))
  return jnp.sum(jnp.square(_mm(ux.T, uy))) / jnp.minimum(rx, ry).astype(x.dtype)


@_checked
@jax.jit
def svcca(x, y, threshold=0.99):
  """SVCCA (Raghu et al. 2017): mean canonical correlation after SVD reduction.

  Each side keeps its fewest leading singular directions that explain at least `threshold`
  of its variance; the mean is over the min(k_x, k_y) canonical correlations.

  Args: x (n, d_x), y (n, d_y), threshold in (0, 1]. Returns a scalar in [0, 1].
  """
  x, y = _prepare_pair(x, y, "svcca")
  mask = _variance_mask(jnp.asarray(threshold, x.dtype))
  ux, _, kx = _basis(_center(x), mask)
  uy, _, ky = _basis(_center(y), mask)
  rho = jnp.linalg.svd(_mm(ux.T, uy), compute_uv=False)
  # Masked columns contribute exact zeros, so the sum runs over the kept correlations only.
  return jnp.sum(rho) / jnp.minimum(kx, ky).astype(x.dtype)


def _pwcca_one_side(x, y):
  xc, yc = _center(x), _center(y)
  ux, _, rx = _basis(xc)
  uy, _, ry = _basis(yc)
  a, rho, _ = jnp.linalg.svd(_mm(ux.T, uy), full_matrices=False)
  k = rho.shape[0]
  valid = (jnp.arange(k) < jnp.minimum(rx, ry)).astype(x.dtype)
  h = _mm(ux, a)  # (n, k) orthonormal canonical variates of x.
  # Morcos et al.: weight each CCA direction by how much of x's neurons it accounts for.
  alpha = jnp.sum(jnp.abs(_mm(h.T, xc)), axis=1) * valid
  return jnp.sum(alpha * rho) / jnp.sum(alpha)


@_checked
@jax.jit
def pwcca(x, y):
  """Projection-weighted CCA (Morcos et al. 2018).

  Σ_i α_i ρ_i with α_i ∝ Σ_j |<h_i, x_j>|, h_i the unit-norm canonical variates and x_j the
  centred neuron columns of the side with fewer neurons (x on ties), as in the reference code.

  Args: x (n, d_x), y (n, d_y), n > max(d_x, d_y) for a meaningful value. Returns a scalar.
  """
  x, y = _prepare_pair(x, y, "pwcca")
  if y.shape[1] < x.shape[1]:
    x, y = y, x
  return _pwcca_one_side(x, y)


# --------------------------------------------------------------------------- Procrustes, RSA, kNN


def _normalize_frobenius(x):
  x = _center(x)
  return x / jnp.linalg.norm(x)


@_checked
@jax.jit
def procrustes_distance(x, y):
  """Orthogonal Procrustes distance (Ding et al. 2021): 2 - 2‖XᵀY‖_* on centred,
  Frobenius-normalised inputs; min over orthogonal Q of ‖XQ - Y‖²_F. In [0, 2].

  Args: x (n, d_x), y (n, d_y). Returns a scalar (0 for a rotated/scaled copy).
  """
  x, y = _prepare_pair(x, y, "procrustes_distance")
  x, y = _normalize_frobenius(x), _normalize_frobenius(y)
  n = x.shape[0]
  if n < min(x.shape[1], y.shape[1]):
    # Xᵀ = Q_x R_x, Yᵀ = Q_y R_y ⇒ XᵀY = Q_x (R_x R_yᵀ) Q_yᵀ: same singular values, n×n SVD.
    rx = jnp.linalg.qr(x.T, mode="r")
    ry = jnp.linalg.qr(y.T, mode="r")
    m = _mm(rx, ry.T)
  else:
    m = _mm(x.T, y)
  nuc = jnp.sum(jnp.linalg.svd(m, compute_uv=False))
  return jnp.maximum(2 - 2 * nuc, 0)


def _rankdata(v):
  """Ranks 1..m with ties averaged (scipy.stats.rankdata 'average')."""
  s = jnp.sort(v)
  lo = jnp.searchsorted(s, v, side="left", method="sort")
  hi = jnp.searchsorted(s, v, side="right", method="sort")
  return (lo + hi + 1).astype(v.dtype) / 2


def _pearson(a, b):
  a = a - jnp.mean(a)
  b = b - jnp.mean(b)
  return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


def _rdm_upper(x, iu):
  """Upper triangle of the correlation-distance RDM 1 - corr(x_i, x_j) between examples."""
  z = x - jnp.mean(x, axis=1, keepdims=True)
  z = z / jnp.linalg.norm(z, axis=1, keepdims=True)
  return 1 - _mm(z, z.T)[iu]


@_checked
@jax.jit
def rsa(x, y):
  """Representational similarity analysis: Spearman correlation of the upper triangles
  (diagonal excluded) of the correlation-distance RDMs of x and y.

  Args: x (n, d_x), y (n, d_y) with n >= 3 and no constant rows. Returns a scalar in [-1, 1].
  """
  x, y = _prepare_pair(x, y, "rsa", min_n=3, min_n_reason="an RDM needs at least 3 pairs")
  iu = np.triu_indices(x.shape[0], k=1)
  return _pearson(_rankdata(_rdm_upper(x, iu)), _rankdata(_rdm_upper(y, iu)))


def _knn_indices(x, k: int, normalize: bool):
  if normalize:
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
  sim = _mm(x, x.T)
  sim = jnp.where(jnp.eye(x.shape[0], dtype=bool), -jnp.inf, sim)  # exclude self.
  return jax.lax.top_k(sim, k)[1]


@_checked
@functools.partial(jax.jit, static_argnames=("k", "normalize"))
def mutual_knn(x, y, k: int = 10, normalize: bool = True):
  """Mutual k-NN alignment (Huh et al. 2024): mean over examples of |N_x(i) ∩ N_y(i)| / k.

  Neighbours by cosine similarity (inner product of L2-normalised rows, as in the reference
  code; ``normalize=False`` uses raw inner products), each example excluded from its own set.

  Args: x (n, d_x), y (n, d_y), 1 <= k < n. Returns a scalar in [0, 1].
  """
  x, y = _prepare_pair(x, y, "mutual_knn")
  n = x.shape[0]
  if not isinstance(k, (int, np.integer)) or not 1 <= k < n:
    raise ValueError(f"mutual_knn: k must be an integer with 1 <= k < n={n}, got {k!r}")
  ia = _knn_indices(x, k, normalize)
  ib = _knn_indices(y, k, normalize)
  # (n, k, k) index comparisons instead of n×n masks: memory O(n k²).
  overlap = jnp.sum(ia[:, :, None] == ib[:, None, :])  # integer count: exact 1.0 when equal.
  return overlap.astype(x.dtype) / (n * k)


# --------------------------------------------------------------------------- layer-wise helpers

MEASURES: dict[str, Callable[..., jax.Array]] = {
    "linear_cka": linear_cka,
    "linear_cka_debiased": functools.partial(linear_cka, debiased=True),
    "rbf_cka": rbf_cka,
    "rbf_cka_debiased": functools.partial(rbf_cka, debiased=True),
    "cca_similarity": cca_similarity,
    "svcca": svcca,
    "pwcca": pwcca,
    "procrustes_distance": procrustes_distance,
    "rsa": rsa,
    "mutual_knn": mutual_knn,
}

_POOLS = ("mean", "cls", "token_mean", "flatten")


def pool_features(rep, pool: str = "mean"):
  """Reduces one layer's representation to (N, D).

  pool='mean' (default) picks the usual summary per layout:
    (N, H, W, C) conv maps -> spatial mean (N, C);
    (N, T, D) ViT tokens   -> the CLS token rep[:, 0] (ViT's classifier reads it, so it is the
                              token fine-tuning shapes; use 'token_mean' for CLS-free models);
    (N, D)                 -> unchanged.
  pool='cls': (N, T, D) -> rep[:, 0]; pool='token_mean': mean over all spatial/token axes;
  pool='flatten': (N, ...) -> (N, prod(...)) (keeps spatial layout; large d).
  """
  rep = jnp.asarray(rep)
  if pool not in _POOLS:
    raise ValueError(f"pool_features: pool must be one of {_POOLS}, got {pool!r}")
  if rep.ndim < 2 or rep.ndim > 4:
    raise ValueError(
        f"pool_features: rep must be (N, D), (N, T, D) or (N, H, W, C), got shape {rep.shape}")
  if rep.ndim == 2:
    return rep
  if pool == "flatten":
    return rep.reshape(rep.shape[0], -1)
  if pool == "token_mean" or (pool == "mean" and rep.ndim == 4):
    return jnp.mean(rep, axis=tuple(range(1, rep.ndim - 1)))
  if rep.ndim == 3:  # 'mean' or 'cls' on tokens.
    return rep[:, 0]
  raise ValueError(f"pool_features: pool='cls' needs (N, T, D) tokens, got shape {rep.shape}")


def _resolve_measure(measure) -> Callable[..., jax.Array]:
  if callable(measure):
    return measure
  if measure not in MEASURES:
    raise ValueError(
        f"measure must be a callable or one of {sorted(MEASURES)}, got {measure!r}")
  return MEASURES[measure]


def _group_by_shape(arrays: Mapping[str, Any], names: Sequence[str]) -> list[list[str]]:
  """Names grouped by (shape, dtype), in first-appearance order."""
  groups: dict[Any, list[str]] = collections.OrderedDict()
  for name in names:
    a = arrays[name]
    groups.setdefault((tuple(a.shape), jnp.dtype(a.dtype)), []).append(name)
  return list(groups.values())


def _group_pairs(pa, pb, names) -> list[list[str]]:
  """Names grouped by the joint shapes of (a, b): each group can be stacked and vmapped."""
  groups: dict[Any, list[str]] = collections.OrderedDict()
  for name in names:
    key = (tuple(pa[name].shape), jnp.dtype(pa[name].dtype), tuple(pb[name].shape),
           jnp.dtype(pb[name].dtype))
    groups.setdefault(key, []).append(name)
  return list(groups.values())


@functools.partial(jax.jit, static_argnames=("names", "fn", "pool"))
def _layerwise_jit(arrays_a, arrays_b, names, fn, pool):
  # Lists + static names, not dicts: jit would reorder dict keys.
  pa = {k: pool_features(a, pool) for k, a in zip(names, arrays_a)}
  pb = {k: pool_features(b, pool) for k, b in zip(names, arrays_b)}
  out = {}
  for group in _group_pairs(pa, pb, names):
    vals = jax.vmap(fn)(jnp.stack([pa[k] for k in group]), jnp.stack([pb[k] for k in group]))
    out.update({k: vals[i] for i, k in enumerate(group)})
  return [out[k] for k in names]


def layerwise_similarity(reps_a: Mapping[str, Any], reps_b: Mapping[str, Any],
                         measure="linear_cka", pool: str = "mean") -> dict[str, jax.Array]:
  """Similarity of each layer of model A to the same-named layer of model B.

  One jitted computation: layers whose (pooled) shapes agree are stacked and vmapped through
  the measure; the other groups are computed in the same call.

  Args:
    reps_a, reps_b: {layer name: (N, ...) array}, same names, same N examples.
    measure: a name in MEASURES or a callable f(x, y) -> scalar (hashable; vmappable).
    pool: see pool_features.

  Returns:
    {layer name: scalar array}, in the order of reps_a.
  """
  if set(reps_a) != set(reps_b):
    raise ValueError(
        "layerwise_similarity: reps_a and reps_b must have the same layer names, got"
        f" {sorted(reps_a)} and {sorted(reps_b)}")
  if not reps_a:
    raise ValueError("layerwise_similarity: reps_a is empty")
  fn = _resolve_measure(measure)
  names = tuple(reps_a)
  out = _layerwise_jit([reps_a[k] for k in names], [reps_b[k] for k in names], names, fn, pool)
  return dict(zip(names, out))


@functools.partial(jax.jit, static_argnames=("names_a", "names_b", "fn", "pool"))
def _cross_layer_jit(arrays_a, arrays_b, names_a, names_b, fn, pool):
  pa = {k: pool_features(v, pool) for k, v in zip(names_a, arrays_a)}
  pb = {k: pool_features(v, pool) for k, v in zip(names_b, arrays_b)}
  index_a = {k: i for i, k in enumerate(names_a)}
  index_b = {k: i for i, k in enumerate(names_b)}
  dtype = jnp.result_type(*[v.dtype for v in pa.values()], *[v.dtype for v in pb.values()],
                          jnp.float32)
  matrix = jnp.zeros((len(names_a), len(names_b)), dtype)
  for ga in _group_by_shape(pa, names_a):
    xs = jnp.stack([pa[k] for k in ga])
    for gb in _group_by_shape(pb, names_b):
      ys = jnp.stack([pb[k] for k in gb])
      # lax.map over A keeps only one row of B-comparisons live at a time.
      block = jax.lax.map(lambda x, ys=ys: jax.vmap(lambda y: fn(x, y))(ys), xs)
      rows = np.array([index_a[k] for k in ga])[:, None]
      cols = np.array([index_b[k] for k in gb])[None, :]
      matrix = matrix.at[rows, cols].set(block.astype(dtype))
  return matrix


def cross_layer_similarity(reps_a: Mapping[str, Any], reps_b: Mapping[str, Any],
                           measure="linear_cka", pool: str = "mean"):
  """All pairs: layer i of A against layer j of B, in one jitted call.

  Args: as layerwise_similarity (names may differ between A and B).

  Returns:
    (names_a, names_b, matrix) with matrix (len(names_a), len(names_b)).
  """
  if not reps_a or not reps_b:
    raise ValueError("cross_layer_similarity: reps_a and reps_b must be non-empty dicts")
  fn = _resolve_measure(measure)
  names_a, names_b = tuple(reps_a), tuple(reps_b)
  matrix = _cross_layer_jit([reps_a[k] for k in names_a], [reps_b[k] for k in names_b],
                            names_a, names_b, fn, pool)
  return list(names_a), list(names_b), matrix


# --------------------------------------------------------------------------- tables and plots


def similarity_table(values, path=None):
  """Tabulates similarity results as a pandas DataFrame and optionally writes a CSV.

  Args:
    values: one of
      {layer: scalar}                      -> one column 'similarity', index 'layer';
      {measure: {layer: scalar}}           -> one column per measure, index 'layer';
      (names_a, names_b, matrix)           -> cross_layer_similarity output, rows = A layers.
    path: optional CSV path, written atomically.

  Returns:
    The DataFrame.
  """
  import pandas as pd  # Imported lazily: the measures themselves need no pandas.

  if isinstance(values, tuple):
    if len(values) != 3:
      raise ValueError("similarity_table: a tuple must be (names_a, names_b, matrix)")
    names_a, names_b, matrix = values
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (len(names_a), len(names_b)):
      raise ValueError(
          f"similarity_table: matrix shape {matrix.shape} does not match"
          f" ({len(names_a)}, {len(names_b)}) names")
    df = pd.DataFrame(matrix, index=pd.Index(list(names_a), name="layer_a"),
                      columns=list(names_b))
  elif isinstance(values, Mapping):
    if not values:
      raise ValueError("similarity_table: values is empty")
    if all(isinstance(v, Mapping) for v in values.values()):
      cols = {m: {k: float(np.asarray(v)) for k, v in d.items()} for m, d in values.items()}
      df = pd.DataFrame(cols)
    else:
      df = pd.DataFrame({"similarity": {k: float(np.asarray(v)) for k, v in values.items()}})
    df.index.name = "layer"
  else:
    raise ValueError(
        "similarity_table: values must be a dict or a (names_a, names_b, matrix) tuple, got"
        f" {type(values).__name__}")
  if path is not None:
    io.atomic_write(path, lambda tmp: df.to_csv(tmp))
  return df


def plot_heatmap(matrix, names_a: Sequence[str], names_b: Sequence[str], path, title=None,
                 vmin=0.0, vmax=1.0, cmap: str = "viridis", label: str = "similarity",
                 xlabel: str = "B layers", ylabel: str = "A layers"):
  """Saves a heatmap of matrix (len(names_a), len(names_b)); rows = A layers.

  Uses the Agg canvas directly (no pyplot state, safe in headless jobs/threads); the image
  format follows the path's suffix; the file is written atomically. Returns the path.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  matrix = np.asarray(matrix, dtype=np.float64)
  if matrix.shape != (len(names_a), len(names_b)):
    raise ValueError(
        f"plot_heatmap: matrix shape {matrix.shape} does not match ({len(names_a)},"
        f" {len(names_b)}) names")
  na, nb = matrix.shape
  fig = Figure(figsize=(max(4.0, 0.45 * nb + 2.5), max(3.5, 0.4 * na + 1.5)))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  im = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap=cmap, origin="lower", aspect="auto")
  ax.set_xticks(range(nb), labels=list(names_b), rotation=90, fontsize=7)
  ax.set_yticks(range(na), labels=list(names_a), fontsize=7)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if na * nb <= 200:  # small enough to print every value in its cell
    for i in range(na):
      for j in range(nb):
        v = matrix[i, j]
        light = np.isfinite(v) and (v - vmin) / max(vmax - vmin, 1e-12) > 0.6
        ax.text(j, i, f"{v:.2f}" if np.isfinite(v) else "", ha="center", va="center",
                fontsize=6, color="black" if light else "white")
  if title:
    ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, label=label)
  fig.tight_layout()
  io.save_figure(fig, path, dpi=120)
  return os.fspath(path)
