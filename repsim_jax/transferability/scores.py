"""Transferability scores of a source model's features / predictions on a target training set.

All scores take NumPy or JAX arrays: ``features`` (n, d), ``labels`` (n,) integers covering
0..C-1 ((n, 1) is accepted, MedMNIST style), ``probs`` (n, Z) source-class probabilities.
Higher is better for every score.

Precision: the eigen / Cholesky / log-det steps run in float64 NumPy (LAPACK), as the
reference implementations do; the O(n d^2) Gram matrices are formed at the input's
precision (float32 network features -> float32 GEMM, twice as fast; float64 input ->
float64 throughout). Small, elementwise scores (LEEP) are jitted JAX.

Conventions follow the authors' reference code where it fixes one (DESIGN.md §5):
- LogME: the "fast" fixed-point version of You et al. (thuml/LogME ``_fit_fixed_point``):
  one SVD of the features, then per-target fixed-point updates of (alpha, beta), 11
  iterations at most, relative tolerance 1e-3 on alpha/beta, evidence / n averaged over
  targets. Classification regresses each one-hot column; ``multilabel=True`` regresses
  the columns of the multi-hot label matrix (the authors' regression mode, which they
  recommend for multi-label targets).
- H-score: tr(pinv(cov f) cov(E[f|y])), both ddof=1 covariances (Bao et al. 2019).
- Regularised H-score (Ibrahim et al. 2022): features centred, cov_alpha the Ledoit-Wolf
  estimate as scikit-learn computes it, score tr(pinv(cov_alpha) (1 - alpha) cov(E[f|y]))
  with the ddof=1 covariance of the class means.
- TransRate (Huang et al. 2022): features centred, R(Z) = ½ logdet(I + ZᵀZ / (n ε)) with n
  the (sub)set size, score R(Z) − mean_c R(Z_c).
- GBC (Pándy et al. 2022, google-research/stable_transfer): PCA to ``pca_dim`` (64)
  dimensions, per-class mean and population variance (floored at 1e-4), diagonal or
  spherical Gaussians, GBC = −Σ_{i≠j} exp(−D_B(i, j)) over ordered class pairs. The
  spherical variant follows the reference code exactly: the variance is the mean of the
  per-dimension variances and its log-determinant term enters once (not d times).
- NLEEP (Li et al. 2021): PCA keeping 80% of the variance, a Gaussian mixture with 5·C
  components fitted by EM (implemented here; k-means initialisation, scikit-learn's
  defaults tol=1e-3, reg_covar=1e-6, max_iter=100; k-means stops after 30 Lloyd steps),
  then LEEP on the mixture posteriors.
  ``covariance_type="diag"`` is the default because full covariances cost O(n K p^2) per
  EM step (p is often a few hundred after PCA); ``"full"`` is available.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special

from repsim_jax.transferability import _checks

__all__ = [
    "logme", "logme_fixed_point", "leep", "nleep", "nce", "h_score", "regularized_h_score",
    "ledoit_wolf", "gbc", "transrate", "pca_transform", "gaussian_mixture_posteriors",
]


# ----------------------------------------------------------------------------- helpers

def _gram(x: np.ndarray, *, rows: bool) -> np.ndarray:
  """x xᵀ (rows=True) or xᵀ x, formed at x's precision, returned as float64."""
  g = x @ x.T if rows else x.T @ x
  return np.asarray(g, dtype=np.float64)


def _eigh_desc(g: np.ndarray, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
  """Eigen-decomposition of a symmetric PSD matrix, eigenvalues descending, clipped at 0.

  Computed in `dtype` (float32 halves the time of the d=2048 decomposition that dominates
  LogME), returned as float64.
  """
  # 'evd' (divide and conquer) is several times faster than the default 'evr' here.
  w, v = scipy.linalg.eigh(np.asarray(g, dtype), driver="evd", check_finite=False)
  return (np.maximum(w[::-1], 0.0).astype(np.float64),
          np.ascontiguousarray(v[:, ::-1], dtype=np.float64))


def pca_transform(features, n_components=None, *, variance: float | None = None) -> np.ndarray:
  """Principal-component scores of centred ``features`` (n, d) -> (n, k).

  Exactly one of ``n_components`` (k, capped at min(n, d)) or ``variance`` (keep the
  fewest leading components whose explained-variance ratio reaches this fraction, the
  rule of scikit-learn's ``PCA(n_components=0.8)``) is given. Signs of components are
  arbitrary.
  """
  x = _checks.as_features(features, dtype=None)
  if (n_components is None) == (variance is None):
    raise ValueError("pca_transform: give exactly one of n_components or variance")
  n, d = x.shape
  x = x - x.mean(axis=0, keepdims=True)
  if n > d:
    w, v = _eigh_desc(_gram(x, rows=False))
    basis = v  # principal axes in feature space
  else:
    w, u = _eigh_desc(_gram(x, rows=True))
  if variance is not None:
    if not 0.0 < variance <= 1.0:
      raise ValueError(f"variance: expected a fraction in (0, 1], got {variance}")
    ratio = np.cumsum(w) / max(w.sum(), np.finfo(np.float64).tiny)
    k = int(np.searchsorted(ratio, variance, side="right")) + 1
  else:
    if int(n_components) < 1:
      raise ValueError(f"n_components: expected a positive integer, got {n_components}")
    k = int(n_components)
  k = min(k, n, d)
  if n > d:
    return np.asarray(x @ basis[:, :k].astype(x.dtype), dtype=np.float64)
  # Scores from the Gram eigenvectors: x v_k = u_k s_k.
  return u[:, :k] * np.sqrt(w[:k])[None, :]


def _one_hot(y: np.ndarray, num_classes: int) -> np.ndarray:
  return (y[:, None] == np.arange(num_classes)[None, :]).astype(np.float64)


# ----------------------------------------------------------------------------- LogME

def logme_fixed_point(features, targets, *, max_iter: int = 11, tol: float = 1e-3) -> dict:
  """LogME fixed-point evidence maximisation for each column of ``targets``.

  Bayesian linear regression y = f m + noise with prior m ~ N(0, α⁻¹ I) and noise
  precision β; α, β maximise the evidence through the fixed point
  γ = Σ βσ_i/(α + βσ_i), α = γ / mᵀm, β = (n − γ) / ‖y − f m‖² (σ_i = squared singular
  values of f). Updates follow the authors' fast version (thuml/LogME ``_fit_fixed_point``).

  Args:
    features: (n, d).
    targets: (n, K) real targets (one-hot columns for classification).
    max_iter: fixed-point iterations at most (authors: 11).
    tol: stop when |t_new − t| / t <= tol, t = α/β (authors: 1e-3).

  Returns:
    dict with ``evidence`` (K,) (log evidence / n, the authors' formula), ``alpha`` (K,),
    ``beta`` (K,), ``m`` (d, K) the posterior mean under the returned (α, β).
  """
  f = _checks.as_features(features, dtype=None)
  y = np.asarray(targets, dtype=np.float64)
  if y.ndim == 1:
    y = y[:, None]
  n, d = f.shape
  if y.ndim != 2 or y.shape[0] != n:
    raise ValueError(f"targets: expected shape ({n}, K), got {np.shape(targets)}")
  if not np.all(np.isfinite(y)):
    raise ValueError("targets: contains NaN or inf values")
  if max_iter < 1:
    raise ValueError(f"max_iter: expected >= 1, got {max_iter}")

  if n > d:
    sigma, v = _eigh_desc(_gram(f, rows=False), f.dtype)  # fᵀf = V diag(σ) Vᵀ
  else:
    sigma, u = _eigh_desc(_gram(f, rows=True), f.dtype)   # f fᵀ = U diag(σ) Uᵀ
  s = np.sqrt(sigma)
  keep = s > 1e-10  # numerical rank, as the authors' truncated SVD
  sigma, s = sigma[keep], s[keep]
  if n > d:
    v = v[:, keep]
    fty = np.asarray(f.T @ y.astype(f.dtype), dtype=np.float64)  # (d, K)
    x = (v.T @ fty) / s[:, None]                                  # uᵀ y, u = f v / s
  else:
    u = u[:, keep]
    x = u.T @ y
  x2 = x * x                                                      # (k, K)
  res_x2 = np.sum(y * y, axis=0) - np.sum(x2, axis=0)             # part of y outside span(u)
  sig = sigma[:, None]

  num_t = y.shape[1]
  alpha = np.ones(num_t)
  beta = np.ones(num_t)
  active = np.ones(num_t, dtype=bool)
  gamma = m2 = res2 = None
  for _ in range(max_iter):
    t = alpha / beta
    g_ = np.sum(sig / (sig + t), axis=0)
    m2_ = np.sum(sig * x2 / (t + sig) ** 2, axis=0)
    r2_ = np.sum(x2 / (1.0 + sig / t) ** 2, axis=0) + res_x2
    a_new = g_ / (m2_ + 1e-5)
    b_new = (n - g_) / (r2_ + 1e-5)
    if gamma is None:
      gamma, m2, res2 = g_, m2_, r2_
    # Converged columns keep their values (the authors break per column).
    gamma = np.where(active, g_, gamma)
    m2 = np.where(active, m2_, m2)
    res2 = np.where(active, r2_, res2)
    alpha = np.where(active, a_new, alpha)
    beta = np.where(active, b_new, beta)
    done = np.abs(alpha / beta - t) / t <= tol
    active = active & ~done
    if not active.any():
      break
  evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta)
              - 0.5 * np.sum(np.log(alpha[None, :] + beta[None, :] * sig), axis=0)
              - beta / 2.0 * res2 - alpha / 2.0 * m2 - n / 2.0 * np.log(2 * np.pi)) / n
  t = alpha / beta
  coef = x / (t[None, :] + sig)  # (k, K)
  if n > d:
    m = v @ (coef * s[:, None])
  else:
    m = np.asarray(f.T.astype(np.float64) @ (u @ coef))
  return {"evidence": evidence, "alpha": alpha, "beta": beta, "m": m}


def logme(features, labels, *, multilabel: bool = False, max_iter: int = 11,
          tol: float = 1e-3) -> float:
  """LogME (You et al. 2021): mean per-target log evidence / n.

  Args:
    features: (n, d).
    labels: (n,) ints in 0..C-1, or with ``multilabel=True`` an (n, K) multi-hot matrix
      (regression mode on its columns, as the LogME authors recommend).
  """
  f = _checks.as_features(features, dtype=None)
  if multilabel:
    y = _checks.as_multilabel(labels, f.shape[0])
  else:
    lab, c = _checks.as_class_labels(labels, f.shape[0])
    y = _one_hot(lab, c)
  return float(np.mean(logme_fixed_point(f, y, max_iter=max_iter, tol=tol)["evidence"]))


# ----------------------------------------------------------------------------- LEEP / NCE

@functools.partial(jax.jit, static_argnames=("num_classes",))
def _leep(probs, labels, num_classes):
  n = probs.shape[0]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=probs.dtype)
  joint = probs.T @ onehot / n                               # P(z, y), (Z, C)
  marg = joint.sum(axis=1, keepdims=True)                    # P(z)
  cond = jnp.where(marg > 0, joint / jnp.where(marg > 0, marg, 1.0), 0.0)  # P(y | z)
  eep = jnp.sum((probs @ cond) * onehot, axis=1)             # Σ_z P(y_i|z) θ(x_i)_z
  return jnp.mean(jnp.log(eep))


def leep(probs, labels) -> float:
  """LEEP (Nguyen et al. 2020): mean log-likelihood of the expected empirical predictor.

  Args:
    probs: (n, Z) source-class probabilities of the target examples (rows sum to 1).
    labels: (n,) target labels in 0..C-1.
  """
  p = _checks.as_features(probs, name="probs", dtype=None)
  lab, c = _checks.as_class_labels(labels, p.shape[0])
  if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
    raise ValueError("probs: expected non-negative rows summing to 1 (apply softmax to logits first)")
  return float(_leep(jnp.asarray(p), jnp.asarray(lab), c))


def nce(source_labels, target_labels) -> float:
  """NCE (Tran et al. 2019): −H(Y | Z) of the empirical joint of source and target labels.

  Args:
    source_labels: (n,) non-negative ints (e.g. argmax source predictions; not every
      source class need occur).
    target_labels: (n,) target labels in 0..C-1.
  Returns:
    Σ_{z,y} P(z, y) log P(y | z) (<= 0; 0 when y is a function of z).
  """
  z = _checks.as_int_vector(source_labels, "source_labels")
  y, c = _checks.as_class_labels(target_labels, None, name="target_labels")
  if z.shape[0] != y.shape[0]:
    raise ValueError(f"target_labels: length {y.shape[0]} does not match source_labels length {z.shape[0]}")
  n = y.shape[0]
  num_z = int(z.max()) + 1
  joint = np.bincount(z * c + y, minlength=num_z * c).reshape(num_z, c) / n
  pz = joint.sum(axis=1, keepdims=True)
  nz = joint > 0
  return float(np.sum(joint[nz] * np.log(joint[nz] / np.broadcast_to(pz, joint.shape)[nz])))


# ----------------------------------------------------------------------------- GMM / NLEEP

def _kmeans_labels(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 30) -> np.ndarray:
  """k-means++ seeding then at most ``iters`` Lloyd iterations; cluster index per row.

  Only an initialisation for EM, so Lloyd stops early (assignments unchanged or ``iters``).
  """
  n = x.shape[0]
  sq = np.sum(x * x, axis=1)
  centres = np.empty((k, x.shape[1]))
  centres[0] = x[rng.integers(n)]
  d2 = np.maximum(sq - 2 * x @ centres[0] + centres[0] @ centres[0], 0.0)
  for j in range(1, k):
    tot = d2.sum()
    idx = rng.integers(n) if tot <= 0 else rng.choice(n, p=d2 / tot)
    centres[j] = x[idx]
    d2 = np.minimum(d2, np.maximum(sq - 2 * x @ centres[j] + centres[j] @ centres[j], 0.0))
  assign = None
  for _ in range(iters):
    dist = sq[:, None] - 2 * x @ centres.T + np.sum(centres * centres, axis=1)[None, :]
    new = np.argmin(dist, axis=1)
    if assign is not None and np.array_equal(new, assign):
      break
    assign = new
    counts = np.bincount(assign, minlength=k)
    sums = _one_hot(assign, k).T @ x  # a GEMM; np.add.at is unbuffered and slow
    nonempty = counts > 0
    centres[nonempty] = sums[nonempty] / counts[nonempty, None]
  return assign


def _gmm_m_step(x, resp, covariance_type, reg_covar):
  nk = resp.sum(axis=0) + 10 * np.finfo(np.float64).eps
  means = resp.T @ x / nk[:, None]
  if covariance_type == "diag":
    cov = resp.T @ (x * x) / nk[:, None] - means ** 2 + reg_covar
    cov = np.maximum(cov, reg_covar)
  else:
    p = x.shape[1]
    cov = np.empty((means.shape[0], p, p))
    for k in range(means.shape[0]):
      diff = x - means[k]
      cov[k] = (resp[:, k, None] * diff).T @ diff / nk[k]
      cov[k].flat[:: p + 1] += reg_covar
  return nk / x.shape[0], means, cov


def _gmm_log_prob(x, weights, means, cov, covariance_type):
  """log w_k + log N(x | μ_k, Σ_k), (n, K)."""
  n, p = x.shape
  if covariance_type == "diag":
    prec = 1.0 / cov
    maha = (x * x) @ prec.T - 2 * x @ (means * prec).T + np.sum(means ** 2 * prec, axis=1)[None, :]
    logdet = np.sum(np.log(cov), axis=1)
  else:
    maha = np.empty((n, means.shape[0]))
    logdet = np.empty(means.shape[0])
    for k in range(means.shape[0]):
      chol = np.linalg.cholesky(cov[k])
      z = scipy.linalg.solve_triangular(chol, (x - means[k]).T, lower=True, check_finite=False)
      maha[:, k] = np.sum(z * z, axis=0)
      logdet[k] = 2 * np.sum(np.log(np.diag(chol)))
  return -0.5 * (p * np.log(2 * np.pi) + logdet[None, :] + maha) + np.log(weights)[None, :]


def gaussian_mixture_posteriors(x, n_components: int, *, covariance_type: str = "diag",
                                seed: int = 0, max_iter: int = 100, tol: float = 1e-3,
                                reg_covar: float = 1e-6) -> np.ndarray:
  """Fit a Gaussian mixture by EM and return the posteriors p(component | x), (n, K).

  k-means (k-means++ seeded with ``seed``) initial responsibilities; EM until the mean
  log-likelihood changes by less than ``tol`` (scikit-learn's GaussianMixture defaults).
  """
  x = _checks.as_features(x, name="x")
  if covariance_type not in ("diag", "full"):
    raise ValueError(f"covariance_type: expected 'diag' or 'full', got {covariance_type!r}")
  k = int(n_components)
  if not 1 <= k <= x.shape[0]:
    raise ValueError(f"n_components: expected 1..{x.shape[0]} (number of rows), got {n_components}")
  rng = np.random.default_rng(seed)
  resp = _one_hot(_kmeans_labels(x, k, rng), k)
  prev = -np.inf
  for _ in range(max_iter):
    params = _gmm_m_step(x, resp, covariance_type, reg_covar)
    logp = _gmm_log_prob(x, *params, covariance_type)
    lse = scipy.special.logsumexp(logp, axis=1, keepdims=True)
    resp = np.exp(logp - lse)
    lower = float(np.mean(lse))
    if abs(lower - prev) < tol:
      break
    prev = lower
  return resp


def nleep(features, labels, *, seed: int = 0, variance: float = 0.8, components_per_class: int = 5,
          covariance_type: str = "diag") -> float:
  """NLEEP (Li et al. 2021): LEEP on the posteriors of a Gaussian mixture fitted to PCA'd features.

  PCA keeps ``variance`` (80%) of the variance; the mixture has ``components_per_class``·C
  components (see the module docstring for the EM and the covariance choice).
  """
  f = _checks.as_features(features, dtype=None)
  lab, c = _checks.as_class_labels(labels, f.shape[0])
  _checks.warn_if_degenerate("nleep", f, "a mixture of that many components can fit single examples, so NLEEP says little")
  z = pca_transform(f, variance=variance)
  k = min(components_per_class * c, f.shape[0])
  post = gaussian_mixture_posteriors(z, k, covariance_type=covariance_type, seed=seed)
  return float(_leep(jnp.asarray(post, dtype=jnp.float32), jnp.asarray(lab), c))


# ----------------------------------------------------------------------------- H-scores

def _class_means(f: np.ndarray, lab: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
  counts = np.bincount(lab, minlength=c).astype(np.float64)
  sums = _one_hot(lab, c).T @ f
  return sums / counts[:, None], counts


def _trace_pinv_times_between(cov: np.ndarray, centred_means: np.ndarray, counts: np.ndarray,
                              n: int, *, psd_full_rank: bool) -> float:
  """tr(pinv(cov) · Σ_c n_c/(n−1) m_c m_cᵀ) without forming the d×d between-class matrix."""
  weighted = centred_means * np.sqrt(counts / (n - 1))[:, None]  # (C, d)
  if psd_full_rank:
    try:
      chol = scipy.linalg.cho_factor(cov, check_finite=False)
      return float(np.sum(weighted.T * scipy.linalg.cho_solve(chol, weighted.T, check_finite=False)))
    except np.linalg.LinAlgError:
      pass
  w, v = scipy.linalg.eigh(cov, driver="evd", check_finite=False)
  # pinv(rcond=1e-15) semantics: singular values |λ| below 1e-15·max are dropped.
  keep = np.abs(w) > 1e-15 * np.max(np.abs(w))
  proj = weighted @ v[:, keep]
  return float(np.sum(proj * proj / w[keep][None, :]))


def h_score(features, labels) -> float:
  """H-score (Bao et al. 2019): tr(pinv(cov f) cov(E[f | y])), ddof=1 covariances."""
  f = _checks.as_features(features, dtype=None)
  lab, c = _checks.as_class_labels(labels, f.shape[0])
  _checks.warn_if_degenerate("h_score", f, "the feature covariance is singular and the score "
                             "tends to C - 1 whatever the features (regularized_h_score is not)")
  n = f.shape[0]
  f = f - f.mean(axis=0, keepdims=True)
  cov = _gram(f, rows=False) / (n - 1)
  means, counts = _class_means(f.astype(np.float64), lab, c)
  return _trace_pinv_times_between(cov, means, counts, n, psd_full_rank=False)


def ledoit_wolf(x, *, assume_centered: bool = False) -> tuple[np.ndarray, float]:
  """Ledoit-Wolf shrunk covariance, as ``sklearn.covariance.ledoit_wolf`` computes it.

  S = XᵀX / n (X centred unless ``assume_centered``), μ = tr(S)/d,
  shrinkage = min(b², δ²)/δ² with δ² = ‖S − μI‖²_F / d and
  b² = (Σ_i ‖x_i‖⁴ / n − ‖S‖²_F) / (n d); estimate (1 − s) S + s μ I.

  Returns:
    (covariance (d, d), shrinkage).
  """
  x = _checks.as_features(x, name="x", dtype=None)
  n, d = x.shape
  if not assume_centered:
    x = x - x.mean(axis=0, keepdims=True)
  if d == 1:
    return np.atleast_2d(np.mean(np.asarray(x, np.float64) ** 2)), 0.0
  s = _gram(x, rows=False) / n
  mu = np.trace(s) / d
  row_sq = np.sum(np.asarray(x, np.float64) ** 2, axis=1)
  s_fro2 = np.sum(s * s)
  b2 = (np.sum(row_sq ** 2) / n - s_fro2) / (n * d)
  delta2 = (s_fro2 - 2.0 * mu * np.trace(s) + d * mu ** 2) / d
  b2 = min(b2, delta2)
  shrinkage = 0.0 if b2 == 0 else float(b2 / delta2)
  cov = (1.0 - shrinkage) * s
  cov.flat[:: d + 1] += shrinkage * mu
  return cov, shrinkage


def regularized_h_score(features, labels) -> float:
  """Regularised H-score (Ibrahim et al. 2022): tr(pinv(cov_α f) (1 − α) cov(E[f | y])).

  cov_α is the Ledoit-Wolf estimate (shrinkage α) of the centred features; the between-class
  covariance is the ddof=1 covariance of the per-example class means.
  """
  f = _checks.as_features(features, dtype=None)
  lab, c = _checks.as_class_labels(labels, f.shape[0])
  n = f.shape[0]
  f = f - f.mean(axis=0, keepdims=True)
  cov, alpha = ledoit_wolf(f)
  means, counts = _class_means(f.astype(np.float64), lab, c)
  means = means - (counts @ means / n)[None, :]  # centre (float rounding of the earlier centring)
  return (1.0 - alpha) * _trace_pinv_times_between(cov, means, counts, n, psd_full_rank=alpha > 0)


# ----------------------------------------------------------------------------- TransRate

def _coding_rate(z: np.ndarray, eps: float) -> float:
  """½ logdet(I + zᵀz / (n ε)) via the smaller Gram (Sylvester) and a Cholesky factor."""
  n, d = z.shape
  g = _gram(z, rows=n < d) / (n * eps)
  g.flat[:: g.shape[0] + 1] += 1.0
  chol = scipy.linalg.cholesky(g, lower=True, check_finite=False)
  return float(np.sum(np.log(np.diag(chol))))  # ½ · 2 Σ log diag L


def transrate(features, labels, eps: float = 1e-4) -> float:
  """TransRate (Huang et al. 2022): R(Z) − mean_c R(Z_c) on centred features, R the coding rate."""
  f = _checks.as_features(features, dtype=None)
  lab, c = _checks.as_class_labels(labels, f.shape[0])
  if not eps > 0:
    raise ValueError(f"eps: expected a positive number, got {eps}")
  _checks.warn_if_degenerate("transrate", f, "the coding rates grow with n, not with how the "
                             "classes separate")
  z = f - f.mean(axis=0, keepdims=True)
  whole = _coding_rate(z, eps)
  per_class = [_coding_rate(z[lab == k], eps) for k in range(c)]
  return whole - float(np.mean(per_class))


# ----------------------------------------------------------------------------- GBC

def gbc(features, labels, *, gaussian_type: str = "spherical", pca_dim: int | None = 64) -> float:
  """GBC (Pándy et al. 2022): −Σ_{i≠j} BC(i, j) of per-class Gaussians after PCA.

  BC = exp(−D_B), D_B = ⅛ Σ (μ_i − μ_j)² / σ̄ + ½ [Σ log σ̄ − ½ Σ log σ_i − ½ Σ log σ_j],
  σ̄ = (σ_i + σ_j)/2, per-dimension variances ('diagonal') or their mean ('spherical',
  a scalar, as in the reference code). ``pca_dim=None`` skips the PCA.
  """
  f = _checks.as_features(features, dtype=None)
  lab, c = _checks.as_class_labels(labels, f.shape[0])
  if gaussian_type not in ("spherical", "diagonal"):
    raise ValueError(f"gaussian_type: expected 'spherical' or 'diagonal', got {gaussian_type!r}")
  z = pca_transform(f, n_components=pca_dim) if pca_dim is not None else f.astype(np.float64)
  means, counts = _class_means(z, lab, c)
  sq = _one_hot(lab, c).T @ (z - means[lab]) ** 2
  var = np.maximum(sq / counts[:, None], 1e-4)                  # population variance, floored
  if gaussian_type == "spherical":
    var = var.mean(axis=1, keepdims=True)                       # (C, 1)
  avg = 0.5 * (var[:, None, :] + var[None, :, :])               # (C, C, d or 1)
  diff2 = (means[:, None, :] - means[None, :, :]) ** 2          # (C, C, d)
  first = np.sum(diff2 / avg, axis=-1) / 8.0
  logv = np.sum(np.log(var), axis=-1)
  second = np.sum(np.log(avg), axis=-1) - 0.5 * logv[:, None] - 0.5 * logv[None, :]
  bc = np.exp(-(first + 0.5 * second))
  return float(-np.sum(bc[~np.eye(c, dtype=bool)]))  # masked, not sum − trace: tiny BCs survive
