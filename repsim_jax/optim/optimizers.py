"""Builds the optax optimiser a config asks for.

`config.optim`: name (sgd | momentum | adam | adamw | lars), lr, momentum, nesterov, b1, b2,
weight_decay, clip_norm, schedule (constant | cosine), warmup_steps, lr_mults (tuple of
(regex, multiplier) pairs, first match wins) and freeze (regex; matching leaves get no update and
no optimiser state). Regexes are matched with `re.search` against '/'-joined parameter paths,
e.g. 'model/layer4_1/conv2/kernel'.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax



def path_str(path) -> str:
  """'model/head/kernel': the '/'-joined names of a `jax.tree_util` key path."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def tree_paths(tree):
  """Same-structure tree of '/'-joined path strings."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree)


def _constant(cfg, num_steps):
  del num_steps
  if cfg.warmup_steps:
    return _scaled(cfg.lr, optax.linear_schedule(0.0, 1.0, cfg.warmup_steps))
  return optax.constant_schedule(cfg.lr)


def _cosine(cfg, num_steps):
  return _scaled(cfg.lr, optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=1.0, warmup_steps=cfg.warmup_steps,
      decay_steps=max(num_steps, cfg.warmup_steps + 1), end_value=0.0))


def _scaled(lr, shape: optax.Schedule) -> optax.Schedule:
  # lr x a unit-peak shape, so that lr may be a traced per-member value (population training),
  # which optax's schedules, branching on their values in Python, do not accept.
  return lambda count: lr * shape(count)


# config.optim.schedule -> (cfg, num_steps) -> schedule; the keys are the valid names.
SCHEDULES = {"constant": _constant, "cosine": _cosine}

# config.optim.name -> (cfg, learning rate or schedule) -> the base transform.
OPTIMIZERS = {
    "sgd": lambda cfg, lr: optax.sgd(lr),
    "momentum": lambda cfg, lr: optax.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov),
    "adam": lambda cfg, lr: optax.adam(lr, b1=cfg.b1, b2=cfg.b2),
    "adamw": lambda cfg, lr: optax.adamw(lr, b1=cfg.b1, b2=cfg.b2,
                                         weight_decay=cfg.weight_decay, mask=_decay_mask),
    "lars": lambda cfg, lr: lars(lr, cfg.weight_decay, cfg.momentum, cfg.nesterov),
}


def scale_by_trust_ratio(trust_coefficient: float = 0.001) -> optax.GradientTransformation:
  """LARS' layer-wise scale: u * c ||w|| / ||u|| (1 where either norm is 0).

  `optax.scale_by_trust_ratio` with each norm taken once: optax's `safe_norm` takes two per
  leaf so that it can be differentiated, which an optimiser step never is, and on CPU those
  reductions over every weight were a tenth of a ResNet SSL step (benchmarks/ssl_step.py).
  """

  def update_fn(updates, state, params):
    def scale(u, p):
      pn, un = jnp.linalg.norm(p), jnp.linalg.norm(u)
      ratio = jnp.where((pn == 0) | (un == 0), 1.0, trust_coefficient * pn / un)
      return u * ratio.astype(u.dtype)
    return jax.tree.map(scale, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def lars(lr, weight_decay: float, momentum: float, nesterov: bool = False):
  """SimCLR's LARS (as `optax.lars`): weight decay and the trust ratio on weights only (not
  biases or norm scales), then the learning rate and momentum."""
  return optax.chain(optax.add_decayed_weights(weight_decay, mask=_decay_mask),
                     optax.masked(scale_by_trust_ratio(), _decay_mask),
                     optax.scale_by_learning_rate(lr),
                     optax.trace(decay=momentum, nesterov=nesterov))


def learning_rate_schedule(cfg, num_steps: int) -> optax.Schedule:
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={cfg.schedule!r}: expected one of {list(SCHEDULES)}")
  return SCHEDULES[cfg.schedule](cfg, num_steps)


def _base(cfg, lr) -> optax.GradientTransformation:
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f"config.optim.name={cfg.name!r}: expected one of {list(OPTIMIZERS)}")
  return OPTIMIZERS[cfg.name](cfg, lr)


def _is_zero(x) -> bool:
  return isinstance(x, (int, float)) and x == 0


def _decay_mask(params):
  # Decay weights, not biases or norm scales (the usual convention: ndim > 1).
  return jax.tree.map(lambda x: x.ndim > 1, params)


def _first_match(rules, default):
  """path -> value of the first (compiled regex, value) rule whose regex is found in the path."""
  def fn(path, _):
    p = path_str(path)
    for rx, value in rules:
      if rx.search(p):
        return value
    return default
  return fn


def scale_by_multipliers(rules) -> optax.GradientTransformation:
  """Multiplies update leaves by the first matching (regex, multiplier) rule (else 1).

  Per-parameter-group learning rates: for SGD and Adam alike, scaling the final update by m is
  the same as scaling that group's learning rate by m. Paths are resolved at update time, so the
  transform also works inside `optax.partition` (masked leaves are skipped).
  """
  compiled = [(re.compile(rx), float(m)) for rx, m in rules]

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    mult = _first_match(compiled, 1.0)
    return jax.tree_util.tree_map_with_path(
        lambda p, u: u * jnp.asarray(mult(p, u), u.dtype), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(cfg, num_steps: int, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (tx, schedule); `params` (the trainable pytree) is used to check the regexes."""
  schedule = learning_rate_schedule(cfg, num_steps)
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  # A traced weight decay (population members that differ in it) counts as set: adding 0·w
  # to the gradient is exact.
  if not _is_zero(cfg.weight_decay) and cfg.name not in ("adamw", "lars"):
    # Coupled L2 for SGD (torchvision recipes); adamw and lars apply their own.
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask))
  parts.append(_base(cfg, schedule))
  if cfg.lr_mults:
    parts.append(scale_by_multipliers(cfg.lr_mults))
  tx = optax.chain(*parts)
  if cfg.freeze:
    tx = freeze(tx, params, cfg.freeze)
  return tx, schedule


def freeze(tx: optax.GradientTransformation, params, regex: str) -> optax.GradientTransformation:
  """Leaves whose path matches `regex` get zero updates and no optimiser state."""
  label = _first_match([(re.compile(regex), "frozen")], "trainable")
  labels = lambda tree: jax.tree_util.tree_map_with_path(label, tree)  # noqa: E731
  if all(l == "frozen" for l in jax.tree.leaves(labels(params))):
    raise ValueError(f"config.optim.freeze={regex!r} freezes every parameter")
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
