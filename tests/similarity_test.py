"""Tests for repsim_jax.similarity against closed forms, invariances and NumPy/SciPy references."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats

from repsim_jax import similarity as sim

# ----------------------------------------------------------------------------- NumPy references
# Plain float64 implementations written from the papers' formulas (Gram / covariance routes,
# i.e. a different computation from the library's feature-space / SVD-basis routes).


def np_center_gram(k, unbiased=False):
  k = k.copy()
  n = k.shape[0]
  if unbiased:
    np.fill_diagonal(k, 0)
    means = k.sum(0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    k -= means[:, None]
    k -= means[None, :]
    np.fill_diagonal(k, 0)
  else:
    h = np.eye(n) - np.ones((n, n)) / n
    k = h @ k @ h
  return k


def np_cka(k, l, unbiased=False):
  k, l = np_center_gram(k, unbiased), np_center_gram(l, unbiased)
  return (k * l).sum() / (np.linalg.norm(k) * np.linalg.norm(l))


def np_gram_rbf(x, threshold):
  d2 = scipy.spatial.distance.squareform(scipy.spatial.distance.pdist(x, "sqeuclidean"))
  return np.exp(-d2 / (2 * threshold**2 * np.median(d2)))


def np_hsic1(x, y):
  """Song et al. 2012 unbiased HSIC, written literally."""
  n = x.shape[0]
  k, l = x @ x.T, y @ y.T
  np.fill_diagonal(k, 0)
  np.fill_diagonal(l, 0)
  one = np.ones(n)
  return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
          - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def np_inv_sqrt(c):
  w, v = np.linalg.eigh(c)
  return (v / np.sqrt(w)) @ v.T


def np_cca(x, y):
  """Canonical correlations via covariance whitening; returns (rho, x-side weights)."""
  x, y = x - x.mean(0), y - y.mean(0)
  cxx, cyy, cxy = x.T @ x, y.T @ y, x.T @ y
  wx, wy = np_inv_sqrt(cxx), np_inv_sqrt(cyy)
  u, rho, _ = np.linalg.svd(wx @ cxy @ wy, full_matrices=False)
  return rho, wx @ u


def np_svcca(x, y, threshold=0.99):
  def reduce(a):
    a = a - a.mean(0)
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    frac = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.searchsorted(frac, threshold)) + 1
    return u[:, :k] * s[:k]

  rho, _ = np_cca(reduce(x), reduce(y))
  return rho.mean()


def np_pwcca(x, y):
  if y.shape[1] < x.shape[1]:
    x, y = y, x
  rho, w = np_cca(x, y)
  xc = x - x.mean(0)
  h = xc @ w
  h /= np.linalg.norm(h, axis=0)
  alpha = np.abs(h.T @ xc).sum(1)
  return (alpha * rho).sum() / alpha.sum()


def np_mutual_knn(x, y, k):
  n = x.shape[0]

  def neighbours(a, i):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    s = a @ a[i]
    order = [j for j in np.argsort(-s, kind="stable") if j != i]
    return set(order[:k])

  return np.mean([len(neighbours(x, i) & neighbours(y, i)) / k for i in range(n)])


def rand_orthogonal(rng, d):
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  return q * np.sign(np.diag(r))


def correlated_pair(rng, n, dx, dy, noise=1.0):
  x = rng.normal(size=(n, dx))
  y = np.tanh(x @ rng.normal(size=(dx, dy)) / np.sqrt(dx)) + noise * rng.normal(size=(n, dy))
  return x, y


# ----------------------------------------------------------------------------- CKA


def test_kornblith_reference_colab_values():
  np.random.seed(1337)
  x = np.random.randn(100, 10)
  y = np.random.randn(100, 10) + x
  with jax.enable_x64(True):
    assert sim.linear_cka(x, y).dtype == jnp.float64
    np.testing.assert_allclose(sim.linear_cka(x, y), 0.55761, atol=1e-5)
    np.testing.assert_allclose(sim.rbf_cka(x, y, threshold=0.5), 0.65483, atol=1e-5)
    np.testing.assert_allclose(sim.linear_cka(x, y, debiased=True), 0.51346, atol=1e-5)
  # Default float32 path agrees to float32 accuracy.
  assert sim.linear_cka(x, y).dtype == jnp.float32
  np.testing.assert_allclose(sim.linear_cka(x, y), 0.55761, atol=2e-5)
  np.testing.assert_allclose(sim.rbf_cka(x, y, threshold=0.5), 0.65483, atol=2e-5)


@pytest.mark.parametrize("n,dx,dy", [(60, 8, 12), (15, 40, 25)])
@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_forms_agree_with_numpy_gram_reference(n, dx, dy, debiased):
  x, y = correlated_pair(np.random.default_rng(n + dx), n, dx, dy)
  x = x + 3.0  # non-centred input
  ref = np_cka(x @ x.T, y @ y.T, debiased)
  with jax.enable_x64(True):
    feat = sim.linear_cka(x, y, debiased=debiased, form="feature")
    gram = sim.linear_cka(x, y, debiased=debiased, form="gram")
    auto = sim.linear_cka(x, y, debiased=debiased)
  np.testing.assert_allclose([feat, gram, auto], [ref] * 3, rtol=1e-10, atol=1e-12)
  # float32 default agrees with the float64 reference.
  np.testing.assert_allclose(sim.linear_cka(x, y, debiased=debiased), ref, atol=2e-5)


@pytest.mark.parametrize("debiased", [False, True])
def test_rbf_cka_matches_numpy_reference(debiased):
  x, y = correlated_pair(np.random.default_rng(7), 40, 6, 9)
  with jax.enable_x64(True):
    for threshold in (0.5, 2.0):  # traced argument: one compilation
      ref = np_cka(np_gram_rbf(x, threshold), np_gram_rbf(y, threshold), debiased)
      np.testing.assert_allclose(sim.rbf_cka(x, y, threshold, debiased=debiased), ref,
                                 rtol=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_invariances_and_identity(debiased):
  rng = np.random.default_rng(0)
  x, y = correlated_pair(rng, 50, 12, 7)
  q = rand_orthogonal(rng, 12)
  with jax.enable_x64(True):
    base = sim.linear_cka(x, y, debiased=debiased)
    np.testing.assert_allclose(sim.linear_cka(x @ q, y, debiased=debiased), base, rtol=1e-10)
    np.testing.assert_allclose(sim.linear_cka(7.5 * x - 2.0, 0.1 * y, debiased=debiased), base,
                               rtol=1e-10)
    np.testing.assert_allclose(sim.linear_cka(x, x, debiased=debiased), 1.0, rtol=1e-12)
    rbase = sim.rbf_cka(x, y, debiased=debiased)
    # RBF CKA: invariant to rotations and to isotropic scaling (bandwidth follows the median).
    np.testing.assert_allclose(sim.rbf_cka(3.0 * x @ q + 1.0, y, debiased=debiased), rbase,
                               rtol=1e-9)
    np.testing.assert_allclose(sim.rbf_cka(y, y, debiased=debiased), 1.0, rtol=1e-12)
  # Symmetric in its arguments.
  np.testing.assert_allclose(sim.linear_cka(x, y), sim.linear_cka(y, x), rtol=1e-6)


def test_dtypes():
  x, y = correlated_pair(np.random.default_rng(1), 20, 4, 4)
  assert sim.linear_cka(x, y).dtype == jnp.float32  # float64 input without x64 -> float32
  assert sim.linear_cka(x.astype(np.int32), y.astype(np.int32)).dtype == jnp.float32
  assert sim.linear_cka(jnp.asarray(x, jnp.bfloat16), y.astype(np.float32)).dtype == jnp.float32
  with jax.enable_x64(True):
    assert sim.procrustes_distance(x, y).dtype == jnp.float64
    assert sim.svcca(x, y).dtype == jnp.float64
    assert sim.rsa(x, y).dtype == jnp.float64


def test_input_errors_also_under_jit():
  x = np.ones((10, 3), np.float32)
  with pytest.raises(ValueError, match="same number of examples"):
    sim.linear_cka(x, np.ones((9, 3)))
  with pytest.raises(ValueError, match="same number of examples"):
    jax.jit(sim.procrustes_distance)(x, np.ones((9, 3)))
  with pytest.raises(ValueError, match="at least 4 examples"):
    jax.jit(lambda a, b: sim.linear_cka(a, b, debiased=True))(x[:3], x[:3])
  with pytest.raises(ValueError, match="2-D"):
    sim.cca_similarity(x[:, 0], x)
  with pytest.raises(ValueError, match="form"):
    sim.linear_cka(x, x, form="fast")
  with pytest.raises(ValueError, match="k must be"):
    sim.mutual_knn(x, x, k=10)
  with pytest.raises(ValueError, match="at least 4 examples"):
    sim.MinibatchCKA().update(x[:3], x[:3])
  with pytest.raises(ValueError, match="no batches"):
    sim.MinibatchCKA().result()


# ----------------------------------------------------------------------------- minibatch CKA


def test_unbiased_hsic_matches_song_formula():
  x, y = correlated_pair(np.random.default_rng(2), 25, 6, 30)
  x = x - 5.0
  with jax.enable_x64(True):
    for form in ("feature", "gram"):
      np.testing.assert_allclose(sim.unbiased_hsic(x, y, form=form), np_hsic1(x, y), rtol=1e-9)


def test_minibatch_cka_matches_reference_and_all_entry_points_agree():
  rng = np.random.default_rng(3)
  x, y = correlated_pair(rng, 8 * 16, 10, 6)
  xs, ys = x.reshape(8, 16, 10), y.reshape(8, 16, 6)
  h = np.array([[np_hsic1(a, b), np_hsic1(a, a), np_hsic1(b, b)] for a, b in zip(xs, ys)])
  ref = h[:, 0].mean() / np.sqrt(h[:, 1].mean() * h[:, 2].mean())
  with jax.enable_x64(True):
    stacked = sim.minibatch_cka(xs, ys)
    iterable = sim.minibatch_cka(list(xs), list(ys))
    acc = sim.MinibatchCKA()
    for a, b in zip(xs, ys):
      acc.update(a, b)
    np.testing.assert_allclose([stacked, iterable, acc.result()], [ref] * 3, rtol=1e-10)
    # One batch holding all data is exactly debiased linear CKA.
    np.testing.assert_allclose(sim.minibatch_cka(x[None], y[None]),
                               sim.linear_cka(x, y, debiased=True), rtol=1e-10)
  # The functional state form works inside jit + scan (float32 default).
  def run(xs, ys):
    state, _ = jax.lax.scan(lambda s, b: (sim.MinibatchCKA.update_state(s, *b), None),
                            sim.MinibatchCKA.init(), (xs, ys))
    return sim.MinibatchCKA.result_of(state)

  np.testing.assert_allclose(jax.jit(run)(xs.astype(np.float32), ys.astype(np.float32)), ref,
                             rtol=1e-4)


def test_minibatch_cka_converges_to_full_unbiased_value():
  rng = np.random.default_rng(4)
  n = 1200
  x, y = correlated_pair(rng, n, 16, 16, noise=0.7)
  with jax.enable_x64(True):
    full = float(sim.linear_cka(x, y, debiased=True))
    errs = [abs(float(sim.minibatch_cka(x.reshape(n // b, b, 16), y.reshape(n // b, b, 16)))
                - full) for b in (8, 40, 200, 600, 1200)]
  assert errs[-1] < 1e-12
  assert errs[-2] < errs[0]
  assert max(errs) < 0.05  # unbiased per batch: no systematic small-batch bias.
  # The *biased* CKA averaged per batch would be badly off at b=8; minibatch CKA is not.
  biased_small = np.mean([np_cka(a @ a.T, b @ b.T) for a, b in
                          zip(x.reshape(-1, 8, 16), y.reshape(-1, 8, 16))])
  assert abs(biased_small - full) > 5 * errs[0]


# ----------------------------------------------------------------------------- CCA family


def test_cca_svcca_pwcca_match_numpy():
  x, y = correlated_pair(np.random.default_rng(5), 200, 12, 9, noise=0.5)
  rho, _ = np_cca(x, y)
  with jax.enable_x64(True):
    np.testing.assert_allclose(sim.cca_similarity(x, y), np.mean(rho**2), rtol=1e-9)
    np.testing.assert_allclose(sim.pwcca(x, y), np_pwcca(x, y), rtol=1e-9)
    np.testing.assert_allclose(sim.pwcca(y, x), np_pwcca(x, y), rtol=1e-9)  # same side chosen
    # Low-rank-ish inputs so the 99% cut actually drops directions.
    scale = np.geomspace(1, 1e-3, 12)
    xs = x * scale
    for thr in (0.9, 0.99):
      np.testing.assert_allclose(sim.svcca(xs, y, threshold=thr), np_svcca(xs, y, thr),
                                 rtol=1e-9)
    np.testing.assert_allclose(sim.svcca(x, y, threshold=1.0), rho.mean(), rtol=1e-9)
  # float32 default path.
  np.testing.assert_allclose(sim.cca_similarity(x, y), np.mean(rho**2), atol=1e-5)
  np.testing.assert_allclose(sim.pwcca(x, y), np_pwcca(x, y), atol=1e-5)


def test_cca_invariant_to_invertible_maps_and_rank_deficiency():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(100, 8))
  a = rng.normal(size=(8, 8)) + 3 * np.eye(8)
  with jax.enable_x64(True):
    for f in (sim.cca_similarity, sim.svcca, sim.pwcca):
      np.testing.assert_allclose(f(x, x @ a + 1.0), 1.0, rtol=1e-9)
    # A duplicated column adds no direction: rank 8, not 9, and still perfect correlation.
    xd = np.concatenate([x, x[:, :1]], axis=1)
    np.testing.assert_allclose(sim.cca_similarity(xd, x), 1.0, rtol=1e-9)
    y = rng.normal(size=(100, 5))
    ref = np.mean(np_cca(x, y)[0] ** 2)
    np.testing.assert_allclose(sim.cca_similarity(xd, y), ref, rtol=1e-9)


# ----------------------------------------------------------------------------- Procrustes, RSA, kNN


@pytest.mark.parametrize("n,d", [(50, 10), (12, 30)])
def test_procrustes(n, d):
  rng = np.random.default_rng(n)
  x, y = correlated_pair(rng, n, d, d)
  q = rand_orthogonal(rng, d)
  with jax.enable_x64(True):
    np.testing.assert_allclose(sim.procrustes_distance(x, 4.0 * x @ q + 2.0), 0.0, atol=1e-12)
    xn = (x - x.mean(0)) / np.linalg.norm(x - x.mean(0))
    yn = (y - y.mean(0)) / np.linalg.norm(y - y.mean(0))
    r, _ = scipy.linalg.orthogonal_procrustes(xn, yn)
    np.testing.assert_allclose(sim.procrustes_distance(x, y), np.sum((xn @ r - yn) ** 2),
                               rtol=1e-9)
    # Unequal widths: the nuclear-norm definition.
    y2 = y[:, : d // 2]
    y2n = (y2 - y2.mean(0)) / np.linalg.norm(y2 - y2.mean(0))
    ref = 2 - 2 * np.linalg.svd(xn.T @ y2n, compute_uv=False).sum()
    np.testing.assert_allclose(sim.procrustes_distance(x, y2), ref, rtol=1e-9)
  assert abs(float(sim.procrustes_distance(x, x @ q))) < 1e-5


def test_rsa_matches_scipy_including_ties():
  rng = np.random.default_rng(8)
  x, y = correlated_pair(rng, 30, 6, 8)
  # Duplicate rows create exactly tied RDM entries, exercising average ranks.
  x[5] = x[3]
  x[7] = x[3]
  y[11] = y[2]
  def ref(a, b):
    return scipy.stats.spearmanr(scipy.spatial.distance.pdist(a, "correlation"),
                                 scipy.spatial.distance.pdist(b, "correlation")).statistic
  with jax.enable_x64(True):
    np.testing.assert_allclose(sim.rsa(x, y), ref(x, y), rtol=1e-9)
    np.testing.assert_allclose(sim.rsa(x, 3 * x + 1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(sim.rsa(x, y), ref(x, y), atol=1e-4)


def test_mutual_knn():
  rng = np.random.default_rng(9)
  x, y = correlated_pair(rng, 60, 8, 8, noise=0.8)
  assert float(sim.mutual_knn(x, x, k=5)) == 1.0
  # Cosine neighbours are invariant to rotation and per-row positive scaling.
  w = rng.uniform(0.5, 2.0, size=(60, 1))
  assert float(sim.mutual_knn(x, w * x @ rand_orthogonal(rng, 8), k=5)) == pytest.approx(1.0)
  for k in (1, 5, 10):
    assert float(sim.mutual_knn(x, y, k=k)) == pytest.approx(np_mutual_knn(x, y, k), abs=1e-6)


# ----------------------------------------------------------------------------- vmap / layer-wise


MEASURE_NAMES = sorted(sim.MEASURES)


@pytest.mark.parametrize("name", MEASURE_NAMES)
def test_vmap_over_layers_equals_per_layer_calls(name):
  rng = np.random.default_rng(10)
  xs = rng.normal(size=(3, 40, 6)).astype(np.float32)
  ys = (np.tanh(xs) + 0.5 * rng.normal(size=(3, 40, 6))).astype(np.float32)
  fn = sim.MEASURES[name]
  stacked = jax.vmap(fn)(xs, ys)
  single = np.array([fn(a, b) for a, b in zip(xs, ys)])
  np.testing.assert_allclose(stacked, single, rtol=2e-5, atol=2e-6)


def test_pool_features():
  rng = np.random.default_rng(11)
  conv = rng.normal(size=(4, 3, 5, 7))
  tokens = rng.normal(size=(4, 6, 8))
  flat = rng.normal(size=(4, 9))
  tol = dict(rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sim.pool_features(conv), conv.mean((1, 2)), **tol)
  np.testing.assert_allclose(sim.pool_features(tokens), tokens[:, 0], **tol)
  np.testing.assert_allclose(sim.pool_features(tokens, "token_mean"), tokens.mean(1), **tol)
  np.testing.assert_allclose(sim.pool_features(conv, "flatten"), conv.reshape(4, -1), **tol)
  np.testing.assert_allclose(sim.pool_features(flat, "flatten"), flat, **tol)
  with pytest.raises(ValueError, match="pool must be"):
    sim.pool_features(conv, "max")
  with pytest.raises(ValueError, match="rep must be"):
    sim.pool_features(rng.normal(size=(4,)))


def _fake_reps(rng, n=24):
  return {
      "stem": rng.normal(size=(n, 4, 4, 8)),
      "block1": rng.normal(size=(n, 4, 4, 8)),
      "block2": rng.normal(size=(n, 2, 2, 16)),
      "tokens": rng.normal(size=(n, 5, 16)),
      "pre_logits": rng.normal(size=(n, 8)),
  }


def test_layerwise_similarity_groups_and_matches_per_layer():
  rng = np.random.default_rng(12)
  reps_a = _fake_reps(rng)
  reps_b = {k: v + 0.5 * rng.normal(size=v.shape) for k, v in reps_a.items()}
  traces = []

  def counting_cka(x, y):
    traces.append(x.shape)  # runs once per trace, i.e. once per vmapped group
    return sim.linear_cka(x, y)

  out = sim.layerwise_similarity(reps_a, reps_b, measure=counting_cka)
  assert list(out) == list(reps_a)
  # Pooled (24, 8) for stem, block1, pre_logits; (24, 16) for block2 and tokens (CLS).
  assert len(traces) == 2
  for k in reps_a:
    ref = sim.linear_cka(sim.pool_features(reps_a[k]), sim.pool_features(reps_b[k]))
    np.testing.assert_allclose(out[k], ref, rtol=1e-5)
  with pytest.raises(ValueError, match="same layer names"):
    sim.layerwise_similarity(reps_a, {"stem": reps_b["stem"]})
  with pytest.raises(ValueError, match="measure must be"):
    sim.layerwise_similarity(reps_a, reps_b, measure="cosine")


def test_cross_layer_similarity_matches_pairwise_calls():
  rng = np.random.default_rng(13)
  reps_a = _fake_reps(rng)
  reps_b = {k: v for k, v in _fake_reps(rng).items() if k != "stem"}
  reps_b["pre_logits"] = reps_a["pre_logits"] @ rand_orthogonal(rng, 8)
  names_a, names_b, m = sim.cross_layer_similarity(reps_a, reps_b, measure="linear_cka")
  assert names_a == list(reps_a) and names_b == list(reps_b)
  assert m.shape == (5, 4)
  ref = np.array([[sim.linear_cka(sim.pool_features(reps_a[a]), sim.pool_features(reps_b[b]))
                   for b in names_b] for a in names_a])
  np.testing.assert_allclose(m, ref, rtol=1e-5)
  np.testing.assert_allclose(m[names_a.index("pre_logits"), names_b.index("pre_logits")], 1.0,
                             rtol=1e-5)


def test_similarity_table_and_heatmap(tmp_path):
  rng = np.random.default_rng(14)
  reps_a = {k: v for k, v in _fake_reps(rng).items() if k in ("stem", "block1", "tokens")}
  reps_b = {k: v + rng.normal(size=v.shape) for k, v in reps_a.items()}
  lin = sim.layerwise_similarity(reps_a, reps_b)
  proc = sim.layerwise_similarity(reps_a, reps_b, measure="procrustes_distance")
  path = tmp_path / "out" / "sim.csv"
  df = sim.similarity_table({"linear_cka": lin, "procrustes_distance": proc}, path=path)
  back = pd.read_csv(path, index_col="layer")
  assert list(back.index) == list(reps_a)
  np.testing.assert_allclose(back["linear_cka"], [float(lin[k]) for k in reps_a], rtol=1e-6)
  np.testing.assert_allclose(back.values, df.values, rtol=1e-6)
  single = sim.similarity_table(lin)
  np.testing.assert_allclose(single["similarity"], [float(lin[k]) for k in reps_a], rtol=1e-6)

  names_a, names_b, m = sim.cross_layer_similarity(reps_a, reps_b)
  cross = sim.similarity_table((names_a, names_b, m), path=tmp_path / "cross.csv")
  np.testing.assert_allclose(pd.read_csv(tmp_path / "cross.csv", index_col=0).values,
                             np.asarray(m), rtol=1e-6)
  assert list(cross.columns) == names_b

  png = tmp_path / "heat.png"
  assert sim.plot_heatmap(m, names_a, names_b, png, title="CKA") == str(png)
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(tmp_path)) == ["cross.csv", "heat.png", "out"]  # no temp leftovers
  with pytest.raises(ValueError, match="does not match"):
    sim.plot_heatmap(m, names_a[:-1], names_b, tmp_path / "bad.png")
