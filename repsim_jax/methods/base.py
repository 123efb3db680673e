"""The method interface (see `repsim_jax.methods`) and helpers shared by methods."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from repsim_jax import parallel, similarity

# Parameters of the backbone: everything of the model except its classifier.
BACKBONE = r"^model/(?!head/)"


LAMBDA = ("lam", "lam_schedule", "lam_warmup_steps")


class Method:
  name = "full_ft"
  needs_reference = False
  reference_forward = False
  uses: tuple[str, ...] = ()  # the config.method keys it reads besides `name`
  summary = "every parameter trains"  # one line for `python -m repsim_jax.catalog`

  def __init__(self, cfg=None):
    self.cfg = cfg

  def init_params(self, rng, variables, batches, apply_fn) -> dict:
    del rng, variables, batches, apply_fn
    return {}

  def loss(self, params, reps, ref_reps, ref_variables, step):
    del params, reps, ref_reps, ref_variables, step
    return jnp.zeros((), jnp.float32), {}

  def diagnostics(self, params, reps, ref_reps) -> dict:
    """Scalars that watch the method (not differentiated); the step computes them only on the
    steps the host logs, so they may cost what a training step should not."""
    del params, reps, ref_reps
    return {}

  def optimizer(self, make_tx, params) -> optax.GradientTransformation:
    del params
    return make_tx()

  def gradients(self, grad_fn, params):
    """`grad_fn(params) -> (grads, aux)`; returns globally averaged gradients and aux."""
    grads, aux = grad_fn(params)
    return parallel.pmean(grads), aux

  def bn_train(self, step):
    del step
    return True


def lam_at(cfg, step):
  """λ at `step`: constant, or linearly warmed up over `lam_warmup_steps`."""
  if cfg.lam_schedule == "constant" or not cfg.lam_warmup_steps:
    return jnp.asarray(cfg.lam, jnp.float32)
  if cfg.lam_schedule == "warmup":
    return cfg.lam * jnp.minimum(1.0, step.astype(jnp.float32) / cfg.lam_warmup_steps)
  raise ValueError(f"config.method.lam_schedule={cfg.lam_schedule!r}: expected constant | warmup")


def pool(rep):
  """(N, D) features of a representation, pooled as the similarity analysis pools them."""
  return similarity.pool_features(rep.astype(jnp.float32))


def gather(x):
  """All-gathers a per-device (n, ...) array into the global batch (N, ...), same order everywhere."""
  return jax.lax.all_gather(x, parallel.AXIS, tiled=True)


def normalize(f):
  """Centres over the batch and divides by the Frobenius norm (DESIGN §1)."""
  f = f - f.mean(axis=0, keepdims=True)
  return f / jnp.maximum(jnp.linalg.norm(f), 1e-12)


def layer_weights(cfg) -> dict[str, float]:
  layers = tuple(cfg.layers)
  weights = tuple(cfg.layer_weights) or (1.0,) * len(layers)
  if len(weights) != len(layers):
    raise ValueError(f"config.method.layer_weights: expected {len(layers)} weights (one per layer "
                     f"in config.method.layers), got {len(weights)}")
  return dict(zip(layers, weights))


def check_layers(cfg, reps) -> None:
  missing = [l for l in cfg.layers if l not in reps]
  if missing:
    raise ValueError(f"config.method.layers: {missing[0]!r} is not a representation of this model "
                     f"(has {list(reps)})")
