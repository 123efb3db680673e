"""Tests of repsim_jax.transferability scores against closed forms and plain NumPy references."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from repsim_jax import transferability as T


def _blobs(n=300, d=12, c=3, sep=1.0, seed=0):
  rng = np.random.default_rng(seed)
  y = np.concatenate([np.arange(c), rng.integers(0, c, n - c)])
  mu = rng.standard_normal((c, d)) * sep
  return mu[y] + rng.standard_normal((n, d)), y


# ----------------------------------------------------------------------------- LogME

def _logme_reference(f, y_cols):
  """Per-column loop of the authors' fast fixed-point LogME, via a thin SVD of f."""
  f = np.asarray(f, np.float64)
  n, d = f.shape
  u, s, vh = np.linalg.svd(f, full_matrices=False)
  keep = s > 1e-10
  u, s = u[:, keep], s[keep]
  sigma = s ** 2
  out = []
  for col in y_cols.T:
    x = u.T @ col
    x2 = x ** 2
    res_x2 = col @ col - x2.sum()
    alpha, beta = 1.0, 1.0
    for _ in range(11):
      t = alpha / beta
      gamma = np.sum(sigma / (sigma + t))
      m2 = np.sum(sigma * x2 / (t + sigma) ** 2)
      res2 = np.sum(x2 / (1 + sigma / t) ** 2) + res_x2
      alpha = gamma / (m2 + 1e-5)
      beta = (n - gamma) / (res2 + 1e-5)
      if abs(alpha / beta - t) / t <= 1e-3:
        break
    ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * sigma))
          - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)) / n
    out.append(ev)
  return np.array(out)


@pytest.mark.parametrize("n,d", [(200, 15), (40, 60)])
def test_logme_matches_reference_loop(n, d):
  f, y = _blobs(n=n, d=d, c=4, sep=0.7, seed=1)
  onehot = np.eye(4)[y]
  ref = _logme_reference(f, onehot)
  np.testing.assert_allclose(T.logme(f, y), ref.mean(), rtol=1e-8)
  got = T.logme_fixed_point(f, onehot)["evidence"]
  np.testing.assert_allclose(got, ref, rtol=1e-8)


def test_logme_fixed_point_satisfies_stationarity():
  f, y = _blobs(n=250, d=10, c=3, sep=0.8, seed=2)
  yc = np.eye(3)[y]
  out = T.logme_fixed_point(f, yc, max_iter=1000, tol=1e-13)
  ftf = f.T @ f
  sig = np.linalg.eigvalsh(ftf)
  n = f.shape[0]
  for k in range(3):
    a, b = out["alpha"][k], out["beta"][k]
    m = np.linalg.solve(ftf + (a / b) * np.eye(f.shape[1]), f.T @ yc[:, k])  # posterior mean
    np.testing.assert_allclose(out["m"][:, k], m, rtol=1e-8, atol=1e-12)
    gamma = np.sum(b * sig / (a + b * sig))
    # α = γ / mᵀm and β = (n − γ)/‖y − Φm‖² (with the authors' 1e-5 guards in the denominators)
    np.testing.assert_allclose(a * (m @ m + 1e-5), gamma, rtol=1e-8)
    r = yc[:, k] - f @ m
    np.testing.assert_allclose(b * (r @ r + 1e-5), n - gamma, rtol=1e-8)


def test_logme_fixed_point_maximises_evidence():
  f, y = _blobs(n=150, d=8, c=2, sep=0.8, seed=3)
  t = (y == 1).astype(float)
  out = T.logme_fixed_point(f, t[:, None], max_iter=1000, tol=1e-13)
  n, d = f.shape

  def log_evidence(a, b):  # direct formula with an explicit log-determinant
    amat = a * np.eye(d) + b * f.T @ f
    m = b * np.linalg.solve(amat, f.T @ t)
    return (d / 2 * np.log(a) + n / 2 * np.log(b) - 0.5 * np.linalg.slogdet(amat)[1]
            - b / 2 * np.sum((t - f @ m) ** 2) - a / 2 * m @ m - n / 2 * np.log(2 * np.pi))

  a0, b0 = out["alpha"][0], out["beta"][0]
  best = log_evidence(a0, b0)
  for da, db in itertools.product([0.9, 1.0, 1.1], repeat=2):
    if (da, db) != (1.0, 1.0):
      assert log_evidence(a0 * da, b0 * db) < best
  # The reported evidence is this maximum / n (up to the 1e-5 guards and the final half step).
  np.testing.assert_allclose(out["evidence"][0], best / n, rtol=1e-6)


def test_logme_multilabel_is_regression_on_columns():
  f, _ = _blobs(n=120, d=9, c=2, seed=4)
  rng = np.random.default_rng(4)
  multi = (rng.random((120, 3)) < 0.4).astype(np.int32)
  np.testing.assert_allclose(T.logme(f, multi, multilabel=True), _logme_reference(f, multi.astype(float)).mean(),
                             rtol=1e-8)
  with pytest.raises(ValueError, match="labels"):
    T.logme(f, np.full((120, 3), 2), multilabel=True)


def test_logme_float32_features_close_to_float64():
  f, y = _blobs(n=500, d=64, c=5, seed=5)
  np.testing.assert_allclose(T.logme(f.astype(np.float32), y), T.logme(f, y), rtol=1e-4)


# ----------------------------------------------------------------------------- LEEP / NCE

def _leep_by_hand(probs, y):
  n, z = probs.shape
  c = y.max() + 1
  joint = np.zeros((z, c))
  for i in range(n):
    for zz in range(z):
      joint[zz, y[i]] += probs[i, zz] / n
  cond = joint / joint.sum(axis=1, keepdims=True)
  total = 0.0
  for i in range(n):
    total += np.log(sum(cond[zz, y[i]] * probs[i, zz] for zz in range(z)))
  return total / n


def test_leep_matches_hand_computation():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((80, 6)) * 2
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  y = np.concatenate([np.arange(3), rng.integers(0, 3, 77)])
  np.testing.assert_allclose(T.leep(probs, y), _leep_by_hand(probs, y), rtol=1e-5)


def test_leep_with_hard_predictions_equals_nce():
  rng = np.random.default_rng(1)
  z = rng.integers(0, 5, 200)
  y = np.concatenate([np.arange(4), rng.integers(0, 4, 196)])
  probs = np.eye(5)[z]
  np.testing.assert_allclose(T.leep(probs, y), T.nce(z, y), rtol=1e-5)


def _nce_by_hand(z, y):
  n = len(y)
  total = 0.0
  for zz in np.unique(z):
    for yy in np.unique(y):
      pzy = np.sum((z == zz) & (y == yy)) / n
      if pzy > 0:
        total += pzy * np.log(pzy / (np.sum(z == zz) / n))
  return total


def test_nce_closed_forms_and_reference():
  rng = np.random.default_rng(2)
  z = rng.integers(0, 10, 500)
  # Target a function of the source label: H(Y|Z) = 0.
  assert T.nce(z, z % 3) == pytest.approx(0.0, abs=1e-12)
  # Constant source: NCE = −H(Y).
  y = np.concatenate([np.arange(4), rng.integers(0, 4, 496)])
  py = np.bincount(y) / len(y)
  assert T.nce(np.zeros(500, int), y) == pytest.approx(np.sum(py * np.log(py)), rel=1e-12)
  np.testing.assert_allclose(T.nce(z, y), _nce_by_hand(z, y), rtol=1e-12)


# ----------------------------------------------------------------------------- NLEEP / GMM

def test_pca_variance_rule_matches_svd():
  f, _ = _blobs(n=200, d=30, c=3, seed=6)
  f = f * np.linspace(0.2, 3, 30)
  fc = f - f.mean(0)
  _, s, vt = np.linalg.svd(fc, full_matrices=False)
  ratio = np.cumsum(s ** 2) / np.sum(s ** 2)
  k = int(np.argmax(ratio >= 0.8)) + 1  # fewest components reaching 80%
  z = T.pca_transform(f, variance=0.8)
  assert z.shape == (200, k)
  np.testing.assert_allclose(np.abs(z), np.abs(fc @ vt[:k].T), rtol=1e-7, atol=1e-9)
  # n < d path (Gram eigenvectors).
  z2 = T.pca_transform(f[:20], n_components=5)
  fc2 = f[:20] - f[:20].mean(0)
  _, _, vt2 = np.linalg.svd(fc2, full_matrices=False)
  np.testing.assert_allclose(np.abs(z2), np.abs(fc2 @ vt2[:5].T), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_gmm_posteriors_are_an_em_fixed_point(cov_type):
  rng = np.random.default_rng(7)
  centres = np.array([[0, 0], [4, 0], [0, 4.0]])
  x = np.concatenate([c + rng.standard_normal((100, 2)) * [0.7, 1.2] for c in centres])
  post = T.gaussian_mixture_posteriors(x, 3, covariance_type=cov_type, seed=0, tol=1e-14, max_iter=3000)
  # Independent M-step + E-step with scipy densities must reproduce the posteriors.
  nk = post.sum(0)
  dens = []
  for k in range(3):
    mu = post[:, k] @ x / nk[k]
    cov = ((post[:, k, None] * (x - mu)).T @ (x - mu)) / nk[k] + 1e-6 * np.eye(2)
    if cov_type == "diag":
      cov = np.diag(np.diag(cov))
    dens.append(nk[k] / len(x) * scipy.stats.multivariate_normal(mu, cov).pdf(x))
  dens = np.stack(dens, 1)
  np.testing.assert_allclose(post, dens / dens.sum(1, keepdims=True), atol=1e-6)
  # The three clusters are recovered (one component each).
  assign = post.argmax(1).reshape(3, 100)
  assert len({np.bincount(a).argmax() for a in assign}) == 3


def test_nleep_closed_form_and_composition():
  # Perfectly separated classes: every component is pure, P(y|z) = 1, NLEEP = log 1 = 0.
  f, y = _blobs(n=240, d=10, c=3, sep=40.0, seed=8)
  assert T.nleep(f, y, seed=0) == pytest.approx(0.0, abs=1e-5)
  # Overlapping classes: NLEEP = LEEP on the mixture posteriors of the 80%-variance PCA.
  f, y = _blobs(n=240, d=10, c=3, sep=0.6, seed=8)
  post = T.gaussian_mixture_posteriors(T.pca_transform(f, variance=0.8), 15, seed=3)
  np.testing.assert_allclose(T.nleep(f, y, seed=3), _leep_by_hand(post, y), rtol=1e-4)
  assert T.nleep(f, y, seed=3) < -0.05


# ----------------------------------------------------------------------------- H-scores

def _hscore_reference(f, y, covf=None, factor=1.0):
  def cov(x):
    xm = x - x.mean(0, keepdims=True)
    return xm.T @ xm / (len(x) - 1)
  g = np.zeros_like(f)
  for c in range(y.max() + 1):
    g[y == c] = f[y == c].mean(0)
  covf = cov(f) if covf is None else covf
  return np.trace(np.linalg.pinv(covf, rcond=1e-15) @ (factor * cov(g)))


def _ledoit_wolf_reference(x):
  """Direct Ledoit-Wolf (2004) formula on centred x, scikit-learn's normalisation."""
  x = x - x.mean(0)
  n, p = x.shape
  s = x.T @ x / n
  mu = np.trace(s) / p
  m = mu * np.eye(p)
  d2 = np.linalg.norm(s - m, "fro") ** 2 / p
  b2_bar = sum(np.linalg.norm(np.outer(xi, xi) - s, "fro") ** 2 for xi in x) / n ** 2 / p
  b2 = min(b2_bar, d2)
  shrink = b2 / d2
  return shrink * m + (1 - shrink) * s, shrink


def test_h_score_reference_and_linear_invariance():
  f, y = _blobs(n=300, d=8, c=4, sep=0.8, seed=9)
  h = T.h_score(f, y)
  np.testing.assert_allclose(h, _hscore_reference(f, y), rtol=1e-9)
  a = np.random.default_rng(9).standard_normal((8, 8)) + 3 * np.eye(8)  # invertible
  np.testing.assert_allclose(T.h_score(f @ a + 5.0, y), h, rtol=1e-7)
  # Rank-deficient covariance (n < d): pseudo-inverse semantics, and a warning that it is so.
  f2, y2 = _blobs(n=12, d=20, c=3, seed=10)
  with pytest.warns(RuntimeWarning, match="n <= d"):
    np.testing.assert_allclose(T.h_score(f2, y2), _hscore_reference(f2, y2), rtol=1e-6)


def test_ledoit_wolf_matches_direct_formula():
  rng = np.random.default_rng(11)
  x = rng.standard_normal((60, 15)) @ rng.standard_normal((15, 15)) + 2.0
  cov, shrink = T.ledoit_wolf(x)
  ref_cov, ref_shrink = _ledoit_wolf_reference(x)
  assert 0 < shrink < 1
  np.testing.assert_allclose(shrink, ref_shrink, rtol=1e-10)
  np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-12)
  try:
    from sklearn.covariance import ledoit_wolf as sk_lw
  except ImportError:
    return  # scikit-learn is optional; the direct formula above is the reference
  sk_cov, sk_shrink = sk_lw(x)
  np.testing.assert_allclose(shrink, sk_shrink, rtol=1e-10)
  np.testing.assert_allclose(cov, sk_cov, rtol=1e-10, atol=1e-12)


def test_regularized_h_score_matches_reference():
  for n, d in [(300, 10), (30, 50)]:
    f, y = _blobs(n=n, d=d, c=3, sep=0.9, seed=12)
    fc = f - f.mean(0)
    cov, shrink = _ledoit_wolf_reference(fc)
    ref = _hscore_reference(fc, y, covf=cov, factor=1 - shrink)
    np.testing.assert_allclose(T.regularized_h_score(f, y), ref, rtol=1e-8)


# ----------------------------------------------------------------------------- TransRate

def _transrate_reference(f, y, eps=1e-4):
  def rate(z):
    n, d = z.shape
    return 0.5 * np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))[1]
  z = f - f.mean(0)
  return rate(z) - np.mean([rate(z[y == c]) for c in range(y.max() + 1)])


@pytest.mark.parametrize("n,d", [(400, 12), (60, 30)])
def test_transrate_matches_direct_formula(n, d):
  f, y = _blobs(n=n, d=d, c=3, sep=0.8, seed=13)
  np.testing.assert_allclose(T.transrate(f, y), _transrate_reference(f, y), rtol=1e-9)
  np.testing.assert_allclose(T.transrate(f, y, eps=0.5), _transrate_reference(f, y, 0.5), rtol=1e-9)


# ----------------------------------------------------------------------------- GBC

def _gbc_reference(f, y, kind):
  stats = []
  for c in range(y.max() + 1):
    fc = f[y == c]
    stats.append((fc.mean(0), np.maximum(fc.var(0), 1e-4)))
  total = 0.0
  for i, j in itertools.permutations(range(len(stats)), 2):
    (m1, v1), (m2, v2) = stats[i], stats[j]
    if kind == "spherical":
      v1, v2 = np.mean(v1), np.mean(v2)
    avg = (v1 + v2) / 2
    db = np.sum((m1 - m2) ** 2 / avg) / 8 + 0.5 * (np.sum(np.log(avg)) - 0.5 * np.sum(np.log(v1))
                                                   - 0.5 * np.sum(np.log(v2)))
    total += np.exp(-db)
  return -total


def test_gbc_closed_forms():
  rng = np.random.default_rng(14)
  x = rng.standard_normal((100, 5))
  for kind in ["spherical", "diagonal"]:
    # Identical class distributions: D_B = 0, BC = 1 for each of the C(C-1) ordered pairs.
    same = np.concatenate([x, x, x])
    y = np.repeat([0, 1, 2], 100)
    assert T.gbc(same, y, gaussian_type=kind, pca_dim=None) == pytest.approx(-6.0, rel=1e-12)
    # Shifted copies (equal variances): D_B = ⅛ Σ shift² / v, so GBC = −2 exp(−D_B) ...
    for shift, lo in [(3.0, 1e-4), (30.0, 0.0)]:
      far = np.concatenate([x, x + shift])
      y2 = np.repeat([0, 1], 100)
      v = np.mean(x.var(0)) if kind == "spherical" else x.var(0)
      expected = -2 * np.exp(-np.sum(shift ** 2 / v * np.ones(5)) / 8)
      got = T.gbc(far, y2, gaussian_type=kind, pca_dim=None)
      assert got == pytest.approx(expected, rel=1e-10)
      assert -got > lo  # ... -> 0 for well-separated classes (1e-260 at shift 30)


@pytest.mark.parametrize("kind", ["spherical", "diagonal"])
def test_gbc_matches_reference_with_pca(kind):
  f, y = _blobs(n=300, d=20, c=4, sep=0.5, seed=15)
  np.testing.assert_allclose(T.gbc(f, y, gaussian_type=kind, pca_dim=None), _gbc_reference(f, y, kind), rtol=1e-10)
  fc = f - f.mean(0)
  _, _, vt = np.linalg.svd(fc, full_matrices=False)
  z = fc @ vt[:6].T  # PCA signs are irrelevant to GBC
  np.testing.assert_allclose(T.gbc(f, y, gaussian_type=kind, pca_dim=6), _gbc_reference(z, y, kind), rtol=1e-7)


# ----------------------------------------------------------------------------- validation

_F, _Y = _blobs(n=40, d=6, c=3, seed=16)
_SCORES = {
    "logme": lambda f, y: T.logme(f, y),
    "nleep": lambda f, y: T.nleep(f, y, seed=0),
    "h_score": T.h_score,
    "regularized_h_score": T.regularized_h_score,
    "gbc": T.gbc,
    "transrate": T.transrate,
    "lp_score": lambda f, y: T.lp_score(f, y, steps=1),
}


@pytest.mark.parametrize("name", sorted(_SCORES))
def test_scores_reject_meaningless_inputs(name):
  fn = _SCORES[name]
  with pytest.raises(ValueError, match="only one class"):
    fn(_F, np.zeros(40, int))
  with pytest.raises(ValueError, match=r"0\.\.|missing"):
    fn(_F, np.where(_Y == 1, 3, _Y))  # class 1 absent: labels not 0..C-1
  with pytest.raises(ValueError, match="negative"):
    fn(_F, _Y - 1)
  with pytest.raises(ValueError, match="examples but"):
    fn(_F[:3], np.array([0, 1, 5]))
  bad = _F.copy()
  bad[3, 2] = np.nan
  with pytest.raises(ValueError, match="features.*NaN"):
    fn(bad, _Y)
  with pytest.raises(ValueError, match="length"):
    fn(_F, _Y[:-1])


def test_leep_nce_reject_meaningless_inputs():
  probs = np.full((10, 4), 0.25)
  with pytest.raises(ValueError, match="only one class"):
    T.leep(probs, np.zeros(10, int))
  with pytest.raises(ValueError, match="sum"):
    T.leep(probs * 2, np.arange(10) % 2)
  with pytest.raises(ValueError, match="length"):
    T.nce(np.zeros(9, int), np.arange(10) % 2)
  with pytest.raises(ValueError, match="non-integer"):
    T.nce(np.zeros(10) + 0.5, np.arange(10) % 2)


# ----------------------------------------------------------------------------- LP

def test_knn_true_class_probability_matches_brute_force():
  rng = np.random.default_rng(17)
  z = rng.standard_normal((130, 4))
  y = rng.integers(0, 3, 130)
  d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
  for include_self in [True, False]:
    dd = d2.copy()
    np.fill_diagonal(dd, -1.0 if include_self else np.inf)
    nbr = np.argsort(dd, axis=1, kind="stable")[:, :5]
    ref = (y[nbr] == y[:, None]).mean(1)
    got = T.knn_true_class_probability(z, y, k=5, include_self=include_self, block=50)
    np.testing.assert_allclose(got, ref, atol=1e-7)


def test_nca_objective_matches_loop_and_training_improves_it():
  rng = np.random.default_rng(18)
  z = rng.standard_normal((40, 5)).astype(np.float32)
  y = (z[:, 0] + 0.3 * rng.standard_normal(40) > 0).astype(int)
  a = rng.standard_normal((5, 2)).astype(np.float32) * 0.5
  e = z @ a
  ref = 0.0
  for i in range(40):
    w = np.array([np.exp(-np.sum((e[i] - e[j]) ** 2)) if j != i else 0.0 for j in range(40)])
    ref += w[y == y[i]].sum() / w.sum()
  np.testing.assert_allclose(float(T.nca_objective(jnp.asarray(a), jnp.asarray(z), jnp.asarray(y))), ref / 40,
                             rtol=1e-5)
  a_fit = T.nca_fit(z, y, n_components=2, steps=150, learning_rate=0.05)
  before = float(T.nca_objective(jnp.eye(5, 2), jnp.asarray(z), jnp.asarray(y)))
  after = float(T.nca_objective(jnp.asarray(a_fit), jnp.asarray(z), jnp.asarray(y)))
  assert after > before + 0.02


def test_lp_score_closed_form_and_composition():
  f, y = _blobs(n=90, d=8, c=3, sep=50.0, seed=19)
  assert T.lp_score(f, y, steps=5) == pytest.approx(1.0)  # all 5 neighbours share the class
  f, y = _blobs(n=90, d=8, c=3, sep=0.5, seed=19)
  z = T.pca_transform(f, n_components=8).astype(np.float32)
  a = T.nca_fit(z, y, n_components=4, steps=20, seed=1)
  expected = np.mean(T.knn_true_class_probability(z @ a, y, k=5))
  assert T.lp_score(f, y, n_components=4, steps=20, seed=1) == pytest.approx(expected, abs=1e-6)
  assert 0.2 < expected < 1.0


# ----------------------------------------------------------------------------- FU

class _TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="Conv_0")(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, name="Conv_1")(x))
    pre = x.mean(axis=(1, 2))
    return nn.Dense(3, name="head")(pre), {"pre_logits": pre}


def _triplet_loss_loop(emb, y, margin):
  emb = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
  terms = []
  for a, p, q in itertools.product(range(len(y)), repeat=3):
    if y[a] == y[p] and a != p and y[q] != y[a]:
      terms.append(jnp.maximum(jnp.linalg.norm(emb[a] - emb[p]) - jnp.linalg.norm(emb[a] - emb[q]) + margin, 0.0))
  terms = jnp.stack(terms)
  return jnp.sum(terms) / jnp.maximum(jnp.sum(terms > 0), 1)


def test_triplet_margin_loss_matches_loop():
  rng = np.random.default_rng(20)
  emb = rng.standard_normal((7, 3))
  y = np.array([0, 0, 1, 1, 2, 0, 1])
  e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  for margin in [0.05, 1.0]:
    terms = [max(np.linalg.norm(e[a] - e[p]) - np.linalg.norm(e[a] - e[q]) + margin, 0.0)
             for a, p, q in itertools.product(range(7), repeat=3) if y[a] == y[p] and a != p and y[q] != y[a]]
    ref = sum(terms) / max(sum(t > 0 for t in terms), 1)
    np.testing.assert_allclose(float(T.triplet_margin_loss(jnp.asarray(emb), jnp.asarray(y), margin)), ref,
                               rtol=1e-5)


def test_fu_score_matches_second_computation():
  model = _TinyCNN()
  rng = np.random.default_rng(21)
  images = rng.standard_normal((12, 8, 8, 2)).astype(np.float32)
  labels = np.array([0, 1, 2] * 4)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(images[:1]))

  def apply_fn(p, x):
    return model.apply(p, x)

  got = T.fu_score(apply_fn, params, images, labels, early_layer="Conv_1", first_layer="params/Conv_0",
                   batch_size=6, seed=3, margin=0.05)
  order = np.random.default_rng(3).permutation(12)
  early, first = [], []
  for b in range(2):
    idx = order[6 * b: 6 * b + 6]

    def loss(p):
      return _triplet_loss_loop(model.apply(p, jnp.asarray(images[idx]))[1]["pre_logits"], labels[idx], 0.05)

    g = jax.jit(jax.grad(loss))(params)["params"]
    early.append(np.sqrt(sum(np.sum(np.square(v)) for v in g["Conv_1"].values())))
    first.append(np.sqrt(sum(np.sum(np.square(v)) for v in g["Conv_0"].values())))
  assert got == pytest.approx(np.mean(early) / np.mean(first), rel=1e-4)
  assert got > 0
  with pytest.raises(ValueError, match="early_layer"):
    T.fu_score(apply_fn, params, images, labels, early_layer="Conv_9", first_layer="Conv_0")
  res = T.lp_fu(apply_fn, params, images, labels, early_layer="Conv_1", first_layer="Conv_0", batch_size=6,
                seed=3, steps=3)
  assert res["fu"] == pytest.approx(got, rel=1e-6)
  assert 0.0 < res["lp"] <= 1.0
