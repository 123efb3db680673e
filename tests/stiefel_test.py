"""Tests for repsim_jax.optim.stiefel: tangent projection, retractions and the optax transforms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from repsim_jax.optim import stiefel as st

METHODS = st.RETRACTIONS


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _rand_stiefel(rng: np.random.Generator, n: int, p: int, batch=()) -> np.ndarray:
  q, r = np.linalg.qr(rng.standard_normal(batch + (n, p)))
  return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def _np_project(q, g):
  qtg = q.T @ g
  return g - q @ (qtg + qtg.T) / 2


def _np_orth_err(q):
  return np.linalg.norm(q.T @ q - np.eye(q.shape[1]))


# ----------------------------------------------------------------------------- projection


@pytest.mark.parametrize("n,p", [(7, 4), (5, 5)])  # square Q takes the (G − Q Gᵀ Q)/2 form
def test_project_tangent_is_tangent_idempotent_and_matches_numpy(x64, n, p):
  rng = np.random.default_rng(0)
  q = _rand_stiefel(rng, n, p)
  g = rng.standard_normal((n, p))
  v = np.asarray(st.project_tangent(jnp.asarray(q), jnp.asarray(g)))
  np.testing.assert_allclose(v, _np_project(q, g), atol=1e-13)
  np.testing.assert_allclose(q.T @ v + v.T @ q, 0.0, atol=1e-13)  # tangency
  v2 = np.asarray(st.project_tangent(q, v))
  np.testing.assert_allclose(v2, v, atol=1e-13)  # idempotent
  # The normal space at Q is {Q S : S symmetric}; it projects to zero.
  s = rng.standard_normal((p, p))
  np.testing.assert_allclose(st.project_tangent(q, q @ (s + s.T)), 0.0, atol=1e-12)
  # Orthogonal projection: the residual G − V is orthogonal to every tangent vector.
  w = _np_project(q, rng.standard_normal((n, p)))
  assert abs(np.sum((g - v) * w)) < 1e-12


def test_project_tangent_batched_equals_looped(x64):
  rng = np.random.default_rng(1)
  q = _rand_stiefel(rng, 6, 3, batch=(2, 3))
  g = rng.standard_normal((2, 3, 6, 3))
  batched = np.asarray(st.project_tangent(q, g))
  for i in range(2):
    for j in range(3):
      np.testing.assert_allclose(batched[i, j], _np_project(q[i, j], g[i, j]), atol=1e-13)


# ----------------------------------------------------------------------------- retractions


def _np_retract(q, v, method):
  m = q + v
  if method == "qr":
    qq, r = np.linalg.qr(m)
    return qq * np.where(np.diag(r) < 0, -1.0, 1.0)
  if method == "polar":
    return scipy.linalg.polar(m)[0]  # the unitary factor U of m = U H
  n = q.shape[0]
  pmat = np.eye(n) - 0.5 * q @ q.T
  w = pmat @ v @ q.T - q @ v.T @ pmat
  return np.linalg.solve(np.eye(n) - w / 2, (np.eye(n) + w / 2) @ q)


# (n, p): tall with 2p < n (Cayley low-rank path), tall with 2p >= n and square (dense path).
SHAPES = [(9, 3), (7, 5), (5, 5)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_retract_matches_numpy_reference_and_lands_on_manifold(x64, method, shape):
  rng = np.random.default_rng(2)
  q = _rand_stiefel(rng, *shape)
  v = 0.7 * _np_project(q, rng.standard_normal(shape))
  y = np.asarray(st.retract(jnp.asarray(q), jnp.asarray(v), method))
  assert y.dtype == np.float64
  assert _np_orth_err(y) <= 1e-12
  np.testing.assert_allclose(y, _np_retract(q, v, method), atol=1e-11)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_retract_zero_step_is_identity_and_first_order(x64, method, shape):
  rng = np.random.default_rng(3)
  q = _rand_stiefel(rng, *shape)
  np.testing.assert_allclose(st.retract(q, np.zeros_like(q), method), q, atol=1e-13)
  # dR_Q(tV)/dt at t=0 is V (central differences, error O(h²)).
  v = _np_project(q, rng.standard_normal(shape))
  h = 1e-5
  deriv = (np.asarray(st.retract(q, h * v, method)) - np.asarray(st.retract(q, -h * v, method)))
  np.testing.assert_allclose(deriv / (2 * h), v, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_retract_batched_equals_looped(x64, method):
  rng = np.random.default_rng(4)
  q = _rand_stiefel(rng, 6, 2, batch=(3, 2))
  v = 0.5 * rng.standard_normal((3, 2, 6, 2))
  batched = np.asarray(st.retract(q, v, method))
  looped = np.stack([
      np.stack([np.asarray(st.retract(q[i, j], v[i, j], method)) for j in range(2)])
      for i in range(3)
  ])
  np.testing.assert_allclose(batched, looped, atol=1e-13)
  # vmap agrees too (jit/vmap-friendliness).
  vmapped = jax.jit(jax.vmap(jax.vmap(lambda a, b: st.retract(a, b, method))))(q, v)
  np.testing.assert_allclose(vmapped, looped, atol=1e-13)
  assert np.all(np.asarray(st.orthogonality_error(batched)) <= 1e-12)


def test_qr_retraction_of_a_rank_deficient_step_falls_back_to_householder(x64):
  # V = −Q zeroes a column of Q + V: Cholesky-QR fails there, Householder QR still gives a point
  # on the manifold equal to the signed Q-factor.
  q = jnp.asarray(_rand_stiefel(np.random.default_rng(9), 6, 3))
  v = jnp.zeros_like(q).at[:, 1].set(-q[:, 1])
  y = st.retract(q, v, "qr")
  assert np.all(np.isfinite(y))
  assert float(st.orthogonality_error(y)) <= 1e-12
  np.testing.assert_allclose(y[:, 0], q[:, 0], atol=1e-12)


@pytest.mark.parametrize("scale", [0.0, 1e-4, 1e-2, 0.1, 0.3, 0.6, 3.0])
def test_polar_retraction_equals_scipy_polar_for_any_step_size(x64, scale):
  # ‖MᵀM − I‖_F = ‖VᵀV‖_F runs from 0 (no Newton–Schulz step needed beyond the first) through
  # several steps up to ≥ ½, where the eigh route takes over; every case must be the polar factor.
  rng = np.random.default_rng(11)
  q = _rand_stiefel(rng, 10, 4)
  v = _np_project(q, rng.standard_normal((10, 4)))
  v = scale * v / np.linalg.norm(v)
  y = np.asarray(st.retract(jnp.asarray(q), jnp.asarray(v), "polar"))
  np.testing.assert_allclose(y, scipy.linalg.polar(q + v)[0], atol=1e-12)
  assert _np_orth_err(y) <= 1e-13


def test_polar_retraction_float32_pulls_a_drifted_q_back():
  # Q off the manifold by 3e-2 (accumulated roundoff, say) and a zero step: the iteration must
  # return the polar factor of Q to float32 roundoff, not stop after one step at ~1e-6.
  rng = np.random.default_rng(12)
  q = _rand_stiefel(rng, 64, 64)
  drifted = (q + 3e-2 * rng.standard_normal(q.shape) / 64).astype(np.float32)
  y = st.retract(jnp.asarray(drifted), jnp.zeros_like(drifted), "polar")
  assert y.dtype == jnp.float32
  assert float(st.orthogonality_error(y)) <= 2e-6
  np.testing.assert_allclose(y, scipy.linalg.polar(drifted.astype(np.float64))[0], atol=1e-6)


def test_cayley_low_rank_equals_dense_form(x64):
  # A large step through the Woodbury path (2p < n) against the n×n reference formula.
  rng = np.random.default_rng(5)
  q = _rand_stiefel(rng, 12, 4)
  v = 2.0 * _np_project(q, rng.standard_normal((12, 4)))  # a large step
  y = np.asarray(st.retract(q, v, "cayley"))
  np.testing.assert_allclose(y, _np_retract(q, v, "cayley"), atol=1e-11)
  assert _np_orth_err(y) <= 1e-12


def test_retract_float32_and_bfloat16_keep_dtype():
  rng = np.random.default_rng(6)
  q = jnp.asarray(_rand_stiefel(rng, 8, 3), jnp.float32)
  v = jnp.asarray(0.1 * rng.standard_normal((8, 3)), jnp.float32)
  for method in METHODS:
    y = st.retract(q, st.project_tangent(q, v), method)
    assert y.dtype == jnp.float32
    assert float(st.orthogonality_error(y)) <= 1e-6
    yb = st.retract(q.astype(jnp.bfloat16), v.astype(jnp.bfloat16), method)
    assert yb.dtype == jnp.bfloat16
  # A bfloat16 leaf through the transform: updates keep the dtype and Q stays on the manifold
  # to bfloat16 precision (the linear algebra runs in float32).
  qb = st.identity_init(8, 3, jnp.bfloat16)
  tx = st.stiefel_sgd(0.1, method="cayley")
  u, _ = tx.update(v.astype(jnp.bfloat16), tx.init(qb), qb)
  assert u.dtype == jnp.bfloat16
  assert float(st.orthogonality_error(optax.apply_updates(qb, u))) <= 3e-2


def test_invalid_inputs_raise_value_error():
  q = jnp.eye(4, 3)
  with pytest.raises(ValueError, match="d_ft >= d_pre"):
    st.retract(jnp.eye(3, 4), jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match="method"):
    st.retract(q, jnp.zeros_like(q), "exp")
  with pytest.raises(ValueError, match="v: expected the shape"):
    st.retract(q, jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match="g: expected the shape"):
    st.project_tangent(q, jnp.zeros((3, 3)))
  with pytest.raises(ValueError, match="q: expected a"):
    st.project_tangent(jnp.ones(3), jnp.ones(3))
  with pytest.raises(ValueError, match="d_ft"):
    st.identity_init(2, 3)
  with pytest.raises(ValueError, match="d_ft >= d_pre"):
    st.procrustes_init(jnp.ones((5, 2)), jnp.ones((5, 3)))
  with pytest.raises(ValueError, match="method"):
    st.stiefel_retraction("exp")
  with pytest.raises(ValueError, match="is_stiefel"):
    st.partition(optax.sgd(0.1), st.stiefel_sgd(0.1), 3)


# ----------------------------------------------------------------------------- helpers


def test_orthogonality_error_closed_form():
  # Q = c·I_{n×p}: QᵀQ − I = (c² − 1) I_p, Frobenius norm |c² − 1|·sqrt(p).
  q = jnp.stack([c * jnp.eye(6, 4) for c in (1.0, 2.0, 0.5)])
  expected = [0.0, 3.0 * 2.0, 0.75 * 2.0]
  np.testing.assert_allclose(st.orthogonality_error(q), expected, rtol=1e-6)
  assert st.orthogonality_error(st.identity_init(5, 3)) == 0.0
  np.testing.assert_array_equal(st.identity_init(4, 2), np.eye(4, 2))


def test_procrustes_init_is_the_orthogonal_procrustes_solution(x64):
  rng = np.random.default_rng(7)
  # Tall: U Vᵀ maximises the cross term tr(Qᵀ FᵀP) over St(6, 4).
  f = rng.standard_normal((30, 6))
  p = f[:, :4] @ _rand_stiefel(rng, 4, 4) + 0.1 * rng.standard_normal((30, 4))
  q = np.asarray(st.procrustes_init(f, p))
  assert q.shape == (6, 4) and _np_orth_err(q) <= 1e-12
  # First-order optimality: the Riemannian gradient of tr(QᵀFᵀP) vanishes at the maximiser ...
  np.testing.assert_allclose(_np_project(q, f.T @ p), 0.0, atol=1e-10)
  # ... and it is the global maximum (the nuclear norm of FᵀP); no random point does better.
  best = np.trace(q.T @ f.T @ p)
  np.testing.assert_allclose(best, np.linalg.svd(f.T @ p, compute_uv=False).sum(), rtol=1e-12)
  assert best > max(np.trace(r.T @ f.T @ p) for r in _rand_stiefel(rng, 6, 4, batch=(200,)))
  # Square: the minimiser of ‖FQ − P‖_F, as scipy's orthogonal Procrustes computes it.
  fs = rng.standard_normal((20, 5))
  ps = rng.standard_normal((20, 5))
  qs = np.asarray(st.procrustes_init(fs, ps))
  np.testing.assert_allclose(qs, scipy.linalg.orthogonal_procrustes(fs, ps)[0], atol=1e-11)
  np.testing.assert_allclose(_np_project(qs, 2 * fs.T @ (fs @ qs - ps)), 0.0, atol=1e-10)
  # Fewer samples than features: FᵀP is rank-deficient, the result is still orthonormal.
  qr_ = np.asarray(st.procrustes_init(rng.standard_normal((3, 6)), rng.standard_normal((3, 4))))
  assert _np_orth_err(qr_) <= 1e-12
  # Batched over a leading axis.
  fb, pb = rng.standard_normal((2, 3, 10, 4)), rng.standard_normal((2, 3, 10, 2))
  qb = np.asarray(st.procrustes_init(fb, pb))
  np.testing.assert_allclose(qb[1, 2], np.asarray(st.procrustes_init(fb[1, 2], pb[1, 2])),
                             atol=1e-13)


# ----------------------------------------------------------------------------- optax transforms


def _loop(tx, q0, grad_fn, steps):
  """Runs `steps` updates of `tx` from q0 under one jitted fori_loop; returns the final Q."""
  state = tx.init(q0)

  def body(i, carry):
    q, s = carry
    u, s = tx.update(grad_fn(i, q), s, q)
    return optax.apply_updates(q, u), s

  return jax.jit(lambda c: jax.lax.fori_loop(0, steps, body, c))((q0, state))[0]


@pytest.mark.parametrize("method,shape", [("qr", (16, 6)), ("cayley", (16, 6)),
                                          ("cayley", (8, 8)), ("polar", (16, 6)),
                                          ("polar", (8, 8))])
def test_float32_stays_on_manifold_for_10000_steps(method, shape):
  # Random (non-vanishing) gradients: the harshest case for accumulated roundoff.
  key = jax.random.key(0)
  grad_fn = lambda i, q: jax.random.normal(jax.random.fold_in(key, i), q.shape, q.dtype)
  q = _loop(st.stiefel_sgd(0.1, momentum=0.9, method=method), st.identity_init(*shape),
            grad_fn, 10_000)
  assert q.dtype == jnp.float32
  assert float(st.orthogonality_error(q)) <= 1e-5


def _brockett(rng, n, p):
  eigvals = np.linspace(-1.0, 2.0, n)  # distinct, gap 3/(n-1)
  u = _rand_stiefel(rng, n, n)
  a = (u * eigvals) @ u.T
  weights = np.arange(p, 0, -1).astype(np.float64)  # N = diag(p, ..., 1), distinct
  # min over St of tr(QᵀAQN) = Σ_i n_i λ_i with n descending, λ ascending (Brockett 1991).
  f_star = float(np.sum(weights * eigvals[:p]))
  return a, weights, u[:, :p], f_star


@pytest.mark.parametrize("method", METHODS)
def test_stiefel_sgd_minimises_brockett_cost(x64, method):
  rng = np.random.default_rng(8)
  a, weights, u_min, f_star = _brockett(rng, 8, 3)
  cost = lambda q: jnp.trace(q.T @ a @ q @ jnp.diag(weights))
  q0 = jnp.asarray(_rand_stiefel(rng, 8, 3))
  assert float(cost(q0)) > f_star + 0.5
  grad = jax.grad(cost)
  q = _loop(st.stiefel_sgd(0.02, momentum=0.9, method=method), q0, lambda i, q: grad(q), 1500)
  np.testing.assert_allclose(float(cost(q)), f_star, atol=1e-9)
  assert float(st.orthogonality_error(q)) <= 1e-12
  # Minimiser: column i is ± the eigenvector of the i-th smallest eigenvalue.
  np.testing.assert_allclose(np.abs(np.sum(np.asarray(q) * u_min, axis=0)), 1.0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_stiefel_adam_minimises_brockett_cost(x64, method):
  rng = np.random.default_rng(9)
  a, weights, u_min, f_star = _brockett(rng, 8, 3)
  cost = lambda q: jnp.trace(q.T @ a @ q @ jnp.diag(weights))
  q0 = jnp.asarray(_rand_stiefel(rng, 8, 3))
  grad = jax.grad(cost)
  # Adam with a constant rate hovers at O(lr) from the optimum; decay the rate.
  lr = optax.exponential_decay(0.05, transition_steps=100, decay_rate=0.8)
  q = _loop(st.stiefel_adam(lr, method=method), q0, lambda i, q: grad(q), 3000)
  np.testing.assert_allclose(float(cost(q)), f_star, atol=1e-6)
  assert float(st.orthogonality_error(q)) <= 1e-12
  np.testing.assert_allclose(np.abs(np.sum(np.asarray(q) * u_min, axis=0)), 1.0, atol=1e-3)


def test_stiefel_sgd_matches_manual_momentum_recursion(x64):
  # Two steps by hand: m₁ = P_{Q₀}G₀, Q₁ = R_{Q₀}(−η m₁);
  # m₂ = P_{Q₁}(β m₁ + G₁) (m₁ transported to Q₁ by projection), Q₂ = R_{Q₁}(−η m₂).
  rng = np.random.default_rng(10)
  q0 = _rand_stiefel(rng, 6, 3)
  g0, g1 = rng.standard_normal((2, 6, 3))
  eta, beta = 0.1, 0.8

  def two_steps(tx):
    s = tx.init(jnp.asarray(q0))
    u, s = tx.update(jnp.asarray(g0), s, jnp.asarray(q0))
    q1 = np.asarray(optax.apply_updates(jnp.asarray(q0), u))
    u, s = tx.update(jnp.asarray(g1), s, jnp.asarray(q1))
    return q1, np.asarray(optax.apply_updates(jnp.asarray(q1), u))

  for method in METHODS:
    q1, q2 = two_steps(st.stiefel_sgd(eta, momentum=beta, method=method))
    m1 = _np_project(q0, g0)
    q1_ref = _np_retract(q0, -eta * m1, method)
    m2 = _np_project(q1_ref, beta * m1 + g1)
    q2_ref = _np_retract(q1_ref, -eta * m2, method)
    np.testing.assert_allclose(q1, q1_ref, atol=1e-12)
    np.testing.assert_allclose(q2, q2_ref, atol=1e-12)

  # Nesterov: the step is P_Q(G + β m) with m updated first (optax.trace's convention).
  q1, q2 = two_steps(st.stiefel_sgd(eta, momentum=beta, nesterov=True, method="qr"))
  m1 = _np_project(q0, g0)
  q1_ref = _np_retract(q0, -eta * _np_project(q0, g0 + beta * m1), "qr")
  m2 = _np_project(q1_ref, beta * m1 + g1)
  q2_ref = _np_retract(q1_ref, -eta * _np_project(q1_ref, g1 + beta * m2), "qr")
  np.testing.assert_allclose(q1, q1_ref, atol=1e-12)
  np.testing.assert_allclose(q2, q2_ref, atol=1e-12)


def test_stiefel_adam_matches_manual_recursion(x64):
  # Three steps by hand: r = P_Q G (Riemannian gradient); Adam's moments of r with bias
  # correction; the elementwise scaling leaves the tangent space, so the step is re-projected at
  # Q before the retraction: Q' = R_Q(P_Q(−η m̂/(√v̂ + ε))). The non-square Q makes the
  # re-projection matter (a retraction of the raw Adam step differs at 1e-3).
  rng = np.random.default_rng(11)
  q = _rand_stiefel(rng, 7, 3)
  grads = rng.standard_normal((3, 7, 3)) * np.array([1.0, 5.0, 0.2])
  eta, b1, b2, eps = 0.05, 0.8, 0.95, 1e-8
  for method in METHODS:
    tx = st.stiefel_adam(eta, b1=b1, b2=b2, eps=eps, method=method)
    s = tx.init(jnp.asarray(q))
    got = jnp.asarray(q)
    ref, m, v = q, np.zeros_like(q), np.zeros_like(q)
    for t, g in enumerate(grads, start=1):
      u, s = tx.update(jnp.asarray(g), s, got)
      got = optax.apply_updates(got, u)
      r = _np_project(ref, g)
      m, v = b1 * m + (1 - b1) * r, b2 * v + (1 - b2) * r ** 2
      step = -eta * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
      raw = _np_retract(ref, step, method) if method == "qr" else None
      ref = _np_retract(ref, _np_project(ref, step), method)
      np.testing.assert_allclose(np.asarray(got), ref, atol=1e-10, err_msg=f"{method} step {t}")
      if raw is not None:
        assert np.abs(raw - ref).max() > 1e-3


def test_off_manifold_init_raises_naming_the_parameter():
  params = {"head": {"kernel": jnp.ones((3, 2))},
            "repsim_q": {"pre_logits": 1.01 * jnp.eye(5, 3)}}
  with pytest.raises(ValueError, match="repsim_q/pre_logits.*off the Stiefel manifold"):
    st.stiefel_sgd(0.1).init({"repsim_q": params["repsim_q"]})
  tx = st.partition(optax.sgd(0.1), st.stiefel_adam(0.1), "repsim_q")
  with pytest.raises(ValueError, match="repsim_q/pre_logits"):
    tx.init(params)
  # The same parameter on the manifold initialises fine; a loose tol accepts it too.
  ok = {"head": params["head"], "repsim_q": {"pre_logits": jnp.eye(5, 3)}}
  tx.init(ok)
  st.stiefel_retraction(tol=0.1).init(params["repsim_q"])
  # Wrong shapes are reported at init, not silently accepted.
  with pytest.raises(ValueError, match="d_ft >= d_pre"):
    st.stiefel_retraction(check_init=False).init({"q": jnp.eye(2, 4)})
  with pytest.raises(ValueError, match="params"):
    st.stiefel_retraction().update({"q": jnp.eye(3)}, optax.EmptyState())


def test_partition_euclidean_leaves_like_plain_sgd_and_q_on_manifold():
  rng = np.random.default_rng(11)
  params = {
      "backbone": {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
                   "b": jnp.zeros((3,), jnp.float32)},
      "repsim_q_pre_logits": st.identity_init(6, 4),
  }
  x = jnp.asarray(rng.standard_normal((10, 5)), jnp.float32)
  target = jnp.asarray(rng.standard_normal((10, 3)), jnp.float32)
  f = jnp.asarray(rng.standard_normal((10, 6)), jnp.float32)
  pp = jnp.asarray(rng.standard_normal((10, 4)), jnp.float32)

  def loss(prm):  # separable, so each group's gradient depends only on its own leaves
    eu = jnp.sum((x @ prm["backbone"]["w"] + prm["backbone"]["b"] - target) ** 2)
    return eu + jnp.sum((f @ prm["repsim_q_pre_logits"] - pp) ** 2)

  tx = st.partition(optax.sgd(0.01, momentum=0.5), st.stiefel_sgd(0.01, method="cayley"),
                    "repsim_q")
  tx_eu = optax.sgd(0.01, momentum=0.5)
  tx_q = st.stiefel_sgd(0.01, method="cayley")

  @jax.jit
  def step(prm, s, prm_eu, s_eu, q, s_q):
    g = jax.grad(loss)(prm)
    u, s = tx.update(g, s, prm)
    u_eu, s_eu = tx_eu.update(g["backbone"], s_eu, prm_eu)
    u_q, s_q = tx_q.update(g["repsim_q_pre_logits"], s_q, q)
    return (optax.apply_updates(prm, u), s, optax.apply_updates(prm_eu, u_eu), s_eu,
            optax.apply_updates(q, u_q), s_q)

  carry = (params, tx.init(params), params["backbone"], tx_eu.init(params["backbone"]),
           params["repsim_q_pre_logits"], tx_q.init(params["repsim_q_pre_logits"]))
  loss0 = float(loss(params))
  for _ in range(50):
    carry = step(*carry)
  prm, _, prm_eu, _, q, _ = carry
  for k in ("w", "b"):
    np.testing.assert_allclose(prm["backbone"][k], prm_eu[k], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(prm["repsim_q_pre_logits"], q, rtol=1e-6, atol=1e-6)
  assert float(st.orthogonality_error(prm["repsim_q_pre_logits"])) <= 1e-5
  assert float(loss(prm)) < 0.5 * loss0


def test_stiefel_labels_regex_and_callable():
  params = {"params": {"repsim_q_a": jnp.eye(3), "dense": {"kernel": jnp.ones((2, 2))}},
            "extra": [jnp.eye(4, 2)]}
  labels = st.stiefel_labels(params, r"repsim_q")
  assert labels == {"params": {"repsim_q_a": "stiefel", "dense": {"kernel": "rest"}},
                    "extra": ["rest"]}
  labels = st.stiefel_labels(params, lambda path, leaf: path.startswith("extra/"))
  assert labels == {"params": {"repsim_q_a": "rest", "dense": {"kernel": "rest"}},
                    "extra": ["stiefel"]}
