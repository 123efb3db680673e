"""Fine-tuning methods, all one config switch apart (`config.method.name`).

A method is a loss term plus an optimiser transform. The trainer asks it for
  * `init_params(rng, variables, batches, apply_fn)`: extra trainable parameters (RepSim's Q),
    stored under `params['method']` beside the model's `params['model']`; `apply_fn(variables,
    images)` is the model in eval mode, `(logits, representations)`;
  * `loss(params, reps, ref_reps, ref_variables, step)`: a term added to the task loss, with
    metrics; it runs inside the jitted per-device step, where `parallel.AXIS` is bound;
  * `optimizer(make_tx, params)`: the optax transform (freezing, Stiefel leaves, phases);
  * `gradients(grad_fn, params)`: how gradients are taken (SAM/ASAM ascend first);
  * `bn_train(step)`: whether BatchNorm uses batch statistics (linear probing keeps the
    backbone, statistics included, exactly as pretrained);
  * `needs_reference` / `reference_forward`: keep the frozen pretrained variables in the state /
    also run the frozen model on every batch.
"""

from __future__ import annotations

from repsim_jax import config_lib
from repsim_jax.methods.base import BACKBONE, Method
from repsim_jax.methods.baselines import (BSS, DELTA, L2SP, SAM, FullFineTuning, LinearProbe,
                                          LPFT)
from repsim_jax.methods.repsim import Q_MODES, RepSim

METHODS = {m.name: m for m in (FullFineTuning, LinearProbe, LPFT, L2SP, DELTA, BSS, SAM, RepSim)}
METHODS["asam"] = SAM  # SAM with adaptive=True (the method reads its own name).


def get_method(cfg) -> Method:
  if cfg.name not in METHODS:
    raise ValueError(f"config.method.name={cfg.name!r}: expected one of {sorted(METHODS)}")
  return METHODS[cfg.name](cfg)


def unused_keys(cfg) -> list[str]:
  """config.method keys set away from their defaults that the chosen method does not read."""
  method, defaults = get_method(cfg), config_lib.method_config(cfg.name)
  norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
  return [k for k in cfg.keys() if k != "name" and k not in method.uses and k in defaults
          and norm(cfg[k]) != norm(defaults[k])]


__all__ = ["BACKBONE", "METHODS", "Method", "Q_MODES", "get_method", "unused_keys"]
