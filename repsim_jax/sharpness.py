"""Sharpness of a loss at a parameter point: SAM / ASAM, average-case and Hessian measures.

Every measure takes a generic `loss_fn(params, batch) -> scalar` and a pytree of parameters.
`loss_fn` must be deterministic: for a Flax model with BatchNorm, close over the model and its
`batch_stats` and apply it with `train=False` (running statistics), so that the loss of an example
does not depend on the rest of its batch and m-sharpness / repeated probes are well defined::

  def eval_loss(model, batch_stats, params, batch):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'],
                            train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

  loss_fn = jax.tree_util.Partial(eval_loss, model, batch_stats)  # or functools.partial / a closure

The functions are pure and jit-friendly: `params`, `batch`, `rng` and the real-valued knobs (`rho`,
`eta`, `sigma`) may be traced; the integer / choice knobs (`steps`, `m`, `adaptive`, `num_iters`,
`num_samples`, `method`, `chunk_size`) must be static. The same `rng` gives the same numbers.
`sharpness_report` jits the selected measures over a fixed list of batches; pass `loss_fn` as a
`jax.tree_util.Partial` (as above) so that its compiled computation is reused across calls even
when the `batch_stats` change.

Definitions (w = params, L = loss_fn(., batch), g = ∇L(w), ‖.‖ the global l2 norm over the pytree):
  sam_sharpness      max_{‖ε‖ ≤ ρ} L(w + ε) − L(w), approximated by projected normalised-gradient
                     ascent (one step: ε = ρ g/‖g‖, Foret et al. 2021); ASAM (Kwon et al. 2021) uses
                     the ball {‖ε / T_w‖ ≤ ρ}, T_w = |w| + η; m-sharpness averages over sub-batches.
  average_sharpness  E_{ε ~ N(0, σ² I)} L(w + ε) − L(w).
  hessian_*          top eigenvalue (power iteration / Lanczos) and trace (Hutchinson) of ∇²L(w),
                     from Hessian-vector products (forward-over-reverse).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

EIGEN_METHODS = ("power", "lanczos")
MEASURES = ("sam", "asam", "average", "hessian_eig", "hessian_trace")


# ----------------------------------------------------------------------------------------------
# Small pytree helpers.


_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes on GPU for the Krylov algebra.


def _safe_inv(x: jax.Array) -> jax.Array:
  # 1/x, but 0 where x == 0: a zero gradient gives a zero perturbation instead of NaNs.
  return jnp.where(x > 0, 1.0 / jnp.where(x > 0, x, 1.0), 0.0)


def _project_ball(delta: PyTree, rho) -> PyTree:
  """Euclidean projection of `delta` onto the global-l2 ball of radius `rho`."""
  norm = optax.tree.norm(delta)
  return optax.tree.scale(jnp.minimum(1.0, rho * _safe_inv(norm)), delta)


def _random_like(rng: jax.Array, tree: PyTree, sampler) -> PyTree:
  # One draw of the flattened size, then unravelled: a single PRNG call site instead of one per
  # leaf keeps compile time flat in the number of leaves (threefry is inlined at every site).
  flat, unravel = ravel_pytree(tree)
  return unravel(sampler(rng, flat.shape, flat.dtype))


def _check_params(params: PyTree) -> None:
  leaves = jax.tree_util.tree_leaves(params)
  if not leaves:
    raise ValueError("params: expected a pytree with at least one array leaf, got an empty pytree")
  for x in leaves:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"params: expected floating-point leaves, got dtype {jnp.result_type(x)}")


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _check_nonnegative(name: str, value) -> None:
  # Only concrete values can be checked; traced ones are the caller's responsibility.
  if isinstance(value, (int, float, np.number)) and not value >= 0:
    raise ValueError(f"{name}: expected a non-negative number, got {value!r}")


def _map(fn, xs, chunk_size: int | None):
  """`fn` over the leading axis of `xs`: one vmap, or `lax.map` over chunks of `chunk_size`."""
  if chunk_size is None:
    return jax.vmap(fn)(xs)
  _check_positive_int("chunk_size", chunk_size)
  return jax.lax.map(fn, xs, batch_size=chunk_size)


# ----------------------------------------------------------------------------------------------
# SAM / ASAM sharpness.


def _sam_sharpness_single(loss_fn: LossFn, params: PyTree, batch: PyTree, rho, steps: int,
                          adaptive: bool, eta, step_size, axis_name=None) -> jax.Array:
  """Worst-case sharpness on one batch (no m-splitting); with `axis_name`, of the batch split
  over that axis (losses and gradients averaged over it)."""
  mean = (lambda x: x) if axis_name is None else (lambda x: jax.lax.pmean(x, axis_name))
  value_and_grad = lambda p: mean(jax.value_and_grad(loss_fn)(p, batch))  # noqa: E731
  # Work in δ-coordinates, ε = T ⊙ δ with ‖δ‖ ≤ ρ: T = 1 for SAM, T = |w| + η for ASAM. Then
  # ∇_δ L = T ⊙ g, and one normalised step from δ = 0 gives ε = ρ T² g / ‖T g‖ (the ASAM formula).
  if adaptive:
    scale = jax.tree_util.tree_map(lambda w: jnp.abs(w) + eta, params)
    to_eps = lambda d: optax.tree.mul(scale, d)
  else:
    scale = None
    to_eps = lambda d: d
  alpha = rho if step_size is None else step_size

  def ascent_step(delta, grads):
    direction = optax.tree.mul(scale, grads) if adaptive else grads
    direction = optax.tree.scale(_safe_inv(optax.tree.norm(direction)), direction)
    return _project_ball(optax.tree.add(delta, optax.tree.scale(alpha, direction)), rho)

  loss0, grads0 = value_and_grad(params)
  delta = ascent_step(jax.tree_util.tree_map(jnp.zeros_like, params), grads0)

  def body(_, delta):
    return ascent_step(delta, value_and_grad(optax.tree.add(params, to_eps(delta)))[1])

  delta = jax.lax.fori_loop(0, steps - 1, body, delta)
  return mean(loss_fn(optax.tree.add(params, to_eps(delta)), batch)) - loss0


def sam_sharpness(loss_fn: LossFn, params: PyTree, batch: PyTree, *, rho=0.05, steps: int = 1,
                  m: int | None = None, adaptive: bool = False, eta=0.01,
                  step_size=None, axis_name: str | None = None) -> jax.Array:
  """SAM / ASAM sharpness `L(w + ε) − L(w)`, ε the (approximate) worst case in a ball of radius ρ.

  Args:
    loss_fn: `loss_fn(params, batch) -> scalar`, deterministic (BatchNorm in eval mode).
    params: pytree of floating arrays w; norms are global over all leaves.
    batch: pytree of arrays. With `m`, every leaf must have the same leading size n.
    rho: radius ρ of the ball.
    steps: k ascent steps. k = 1: ε = ρ g/‖g‖ (SAM). k > 1: projected gradient ascent from
      ε₀ = 0, ε_{t+1} = Π_ball(ε_t + α ∇L(w+ε_t)/‖∇L(w+ε_t)‖), with step α = `step_size`
      (default α = ρ: the first step is exactly the one-step SAM ε and later steps move over the
      ball). For a convex loss every step increases L(w+ε), so the value is non-decreasing in k
      and converges to a stationary point of the maximisation over the ball.
    m: m-sharpness (Foret et al. 2021, Andriushchenko & Flammarion 2022): the batch is split into
      n/m consecutive sub-batches of size m, each with its own ε and sharpness (vmapped), and
      the mean is returned. n must be divisible by m.
    adaptive: ASAM (Kwon et al. 2021): the ball is {ε : ‖ε / T_w‖ ≤ ρ} with T_w = |w| + η
      elementwise (on every leaf, biases included), so one step gives ε = ρ T_w² g / ‖T_w g‖ and
      k steps run the same projected ascent in the coordinates δ = ε / T_w.
    eta: η of ASAM (ignored unless `adaptive`).
    step_size: α of the k-step ascent, in the same (δ-)coordinates as ρ; None means ρ.
    axis_name: inside a data-parallel step, the axis the batch is split over: the sharpness of
      the whole (global) batch, its losses and ascent gradients averaged over the axis; with
      `m`, each device's sub-batches keep their own ε and the mean is over all of them.

  Returns:
    Scalar sharpness in the loss dtype (the mean over sub-batches when `m` is given).
  """
  _check_params(params)
  _check_positive_int("steps", steps)
  _check_nonnegative("rho", rho)
  _check_nonnegative("eta", eta)
  if step_size is not None:
    _check_nonnegative("step_size", step_size)
  single = functools.partial(_sam_sharpness_single, loss_fn, rho=rho, steps=steps,
                             adaptive=adaptive, eta=eta, step_size=step_size)
  if m is None:
    return single(params, batch, axis_name=axis_name)
  _check_positive_int("m", m)
  sub_batches = split_batch(batch, m)
  value = jnp.mean(jax.vmap(single, in_axes=(None, 0))(params, sub_batches))
  return value if axis_name is None else jax.lax.pmean(value, axis_name)


def split_batch(batch: PyTree, m: int) -> PyTree:
  """Reshapes every leaf (n, ...) of `batch` to (n // m, m, ...): consecutive sub-batches."""
  _check_positive_int("m", m)
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves:
    raise ValueError("batch: expected a pytree of arrays with a leading batch axis, got no leaves")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError("batch: expected every leaf to have the same leading size n, got "
                     f"{sorted(sizes, key=str)}")
  (n,) = sizes
  if n % m:
    raise ValueError(f"m: the batch size n={n} must be divisible by m={m}")
  return jax.tree_util.tree_map(lambda x: jnp.reshape(x, (n // m, m) + jnp.shape(x)[1:]), batch)


# ----------------------------------------------------------------------------------------------
# Average-case sharpness.


def average_sharpness(loss_fn: LossFn, params: PyTree, batch: PyTree, rng: jax.Array, *,
                      sigma=0.01, num_samples: int = 8, chunk_size: int | None = None,
                      antithetic: bool = False) -> jax.Array:
  """Monte Carlo `E_ε[L(w + ε)] − L(w)` with ε ~ N(0, σ² I) over all parameters.

  The `num_samples` perturbed losses are vmapped (or, with `chunk_size`, evaluated `chunk_size`
  at a time to bound memory). For a quadratic ½wᵀAw + bᵀw the expectation is ½σ² tr(A).
  `antithetic=True` evaluates num_samples/2 pairs ±ε (num_samples must be even): same
  expectation, but the first-order term gᵀε, which dominates the variance at small σ, cancels
  exactly within each pair.

  Returns:
    Scalar estimate; the same `rng` gives the same value.
  """
  _check_params(params)
  _check_positive_int("num_samples", num_samples)
  _check_nonnegative("sigma", sigma)
  if antithetic and num_samples % 2:
    raise ValueError(f"num_samples: expected an even number with antithetic=True, got "
                     f"{num_samples}")
  loss0 = loss_fn(params, batch)

  def perturbed(key):
    noise = _random_like(key, params, lambda k, s, d: sigma * jax.random.normal(k, s, d))
    if not antithetic:
      return loss_fn(optax.tree.add(params, noise), batch)
    return 0.5 * (loss_fn(optax.tree.add(params, noise), batch)
                  + loss_fn(optax.tree.add(params, optax.tree.scale(-1.0, noise)), batch))

  num_draws = num_samples // 2 if antithetic else num_samples
  losses = _map(perturbed, jax.random.split(rng, num_draws), chunk_size)
  return jnp.mean(losses) - loss0


# ----------------------------------------------------------------------------------------------
# Hessian measures.


def hessian_vector_product(loss_fn: LossFn, params: PyTree, batch: PyTree, v: PyTree) -> PyTree:
  """∇²L(w) v by forward-over-reverse differentiation (jvp of grad); same structure as params."""
  grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
  return jax.jvp(grad_fn, (params,), (v,))[1]


def _power_iteration(hvp: Callable[[PyTree], PyTree], params: PyTree, rng, num_iters: int):
  v = _random_like(rng, params, jax.random.normal)
  v = optax.tree.scale(_safe_inv(optax.tree.norm(v)), v)

  def body(_, carry):
    v, _ = carry
    hv = hvp(v)
    eig = optax.tree.vdot(v, hv)  # Rayleigh quotient of the current unit vector v.
    return optax.tree.scale(_safe_inv(optax.tree.norm(hv)), hv), (v, eig)

  init = (v, (v, jnp.zeros_like(optax.tree.vdot(v, v))))
  _, (vec, eig) = jax.lax.fori_loop(0, num_iters, body, init)
  return eig, vec


def _lanczos(hvp: Callable[[PyTree], PyTree], params: PyTree, rng, num_iters: int):
  flat, unravel = ravel_pytree(params)
  dim = flat.shape[0]
  k = min(num_iters, dim)  # a Krylov basis cannot be longer than the dimension.
  dtype = flat.dtype
  flat_hvp = lambda x: ravel_pytree(hvp(unravel(x)))[0]

  def orthonormalise(w, basis):
    # Full re-orthogonalisation against the stored basis (unfilled rows are zero), done twice
    # ("twice is enough") so that the tridiagonal matrix stays faithful in float32.
    for _ in range(2):
      w = w - jnp.matmul(basis.T, jnp.matmul(basis, w, precision=_HIGHEST), precision=_HIGHEST)
    return w

  v0 = jax.random.normal(rng, (dim,), dtype)
  # k + 1 rows so that step j can always store v_{j+1}; rows not yet filled are zero.
  basis = jnp.zeros((k + 1, dim), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
  alphas = jnp.zeros((k,), dtype)
  betas = jnp.zeros((k,), dtype)  # betas[j] couples v_j and v_{j+1}.

  def body(j, carry):
    basis, alphas, betas = carry
    v = basis[j]
    w = flat_hvp(v)
    hv_norm = jnp.linalg.norm(w)
    alpha = jnp.sum(v * w)
    w = orthonormalise(w, basis)
    beta = jnp.linalg.norm(w)
    # Breakdown (an invariant Krylov subspace, e.g. Hv = 0): restart with a new direction
    # orthogonal to the basis and decouple the blocks of T (beta = 0), so every Ritz value stays
    # a genuine eigenvalue estimate. The coordinate vector e_i least covered by the basis has
    # ‖(I − VᵀV) e_i‖² ≥ 1 − (j+1)/dim > 0, and needs no PRNG call inside the loop.
    breakdown = beta <= 100 * jnp.finfo(dtype).eps * hv_norm

    def restart(_):
      coverage = jnp.sum(basis * basis, axis=0)
      e = orthonormalise(jax.nn.one_hot(jnp.argmin(coverage), dim, dtype=dtype), basis)
      return e * _safe_inv(jnp.linalg.norm(e))

    nxt = jax.lax.cond(breakdown, restart, lambda _: w * _safe_inv(beta), None)
    beta = jnp.where(breakdown, 0.0, beta)
    return basis.at[j + 1].set(nxt), alphas.at[j].set(alpha), betas.at[j].set(beta)

  basis, alphas, betas = jax.lax.fori_loop(0, k, body, (basis, alphas, betas))
  tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
  evals, evecs = jnp.linalg.eigh(tri)
  vec = jnp.matmul(basis[:k].T, evecs[:, -1], precision=_HIGHEST)
  return evals[-1], unravel(vec * _safe_inv(jnp.linalg.norm(vec)))


def _top_eigenvalue(hvp, params, rng, num_iters, method, return_vector):
  _check_params(params)
  _check_positive_int("num_iters", num_iters)
  if method not in EIGEN_METHODS:
    raise ValueError(f"method: expected one of {EIGEN_METHODS}, got {method!r}")
  fn = _power_iteration if method == "power" else _lanczos
  eig, vec = fn(hvp, params, rng, num_iters)
  return (eig, vec) if return_vector else eig


def hessian_top_eigenvalue(loss_fn: LossFn, params: PyTree, batch: PyTree, rng: jax.Array, *,
                           num_iters: int = 20, method: str = "power",
                           return_vector: bool = False):
  """Top Hessian eigenvalue of `loss_fn` at `params` from `num_iters` Hessian-vector products.

  method:
    'power': power iteration from a random unit vector; converges to the eigenvalue of largest
      *magnitude* (which may be negative at a saddle), at rate |λ₂/λ₁| per iteration. Returns the
      Rayleigh quotient of the last iterate and that unit vector.
    'lanczos': `num_iters` Lanczos steps (capped at the parameter count) with full
      re-orthogonalisation, then the largest *algebraic* Ritz value of the tridiagonal matrix
      and its Ritz vector. Much faster convergence; stores a num_iters × num_params basis, so
      prefer 'power' when that does not fit in memory.

  Returns:
    The eigenvalue (scalar), or `(eigenvalue, vector)` with a unit-norm vector shaped like
    `params` when `return_vector`.
  """
  hvp = lambda v: hessian_vector_product(loss_fn, params, batch, v)
  return _top_eigenvalue(hvp, params, rng, num_iters, method, return_vector)


def _hutchinson(hvp, params, rng, num_samples, chunk_size):
  _check_params(params)
  _check_positive_int("num_samples", num_samples)

  def quad_form(key):
    z = _random_like(key, params, jax.random.rademacher)
    return optax.tree.vdot(z, hvp(z))

  return jnp.mean(_map(quad_form, jax.random.split(rng, num_samples), chunk_size))


def hessian_trace(loss_fn: LossFn, params: PyTree, batch: PyTree, rng: jax.Array, *,
                  num_samples: int = 32, chunk_size: int | None = None) -> jax.Array:
  """Hutchinson estimate mean_i zᵢᵀ ∇²L(w) zᵢ of tr ∇²L(w), zᵢ Rademacher (±1) probes.

  Unbiased, with variance 2(‖H‖²_F − Σ H_jj²)/num_samples (exact for a diagonal Hessian). The
  probes are vmapped, or evaluated `chunk_size` at a time to bound memory.
  """
  hvp = lambda v: hessian_vector_product(loss_fn, params, batch, v)
  return _hutchinson(hvp, params, rng, num_samples, chunk_size)


# ----------------------------------------------------------------------------------------------
# Reporting.


def relative_change(value, reference):
  """`(value − reference) / |reference|`, e.g. −0.42 for "−42% vs full fine-tuning".

  Works leafwise on matching pytrees (e.g. two `sharpness_report` dicts). Python / NumPy inputs
  give Python floats (or NumPy arrays); jax arrays stay jax arrays (jit-friendly). A zero
  reference gives ±inf / nan, as IEEE division does.
  """

  def leaf(v, r):
    if isinstance(v, jax.Array) or isinstance(r, jax.Array):
      return (v - r) / jnp.abs(r)
    v, r = np.asarray(v, np.float64), np.asarray(r, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
      out = (v - r) / np.abs(r)
    return float(out) if out.ndim == 0 else out

  return jax.tree_util.tree_map(leaf, value, reference)


def default_config() -> ml_collections.ConfigDict:
  """Settings of `sharpness_report` (every key optional; unknown keys are an error).

  measures: names from MEASURES, a comma-separated string (a tuple is accepted in a plain dict).
  rho / sam_steps / m: SAM radius, ascent steps, m-sharpness sub-batch size (0 = whole batch).
  asam_rho / asam_steps / eta: ASAM radius (the ASAM paper's CIFAR value 0.5; the T_w-scaled ball
    needs a larger ρ than SAM's), steps and η.
  sigma / num_samples / antithetic: average sharpness (antithetic: ±ε pairs, see
    `average_sharpness`). eig_iters / eig_method: Hessian top eigenvalue.
  trace_samples: Hutchinson probes. chunk_size: vmap chunk for the sampled measures (0 = all).
  """
  return ml_collections.ConfigDict(dict(
      measures="sam,average,hessian_eig,hessian_trace",
      rho=0.05, sam_steps=1, m=0,
      asam_rho=0.5, asam_steps=1, eta=0.01,
      sigma=0.01, num_samples=8, antithetic=False,
      eig_iters=20, eig_method="lanczos",
      trace_samples=32,
      chunk_size=0,
  ))


def check_config(cfg, key: str) -> None:
  """Raises the settings' ValueError at start-up, naming them as the config does (`key`)."""
  try:
    _normalise_config(cfg)
  except ValueError as e:
    raise ValueError(str(e).replace("cfg", key, 1)) from None


def _normalise_config(cfg) -> tuple:
  out = default_config().to_dict()
  if cfg is not None:
    items = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    unknown = sorted(set(items) - set(out))
    if unknown:
      raise ValueError(f"cfg: unknown keys {unknown} (known keys: {sorted(out)})")
    out.update(items)
  measures = out["measures"]
  if isinstance(measures, str):
    measures = [s.strip() for s in measures.split(",") if s.strip()]
  measures = tuple(measures)
  bad = [x for x in measures if x not in MEASURES]
  if bad or not measures:
    raise ValueError(f"cfg.measures: expected a non-empty subset of {MEASURES}, got {measures!r}")
  out["measures"] = measures
  if out["eig_method"] not in EIGEN_METHODS:
    raise ValueError(f"cfg.eig_method: expected one of {EIGEN_METHODS}, got {out['eig_method']!r}")
  if not isinstance(out["antithetic"], bool):
    raise ValueError(f"cfg.antithetic: expected a bool, got {out['antithetic']!r}")
  if out["antithetic"] and out["num_samples"] % 2:
    raise ValueError("cfg.num_samples: expected an even number with antithetic, got "
                     f"{out['num_samples']!r}")
  for key in ("sam_steps", "asam_steps", "num_samples", "eig_iters", "trace_samples"):
    _check_positive_int(f"cfg.{key}", out[key])
  for key in ("m", "chunk_size"):
    if isinstance(out[key], bool) or not isinstance(out[key], (int, np.integer)) or out[key] < 0:
      raise ValueError(f"cfg.{key}: expected a non-negative int (0 = off), got {out[key]!r}")
  for key in ("rho", "asam_rho", "eta", "sigma"):
    _check_nonnegative(f"cfg.{key}", out[key])
  return tuple(sorted(out.items()))


def _split_static(tree) -> tuple[list, tuple]:
  """Splits a pytree (e.g. a `Partial` loss) into array leaves and a hashable static rest."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  is_array = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]
  dynamic = [x for x, a in zip(leaves, is_array) if a]
  static = (treedef, tuple(is_array), tuple(x for x, a in zip(leaves, is_array) if not a))
  return dynamic, static


def _merge_static(dynamic: list, static: tuple):
  treedef, is_array, rest = static
  dynamic, rest = iter(dynamic), iter(rest)
  return jax.tree_util.tree_unflatten(treedef, [next(dynamic) if a else next(rest)
                                                for a in is_array])


@functools.partial(jax.jit, static_argnames=("loss_static", "cfg"))
def _report(loss_dynamic, params, stacked, rng, loss_static: tuple, cfg: tuple):
  loss_fn = _merge_static(loss_dynamic, loss_static)
  c = dict(cfg)
  chunk = c["chunk_size"] or None
  m = c["m"] or None
  num_batches = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  keys = dict(zip(MEASURES, jax.random.split(rng, len(MEASURES))))
  out = {}

  def per_batch(fn, key=None):
    # lax.map over batches: memory of one batch at a time, one compiled body.
    if key is None:
      return jnp.mean(jax.lax.map(fn, stacked))
    batch_keys = jax.random.split(key, num_batches)
    return jnp.mean(jax.lax.map(lambda xs: fn(*xs), (stacked, batch_keys)))

  out["loss"] = per_batch(lambda b: loss_fn(params, b))
  if "sam" in c["measures"]:
    out["sam_sharpness"] = per_batch(lambda b: sam_sharpness(
        loss_fn, params, b, rho=c["rho"], steps=c["sam_steps"], m=m))
  if "asam" in c["measures"]:
    out["asam_sharpness"] = per_batch(lambda b: sam_sharpness(
        loss_fn, params, b, rho=c["asam_rho"], steps=c["asam_steps"], m=m, adaptive=True,
        eta=c["eta"]))
  if "average" in c["measures"]:
    out["average_sharpness"] = per_batch(lambda b, k: average_sharpness(
        loss_fn, params, b, k, sigma=c["sigma"], num_samples=c["num_samples"], chunk_size=chunk,
        antithetic=c["antithetic"]),
        keys["average"])

  # Hessian measures are of the loss averaged over all batches (as PyHessian does): its HVP is
  # the mean of per-batch HVPs, accumulated one batch at a time.
  def full_hvp(v):
    hvps = jax.lax.map(lambda b: hessian_vector_product(loss_fn, params, b, v), stacked)
    return jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), hvps)

  if "hessian_eig" in c["measures"]:
    out["hessian_top_eigenvalue"] = _top_eigenvalue(
        full_hvp, params, keys["hessian_eig"], c["eig_iters"], c["eig_method"], False)
  if "hessian_trace" in c["measures"]:
    out["hessian_trace"] = _hutchinson(full_hvp, params, keys["hessian_trace"],
                                       c["trace_samples"], chunk)
  return out


def sharpness_report(loss_fn: LossFn, params: PyTree, batches: Sequence[PyTree], rng: jax.Array,
                     cfg: Mapping[str, Any] | ml_collections.ConfigDict | None = None
                     ) -> dict[str, float]:
  """Evaluates the measures `cfg.measures` on a fixed list of batches (one jitted call).

  Args:
    loss_fn: eval-mode `loss_fn(params, batch) -> scalar` (see the module docstring). Pass a
      `jax.tree_util.Partial(f, *args)` with a fixed `f`: its array arguments (e.g. `batch_stats`)
      are traced and its other arguments (a Flax module, constants) must be hashable and are
      static, so repeated calls reuse the compilation. Any other callable is static (hashed by
      identity: a new closure per call recompiles).
    params: the parameter pytree.
    batches: a non-empty sequence of batch pytrees of identical structure and shapes (they are
      stacked), e.g. a fixed probe set drawn once at the start of training.
    rng: PRNG key; the same key gives the same numbers.
    cfg: overrides of `default_config()`.

  Returns:
    A flat dict of Python floats: `loss` (mean over batches), and for the selected measures
    `sam_sharpness`, `asam_sharpness`, `average_sharpness` (each the mean of the per-batch
    values), `hessian_top_eigenvalue`, `hessian_trace` (of the Hessian of the mean loss over
    all batches).
  """
  cfg_items = _normalise_config(cfg)
  if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence) or not batches:
    raise ValueError("batches: expected a non-empty sequence (list/tuple) of batch pytrees")
  if not jax.tree_util.tree_leaves(batches[0]):
    raise ValueError("batches: expected each batch to be a pytree with at least one array leaf")
  structures = {jax.tree_util.tree_structure(b) for b in batches}
  if len(structures) != 1:
    raise ValueError("batches: expected every batch to have the same pytree structure")
  shapes = {tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree_util.tree_leaves(b))
            for b in batches}
  if len(shapes) != 1:
    raise ValueError("batches: expected every batch to have the same leaf shapes and dtypes "
                     "(drop the remainder batch)")
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *batches)
  # Array arguments of a `Partial` loss are traced, everything else (the function, a Flax
  # module, Python constants) is static, so new `batch_stats` reuse the compilation.
  loss_dynamic, loss_static = _split_static(
      loss_fn if isinstance(loss_fn, jax.tree_util.Partial) else jax.tree_util.Partial(loss_fn))
  try:
    hash(loss_static)
  except TypeError as e:
    raise ValueError(f"loss_fn: the non-array arguments of a Partial loss must be hashable ({e})")
  out = _report(loss_dynamic, params, stacked, rng, loss_static=loss_static, cfg=cfg_items)
  return {k: float(v) for k, v in jax.device_get(out).items()}
