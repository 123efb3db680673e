"""RepSim: keep the fine-tuned representation close to the pretrained one up to a rotation.

For each regularised layer, with F (fine-tuned) and P (frozen pretrained) features of the *global*
batch, centred and Frobenius-normalised, the term is `‖F Q − P‖²_F` (DESIGN §1). Similarity
measures such as linear CKA cannot see orthogonal transforms, so penalising the distance modulo Q
keeps what they measure while leaving the network free to rotate its features.

`q_mode`:
  learned     Q trainable on the Stiefel manifold (Riemannian SGD/Adam, `optim.stiefel`);
  procrustes  Q = U Vᵀ of svd(Fᵀ P) each step, gradient stopped (envelope theorem: exact),
              from an n × n SVD when the batch has fewer examples than features;
  identity    Q = I (normalised feature distillation: the no-invariance baseline);
  covariance  ‖Qᵀ C_F Q − C_P‖² with C_P fixed from the pretrained model at start (no per-step
              pretrained forward pass);
  cka         1 − linear CKA(F, P).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from repsim_jax import similarity
from repsim_jax.methods.base import LAMBDA, Method, check_layers, gather, lam_at, layer_weights, normalize, pool
from repsim_jax.optim import stiefel

Q_MODES = ("learned", "procrustes", "identity", "covariance", "cka")
Q_KEY = "repsim_q"       # method params holding Q per layer (on the Stiefel manifold)
COV_KEY = "repsim_cov"   # fixed pretrained covariances (covariance mode; never updated)


def _full_float32(fn):
  """Traces `fn` with full-float32 matmuls. The term's products are small (n × d, d × d), so this
  costs nothing, while GPUs' default TF32 puts ~2e-4 relative error on the term and Q's gradient."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)

  return wrapped


class RepSim(Method):
  name = "repsim"
  summary = "‖F Q − P‖² to the pretrained features, modulo an orthogonal Q (q_mode)"
  needs_reference = True

  def __init__(self, cfg):
    super().__init__(cfg)
    if cfg.q_mode not in Q_MODES:
      raise ValueError(f"config.method.q_mode={cfg.q_mode!r}: expected one of {list(Q_MODES)}")
    self.weights = layer_weights(cfg)
    self.uses = (*LAMBDA, "layers", "layer_weights", "q_mode")
    if cfg.q_mode in ("learned", "covariance"):
      self.uses += ("q_init", "q_optimizer", "q_lr", "retraction", "init_batches")
      if cfg.q_optimizer == "sgd":
        self.uses += ("q_momentum",)
    self.reference_forward = cfg.q_mode != "covariance"
    self.needs_reference = self.reference_forward

  # -- parameters -------------------------------------------------------------------------------
  def init_params(self, rng, variables, batches, apply_fn) -> dict:
    del rng
    if self.cfg.q_mode not in ("learned", "covariance"):
      return {}
    feats = [apply_fn(variables, b["image"])[1] for b in batches]
    check_layers(self.cfg, feats[0])
    out = {Q_KEY: {}}
    for layer in self.weights:
      p = np.concatenate([np.asarray(pool(f[layer])) for f in feats])
      d = p.shape[1]
      if self.cfg.q_init == "procrustes":
        # F = P at the start of fine-tuning (same weights), so the first-batch solution is ~I; it
        # differs when the head or BatchNorm mode differ, and for warm starts from other runs.
        f = np.asarray(pool(apply_fn(variables, batches[0]["image"])[1][layer]))
        out[Q_KEY][layer] = stiefel.procrustes_init(normalize(f), normalize(p[: len(f)]))
      elif self.cfg.q_init == "identity":
        out[Q_KEY][layer] = stiefel.identity_init(d, d)
      else:
        raise ValueError(f"config.method.q_init={self.cfg.q_init!r}: expected identity | procrustes")
      if self.cfg.q_mode == "covariance":
        pn = normalize(jnp.asarray(p))
        out.setdefault(COV_KEY, {})[layer] = pn.T @ pn
    return jax.tree.map(np.asarray, out)

  def optimizer(self, make_tx, params):
    if Q_KEY not in params.get("method", {}):
      return make_tx()
    c = self.cfg
    if c.q_optimizer == "sgd":
      q_tx = stiefel.stiefel_sgd(c.q_lr, momentum=c.q_momentum, method=c.retraction)
    elif c.q_optimizer == "adam":
      q_tx = stiefel.stiefel_adam(c.q_lr, method=c.retraction)
    else:
      raise ValueError(f"config.method.q_optimizer={c.q_optimizer!r}: expected sgd | adam")
    labels = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda p, _: _label(p), tree)
    return optax.multi_transform({"q": q_tx, "fixed": optax.set_to_zero(), "rest": make_tx()},
                                 labels)

  # -- the regulariser ----------------------------------------------------------------------------
  @_full_float32
  def loss(self, params, reps, ref_reps, ref_variables, step):
    del ref_variables
    mode = self.cfg.q_mode
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for layer, w in self.weights.items():
      f = normalize(gather(pool(reps[layer])))
      if mode == "covariance":
        q = params["method"][Q_KEY][layer]
        c_p = params["method"][COV_KEY][layer]
        # Qᵀ C_F Q with C_F = FᵀF, formed as (FQ)ᵀ(FQ): O(n·d²) instead of two d³ products.
        fq = f @ q
        term = jnp.sum((fq.T @ fq - c_p) ** 2)
      else:
        p = normalize(gather(pool(ref_reps[layer])))
        if mode == "learned":
          q = params["method"][Q_KEY][layer]
          term = jnp.sum((f @ q - p) ** 2)
        elif mode == "procrustes":
          term = procrustes_term(f, p)
        elif mode == "identity":
          term = jnp.sum((f - p) ** 2)
        else:  # cka
          term = 1.0 - similarity.linear_cka(f, p)
      metrics[f"repsim/{layer}"] = jax.lax.stop_gradient(term)
      total = total + w * term
    return lam_at(self.cfg, step) * total, metrics

  @_full_float32
  def diagnostics(self, params, reps, ref_reps):
    """Linear CKA of each regularised layer to the pretrained model (global batch) and ‖QᵀQ − I‖
    of its Q (a d³ product the term does not need)."""
    out = {}
    for layer in self.weights:
      if ref_reps is not None:
        f, p = (gather(pool(r[layer])) for r in (reps, ref_reps))
        out[f"cka/{layer}"] = similarity.linear_cka(f, p)
      if Q_KEY in params["method"]:
        out[f"orth_err/{layer}"] = stiefel.orthogonality_error(params["method"][Q_KEY][layer])
    return out


@_full_float32
def procrustes_q(f, p):
  """argmin_Q ‖F Q − P‖ over QᵀQ = I: U Vᵀ from the SVD of Fᵀ P."""
  u, _, vt = jnp.linalg.svd(f.T @ p, full_matrices=False)
  return u @ vt


@_full_float32
def procrustes_term(f, p):
  """‖F Q − P‖² at Q = `procrustes_q(f, p)`, gradient stopped through Q (envelope theorem).

  With fewer examples than features (n < d, the usual per-step case: 32-256 examples, 512-2048
  features) FᵀP has rank ≤ n. With thin QRs Fᵀ = A R_a and Pᵀ = B R_b, FᵀP = A (R_a R_bᵀ) Bᵀ,
  so U = A u and V = B v from the SVD u s vᵀ of the n × n core. F Q = (F U) Vᵀ for every Q that
  completes U Vᵀ (F's rows lie in span A = span U), and P V⊥ = 0, so value and gradient equal the
  d × d route's: O(d·n²) instead of a d × d SVD per step (27 ms for d = 512 on an H100).
  """
  n = f.shape[0]
  if n >= min(f.shape[1], p.shape[1]):
    q = _one_at_a_time(procrustes_q)(jax.lax.stop_gradient(f), jax.lax.stop_gradient(p))
    return jnp.sum((f @ q - p) ** 2)
  big_u, big_v = _one_at_a_time(_procrustes_bases)(jax.lax.stop_gradient(f),
                                                   jax.lax.stop_gradient(p))
  return jnp.sum(((f @ big_u) @ big_v.T - p) ** 2)


def _procrustes_bases(f, p):
  a, r_a = jnp.linalg.qr(f.T)
  b, r_b = jnp.linalg.qr(p.T)
  u, _, vt = jnp.linalg.svd(r_a @ r_b.T)
  return a @ u, b @ vt.T


# Under vmap (population training), one member at a time: batched LAPACK calls of several
# XLA:CPU devices at once deadlock in jaxlib's batch thread pool. Not differentiable, so only
# for values the loss stops gradients through.
_one_at_a_time = jax.custom_batching.sequential_vmap


def _label(path) -> str:
  from repsim_jax.optim.optimizers import path_str
  s = path_str(path)
  if s.startswith(f"method/{Q_KEY}/"):
    return "q"
  if s.startswith(f"method/{COV_KEY}/"):
    return "fixed"
  return "rest"
