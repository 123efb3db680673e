"""Optimisation on the Stiefel manifold St(d_ft, d_pre) = {Q : QᵀQ = I} as optax transforms.

RepSim keeps a matrix Q (d_ft × d_pre, d_ft ≥ d_pre) on the manifold while the rest of the network
trains with any optax optimiser. The recipe (Absil, Mahony & Sepulchre 2008, ch. 4) is

  SGD:  Euclidean gradient G --tangent_momentum--> m = P_Q(β m + G) (tangent at Q)
          --optax.scale_by_learning_rate--> step V --stiefel_retraction--> retract(Q, V) − Q;
  Adam: G --project_gradients--> Riemannian gradient P_Q G --optax.scale_by_adam--> (ambient)
          --optax.scale_by_learning_rate--> V --stiefel_retraction--> retract(Q, P_Q V) − Q,

so ``optax.apply_updates`` lands on the manifold. Projecting the previous momentum at the current
Q is the projection vector transport, the usual choice for momentum methods on St.

The polar retraction runs Newton–Schulz iterations (matrix products only, one or two for an
optimiser-sized step): a 512 × 512 momentum-SGD update with small steps takes 4.0 ms on 2 CPU
cores against 7.2 ms with Cholesky-QR (`benchmarks/stiefel.py --d-ft 512 --d-pre 512 --lr 1e-5`),
so RepSim's config uses it; a step too large for Newton–Schulz falls back to an eigh (2048 × 2048
at the benchmark's default lr: ~1 s against QR's 0.34 s), which is why QR stays these functions'
default. For square Q the projection's and Newton–Schulz's products contract over columns only
(see `_square`).

All array functions take a single matrix (..., d_ft, d_pre) batched over any leading axes and are
jit- and vmap-friendly.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "RETRACTIONS",
    "identity_init",
    "orthogonality_error",
    "partition",
    "procrustes_init",
    "project_gradients",
    "project_tangent",
    "retract",
    "stiefel_adam",
    "stiefel_labels",
    "stiefel_retraction",
    "stiefel_sgd",
    "tangent_momentum",
]

RETRACTIONS = ("qr", "cayley", "polar")

# Labels used inside `partition`.
_STIEFEL = "stiefel"
_REST = "rest"


# ----------------------------------------------------------------------------- array functions


def _check_stiefel_shape(x: Any, name: str) -> None:
  shape = jnp.shape(x)
  if len(shape) < 2:
    raise ValueError(f"{name}: expected a (..., d_ft, d_pre) matrix, got shape {shape}")
  if shape[-2] < shape[-1]:
    raise ValueError(
        f"{name}: expected d_ft >= d_pre for a Stiefel matrix (..., d_ft, d_pre), got shape {shape}"
    )


def _mT(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  # Full float32 products: on NVIDIA GPUs JAX's default lets float32 matmuls run in TF32 (10-bit
  # mantissa), which leaves ‖QᵀQ − I‖ ~1e-2 after one 2048² update instead of ~1e-5.
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _sym(a: jax.Array) -> jax.Array:
  return 0.5 * (a + _mT(a))


def _square(x: jax.Array) -> bool:
  """Square Q (d_ft = d_pre): QQᵀ = I too, so products can contract over columns (A Bᵀ), which
  XLA:CPU runs as they are; for a product over rows (Aᵀ B) it first copies Aᵀ, ~0.25 ms on top
  of the 0.8 ms a 512² product takes on 2 cores."""
  return x.shape[-2] == x.shape[-1]


def _compute_dtype(dtype) -> jnp.dtype:
  # LAPACK-style factorisations need float32 at least (no bf16/f16 QR or SVD).
  return jnp.promote_types(dtype, jnp.float32)


def project_tangent(q: jax.Array, g: jax.Array) -> jax.Array:
  """Orthogonal projection of `g` onto the tangent space of the Stiefel manifold at `q`.

  P_Q(G) = G − Q sym(QᵀG), sym(A) = (A + Aᵀ)/2 (embedded metric). The result V satisfies
  QᵀV + VᵀQ = 0.

  Args:
    q: (..., d_ft, d_pre) point on the manifold.
    g: (..., d_ft, d_pre) ambient matrix (e.g. a Euclidean gradient); same shape as `q`.

  Returns:
    (..., d_ft, d_pre) tangent vector.
  """
  _check_stiefel_shape(q, "q")
  if jnp.shape(g) != jnp.shape(q):
    raise ValueError(f"g: expected the shape of q {jnp.shape(q)}, got {jnp.shape(g)}")
  if _square(q):  # = (G − Q Gᵀ Q)/2 when QQᵀ = I
    return 0.5 * (g - _mm(_mm(q, _mT(g)), q))
  return g - _mm(q, _sym(_mm(_mT(q), g)))


def _householder_qr(m: jax.Array) -> jax.Array:
  q, r = jnp.linalg.qr(m)  # reduced: (..., n, p), (..., p, p)
  d = jnp.diagonal(r, axis1=-2, axis2=-1)
  # Unique QR with positive diag(R): flip the matching columns of Q (a zero pivot keeps +1).
  signs = jnp.where(d < 0, -1.0, 1.0).astype(q.dtype)
  return q * signs[..., None, :]


def _retract_qr(m: jax.Array) -> jax.Array:
  """Q-factor of M = Q + V with positive diag(R), as Cholesky-QR: R = chol(MᵀM)ᵀ, Q = M R⁻¹.

  That is the same unique factor as Householder QR. For tangent V, MᵀM = I + VᵀV has condition
  number 1 + ‖V‖₂², so Cholesky-QR loses nothing here, and a matmul, a p × p Cholesky and a
  triangular solve are ~5x faster than LAPACK's geqrf + orgqr for p = 512 on CPU (6.6 vs 32 ms)
  and avoid the latency-bound QR kernels on GPU. A rank-deficient M (a huge or non-tangent step)
  makes the Cholesky fail; Householder QR then takes over.
  """
  l = jnp.linalg.cholesky(_sym(_mm(_mT(m), m)))
  y = jax.lax.linalg.triangular_solve(l, m, left_side=False, lower=True, transpose_a=True)
  return jax.lax.cond(jnp.all(jnp.isfinite(y)), lambda: y, lambda: _householder_qr(m))


def _polar_svd(m: jax.Array) -> jax.Array:
  """U Vᵀ of the thin SVD; defined for rank-deficient m too (used by procrustes_init)."""
  # QR-iteration SVD: LAPACK's divide-and-conquer driver can fail (JAX then returns NaN) on
  # matrices whose singular values cluster; this is a one-off call, so robustness wins.
  u, _, vh = jax.lax.linalg.svd(
      m, full_matrices=False, algorithm=jax.lax.linalg.SvdAlgorithm.QR
  )
  return _mm(u, vh)


def _polar_eigh(m: jax.Array) -> jax.Array:
  """Polar factor M (MᵀM)^(-1/2) (= U Vᵀ of the thin SVD of M) through eigh of its p × p Gram MᵀM.

  Used instead of an SVD of M because there all singular values cluster at 1, the case where
  LAPACK's divide-and-conquer SVD (JAX's CPU default) can fail and return NaN (seen on a
  2048 × 2048 float32 step); eigh is robust.
  """
  w, u = jnp.linalg.eigh(_sym(_mm(_mT(m), m)))
  y = _mm(m, _mm(u * jax.lax.rsqrt(w)[..., None, :], _mT(u)))
  # rsqrt of float32 eigenvalues leaves ~1e-6 off the manifold; one Newton–Schulz step (identity
  # on the manifold) squares that deviation, as in the Cayley retraction.
  return _newton_schulz(y)


# Newton–Schulz converges while ‖YᵀY − I‖₂ < 1; from ‖·‖_F < ½ the bound below reaches float64
# roundoff in 6 steps.
_NS_MAX_ERROR = 0.5
_NS_MAX_STEPS = 8


def _retract_polar(m: jax.Array) -> jax.Array:
  """Polar factor M (MᵀM)^(-1/2) by Newton–Schulz steps Y ← Y (I − E/2), E = YᵀY − I.

  For M = Q + V with V tangent, MᵀM = I + VᵀV, so E starts at O(‖V‖²), and a step keeps the
  singular vectors of Y and maps E to −¾E² + ¼E³. An optimiser step (‖E‖ ≲ 1e-3) is then done
  in one step, two matmuls, where QR needs a Cholesky and a triangular solve (single-threaded
  LAPACK on CPU, latency-bound on GPU). Steps repeat until the bound
  ‖E'‖_F ≤ ¾‖E‖_F² + ¼‖E‖_F³ is below roundoff (eps · √p). An M with ‖MᵀM − I‖_F ≥ ½ (a huge
  step, or a Q far off the manifold) goes to the exact `_polar_eigh` instead.
  """
  tol = float(jnp.finfo(m.dtype).eps) * math.sqrt(m.shape[-1])

  def deviation(y):  # E and its Frobenius norm, the worst over any batch axes
    e = _gram_deviation(y)
    return e, jnp.max(jnp.sqrt(jnp.sum(jnp.square(e), axis=(-2, -1))))

  def step(y, e, err):
    return _newton_schulz_step(y, e), 0.75 * err**2 + 0.25 * err**3

  e0, err0 = deviation(m)

  def newton_schulz():
    def body(carry):
      y, _, k = carry
      return (*step(y, *deviation(y)), k + 1)

    y, _, _ = jax.lax.while_loop(lambda c: (c[1] > tol) & (c[2] < _NS_MAX_STEPS), body,
                                 (*step(m, e0, err0), 1))
    return y

  # The rare fallback forms its own MᵀM (e0 is YYᵀ − I for square Y, see `_gram_deviation`).
  return jax.lax.cond(err0 < _NS_MAX_ERROR, newton_schulz, lambda: _polar_eigh(m))


def _retract_cayley(q: jax.Array, v: jax.Array) -> jax.Array:
  """Cayley retraction Y = (I − W/2)⁻¹ (I + W/2) Q with skew W = P V Qᵀ − Q Vᵀ P, P = I − ½QQᵀ.

  Wen & Yin (2013) / Li, Fuxin & Todorovic (2020). For tangent V, W Q = V, so Y'(0) = V; Y is
  exactly orthonormal because the Cayley transform of a skew matrix is orthogonal. With
  W = U Zᵀ, U = [PV, Q], Z = [Q, −PV] (both n × 2p), Sherman–Morrison–Woodbury gives
  Y = Q + U (I₂ₚ − ½ ZᵀU)⁻¹ ZᵀQ, a 2p × 2p solve; used when 2p < n, else the dense n × n solve
  Y = 2 (I − W/2)⁻¹ Q − Q is cheaper.

  The Cayley map is an isometry, so it carries any roundoff error of Q forward and float32 error
  accumulates over thousands of steps. One Newton–Schulz polar step Y ← Y (3I − YᵀY)/2 follows:
  it is the identity on the manifold and squares a small deviation (E -> O(E²)).
  """
  n, p = q.shape[-2], q.shape[-1]
  qt_v = _mm(_mT(q), v)
  pv = v - 0.5 * _mm(q, qt_v)  # P V without forming the n × n matrix P
  if 2 * p < n:
    u = jnp.concatenate([pv, q], axis=-1)  # (..., n, 2p)
    z = jnp.concatenate([q, -pv], axis=-1)  # (..., n, 2p)
    zt_q = _mm(_mT(z), q)  # (..., 2p, p)
    small = jnp.eye(2 * p, dtype=q.dtype) - 0.5 * _mm(_mT(z), u)
    y = q + _mm(u, jnp.linalg.solve(small, zt_q))
  else:
    w = _mm(pv, _mT(q)) - _mm(q, _mT(pv))  # (..., n, n) skew
    lhs = jnp.eye(n, dtype=q.dtype) - 0.5 * w
    y = 2.0 * jnp.linalg.solve(lhs, q) - q
  return _newton_schulz(y)


def _gram_deviation(y: jax.Array) -> jax.Array:
  """E = YᵀY − I, symmetrised; YYᵀ − I for square Y (same eigenvalues, see `_square`)."""
  gram = _mm(y, _mT(y)) if _square(y) else _mm(_mT(y), y)
  return _sym(gram) - jnp.eye(y.shape[-1], dtype=y.dtype)


def _newton_schulz_step(y: jax.Array, e: jax.Array) -> jax.Array:
  """Y (3I − YᵀY)/2 = Y (I − E/2) for E = `_gram_deviation(y)`; (I − E/2) Y for square Y, the
  same matrix since Y YᵀY = YYᵀ Y."""
  return y - 0.5 * (_mm(e, y) if _square(y) else _mm(y, e))


def _newton_schulz(y: jax.Array) -> jax.Array:
  """One Newton–Schulz polar step: fixes the manifold, squares a small deviation."""
  return _newton_schulz_step(y, _gram_deviation(y))


def retract(q: jax.Array, v: jax.Array, method: str = "qr") -> jax.Array:
  """Retraction R_Q(V) of a tangent step `v` at `q` back onto the Stiefel manifold.

  Methods:
    "qr": Q-factor of Q + V with the signs of diag(R) made positive.
    "cayley": (I − W/2)⁻¹(I + W/2) Q with W = P V Qᵀ − Q Vᵀ P, P = I − ½QQᵀ (Wen & Yin 2013),
      solved in the low-rank (Sherman–Morrison–Woodbury) form when 2·d_pre < d_ft, then one
      Newton–Schulz step (identity on the manifold) so roundoff does not accumulate.
    "polar": U Vᵀ from the thin SVD U Σ Vᵀ of Q + V (the closest orthonormal matrix to Q + V),
      computed as M (MᵀM)^(-1/2), M = Q + V, by Newton–Schulz iteration (matmuls only; one
      iteration for a typical optimiser step), or by eigh of the d_pre × d_pre Gram for a step
      too large for it to converge fast (full column rank is guaranteed for tangent V:
      MᵀM = I + VᵀV).

  All three map any `v` onto the manifold; they are first-order retractions (R_Q(0) = Q,
  dR_Q(tV)/dt|₀ = V) when `v` is tangent at `q`, so project first (`project_tangent`).
  Computation runs in at least float32; the result has the dtype of `q`.

  Args:
    q: (..., d_ft, d_pre) point on the manifold, d_ft >= d_pre.
    v: (..., d_ft, d_pre) tangent step at `q`.
    method: one of "qr", "cayley", "polar".

  Returns:
    (..., d_ft, d_pre) point on the manifold.
  """
  _check_stiefel_shape(q, "q")
  if jnp.shape(v) != jnp.shape(q):
    raise ValueError(f"v: expected the shape of q {jnp.shape(q)}, got {jnp.shape(v)}")
  if method not in RETRACTIONS:
    raise ValueError(f"method: expected one of {RETRACTIONS}, got {method!r}")
  out_dtype = jnp.result_type(q)
  dtype = _compute_dtype(jnp.result_type(q, v))
  q32, v32 = jnp.asarray(q, dtype), jnp.asarray(v, dtype)
  if method == "qr":
    y = _retract_qr(q32 + v32)
  elif method == "polar":
    y = _retract_polar(q32 + v32)
  else:
    y = _retract_cayley(q32, v32)
  return y.astype(out_dtype)


def orthogonality_error(q: jax.Array) -> jax.Array:
  """‖QᵀQ − I‖_F over the last two axes: (..., d_ft, d_pre) -> (...)."""
  _check_stiefel_shape(q, "q")
  q = jnp.asarray(q, _compute_dtype(jnp.result_type(q)))
  gram = _mm(_mT(q), q)
  eye = jnp.eye(q.shape[-1], dtype=q.dtype)
  return jnp.sqrt(jnp.sum(jnp.square(gram - eye), axis=(-2, -1)))


def identity_init(d_ft: int, d_pre: int, dtype=jnp.float32) -> jax.Array:
  """The (d_ft, d_pre) matrix with ones on the main diagonal: a point on St(d_ft, d_pre)."""
  if not (isinstance(d_ft, (int, np.integer)) and d_ft >= 1):
    raise ValueError(f"d_ft: expected a positive int, got {d_ft!r}")
  if not (isinstance(d_pre, (int, np.integer)) and d_pre >= 1):
    raise ValueError(f"d_pre: expected a positive int, got {d_pre!r}")
  if d_ft < d_pre:
    raise ValueError(f"d_ft: expected d_ft >= d_pre, got d_ft={d_ft}, d_pre={d_pre}")
  return jnp.eye(d_ft, d_pre, dtype=dtype)


def procrustes_init(f: jax.Array, p: jax.Array) -> jax.Array:
  """Orthogonal Procrustes: U Vᵀ from the thin SVD U Σ Vᵀ of FᵀP.

  It maximises tr(Qᵀ FᵀP) over St(d_ft, d_pre). When d_ft = d_pre, ‖FQ‖_F = ‖F‖_F is constant, so
  it is the exact minimiser of ‖F Q − P‖_F. When d_ft > d_pre, ‖FQ‖_F depends on Q (unless
  FᵀF ∝ I) and the minimiser of ‖F Q − P‖_F has no closed form ("unbalanced Procrustes"); U Vᵀ
  is then the standard starting point, which the Riemannian optimiser refines.
  Pass the features exactly as the RepSim term sees them (centred, Frobenius-normalised).

  Args:
    f: (..., n, d_ft) fine-tuned features.
    p: (..., n, d_pre) pretrained features, d_pre <= d_ft.

  Returns:
    (..., d_ft, d_pre) orthonormal Q, in the dtype of `f`.
  """
  if jnp.ndim(f) < 2 or jnp.ndim(p) < 2:
    raise ValueError(
        f"f, p: expected (..., n, d) feature matrices, got shapes {jnp.shape(f)}, {jnp.shape(p)}"
    )
  if jnp.shape(f)[:-1] != jnp.shape(p)[:-1]:
    raise ValueError(
        f"p: expected the leading shape (..., n) of f {jnp.shape(f)[:-1]}, got {jnp.shape(p)[:-1]}"
    )
  if jnp.shape(f)[-1] < jnp.shape(p)[-1]:
    raise ValueError(
        f"f: expected d_ft >= d_pre, got d_ft={jnp.shape(f)[-1]}, d_pre={jnp.shape(p)[-1]}"
    )
  out_dtype = jnp.result_type(f)
  dtype = _compute_dtype(jnp.result_type(f, p))
  m = _mm(_mT(jnp.asarray(f, dtype)), jnp.asarray(p, dtype))
  return _polar_svd(m).astype(out_dtype)


# ----------------------------------------------------------------------------- optax transforms


def _path_str(path) -> str:
  """'params/repsim_q/kernel' from a jax key path."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _default_tol(dtype, p: int) -> float:
  # Half the significant digits of the dtype, scaled by the Frobenius norm of I_p: loose enough for
  # an SVD/QR-made point in float32, far below the O(1) error of an unconstrained init.
  return math.sqrt(float(jnp.finfo(_compute_dtype(dtype)).eps)) * math.sqrt(p)


def _is_concrete_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)


def _check_on_manifold(params, tol: float | None, who: str) -> None:
  """Raise ValueError naming the first leaf that is not a Stiefel point (concrete leaves only)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in leaves:
    name = _path_str(path) or "<root>"
    _check_stiefel_shape(leaf, f"{who}: parameter {name!r}")
    if not _is_concrete_array(leaf):
      continue  # traced init (inside jit): nothing concrete to check
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(f"{who}: parameter {name!r}: expected a float array, got {leaf.dtype}")
    bound = _default_tol(leaf.dtype, leaf.shape[-1]) if tol is None else tol
    err = float(jnp.max(orthogonality_error(leaf)))
    if not err <= bound:  # also catches NaN
      raise ValueError(
          f"{who}: parameter {name!r} is off the Stiefel manifold: ‖QᵀQ − I‖_F = {err:.3g} > "
          f"tol {bound:.3g}; initialise it with identity_init / procrustes_init"
      )


def project_gradients() -> optax.GradientTransformation:
  """Project each incoming gradient leaf onto the tangent space at the matching param leaf.

  Put it first in the chain so momentum / Adam statistics accumulate Riemannian gradients.
  Every leaf must be a (..., d_ft, d_pre) matrix; `update` needs `params`.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("params: project_gradients needs the current params in update")
    return jax.tree.map(project_tangent, params, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def tangent_momentum(decay: float, nesterov: bool = False) -> optax.GradientTransformation:
  """Heavy-ball momentum kept in the tangent space at the current Q: m ← P_Q(β m + G).

  The old m is tangent at the previous Q; projecting it at the current one is its vector
  transport (as in Li, Fuxin & Todorovic 2020's Cayley SGD), and by linearity one projection
  serves both it and the new gradient. The output is tangent at Q (m, or P_Q(G + β m) with
  `nesterov`), so `stiefel_retraction(tangent=True)` need not project it again: two d³ products
  per step instead of four. Feed it Euclidean gradients; `update` needs `params`.
  """

  def init_fn(params):
    return optax.TraceState(trace=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("params: tangent_momentum needs the current params in update")
    m = jax.tree.map(lambda q, g, m: project_tangent(q, decay * m + g), params, updates,
                     state.trace)
    out = (jax.tree.map(lambda q, g, m: project_tangent(q, g + decay * m), params, updates, m)
           if nesterov else m)
    return out, optax.TraceState(trace=m)

  return optax.GradientTransformation(init_fn, update_fn)


def stiefel_retraction(
    method: str = "qr", check_init: bool = True, tol: float | None = None, tangent: bool = False
) -> optax.GradientTransformation:
  """Turn an already-scaled ambient step V into `retract(Q, P_Q V) − Q` for each leaf Q.

  Place it last in the chain (after the learning rate), so `optax.apply_updates` lands on the
  manifold (up to one rounding of Q + update in the param dtype).

  Args:
    method: retraction, one of "qr", "cayley", "polar" (see `retract`).
    check_init: at `init`, raise ValueError naming any concrete param leaf with
      ‖QᵀQ − I‖_F > tol; such a leaf is never projected silently. Leaves traced under jit are
      not checked.
    tol: that bound; None means sqrt(eps(dtype) · d_pre), e.g. 3.5e-4·sqrt(d_pre) for float32.
    tangent: the steps arrive tangent at Q already (after `tangent_momentum`): skip P_Q.

  Returns:
    An `optax.GradientTransformation` with empty state whose `update` needs `params`.
  """
  if method not in RETRACTIONS:
    raise ValueError(f"method: expected one of {RETRACTIONS}, got {method!r}")
  if tol is not None and not tol > 0:
    raise ValueError(f"tol: expected a positive float or None, got {tol!r}")

  def init_fn(params):
    if check_init:
      _check_on_manifold(params, tol, "stiefel_retraction")
    else:
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        _check_stiefel_shape(leaf, f"stiefel_retraction: parameter {_path_str(path)!r}")
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("params: stiefel_retraction needs the current params in update")

    # Under vmap (population training: one Q per member) each member retracts on its own:
    # batched LAPACK calls of several XLA:CPU devices at once deadlock in jaxlib's batch thread
    # pool, and a batched fallback `lax.cond` would run both branches every step.
    @jax.custom_batching.sequential_vmap
    def one(q, v):
      dtype = _compute_dtype(jnp.result_type(q, v))  # project and retract in >= float32
      q32, v32 = q.astype(dtype), v.astype(dtype)
      y = retract(q32, v32 if tangent else project_tangent(q32, v32), method)
      return (y - q32).astype(v.dtype)

    return jax.tree.map(one, params, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def stiefel_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = 0.9,
    nesterov: bool = False,
    method: str = "qr",
    check_init: bool = True,
) -> optax.GradientTransformation:
  """Riemannian SGD (with heavy-ball / Nesterov momentum transported by projection) on St.

  Chain: tangent_momentum(momentum, nesterov) (or project_gradients without momentum) ->
  scale_by_learning_rate -> stiefel_retraction(method, tangent=True). `momentum=None` or 0 gives
  plain Riemannian gradient descent.
  """
  return optax.chain(
      tangent_momentum(momentum, nesterov) if momentum else project_gradients(),
      optax.scale_by_learning_rate(learning_rate),
      stiefel_retraction(method, check_init, tangent=True),
  )


def stiefel_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    method: str = "qr",
    check_init: bool = True,
) -> optax.GradientTransformation:
  """Adam statistics of projected gradients, then a retraction.

  Chain: project_gradients -> optax.scale_by_adam(b1, b2, eps) -> scale_by_learning_rate ->
  stiefel_retraction(method). The elementwise Adam scaling leaves the tangent space; the
  retraction re-projects the step at the current Q.
  """
  return optax.chain(
      project_gradients(),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.scale_by_learning_rate(learning_rate),
      stiefel_retraction(method, check_init),
  )


IsStiefel = Union[str, "re.Pattern[str]", Callable[[str, Any], bool]]


def stiefel_labels(params, is_stiefel: IsStiefel):
  """Pytree of "stiefel" / "rest" labels for `params`.

  `is_stiefel` is a regex searched in each leaf's "/"-joined key path (e.g.
  "params/repsim_q_pre_logits"), or a callable (path_str, leaf) -> bool.
  """
  if isinstance(is_stiefel, (str, re.Pattern)):
    pattern = re.compile(is_stiefel)
    pred = lambda path, leaf: pattern.search(path) is not None
  elif callable(is_stiefel):
    pred = is_stiefel
  else:
    raise ValueError(
        f"is_stiefel: expected a regex or a callable (path, leaf) -> bool, got {is_stiefel!r}"
    )
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _STIEFEL if pred(_path_str(path), leaf) else _REST, params
  )


def partition(
    optimizer_for_rest: optax.GradientTransformation,
    stiefel_optimizer: optax.GradientTransformation,
    is_stiefel: IsStiefel,
) -> optax.GradientTransformation:
  """`optax.partition`: leaves selected by `is_stiefel` get `stiefel_optimizer`, others the rest.

  Args:
    optimizer_for_rest: any optax optimiser for the Euclidean leaves.
    stiefel_optimizer: e.g. `stiefel_sgd(...)` / `stiefel_adam(...)`, or any chain ending in
      `stiefel_retraction`.
    is_stiefel: regex searched in the "/"-joined key path of each leaf (e.g. "repsim_q"), or a
      callable (path_str, leaf) -> bool.

  Returns:
    An optax transformation; its `update` needs `params` (the Stiefel leaves use them).
  """
  if isinstance(is_stiefel, str):
    try:
      re.compile(is_stiefel)
    except re.error as e:
      raise ValueError(f"is_stiefel: invalid regex {is_stiefel!r}: {e}") from None
  elif not (isinstance(is_stiefel, re.Pattern) or callable(is_stiefel)):
    raise ValueError(
        f"is_stiefel: expected a regex or a callable (path, leaf) -> bool, got {is_stiefel!r}"
    )
  return optax.partition(
      {_STIEFEL: stiefel_optimizer, _REST: optimizer_for_rest},
      lambda params: stiefel_labels(params, is_stiefel),
  )
