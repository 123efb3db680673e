"""Self-supervised losses (DESIGN §8): pure, jit/vmap-friendly, computed in float32.

Each takes the embeddings of one batch; in the data-parallel step the caller all-gathers what
must be global (SimCLR's negatives) before calling, so the same function is the single-device
loss and the global-batch one.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def _l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def nt_xent(z1, z2, temperature: float = 0.1):
  """SimCLR's NT-Xent. z1, z2: (n, d) embeddings of two views of the same n examples, L2
  normalised here. Each of the 2n embeddings is an anchor whose positive is its other view and
  whose negatives are the other 2n - 2; returns the mean over the 2n anchors of -log softmax."""
  z = _l2_normalize(jnp.concatenate([z1, z2], axis=0))
  n = z1.shape[0]
  logits = (z @ z.T) / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)  # an anchor is not its own pair
  positive = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  log_prob = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_prob, positive[:, None], axis=-1))


def byol_loss(p, z):
  """BYOL's regression loss: the batch mean of 2 - 2 cos(p, z); z (the target's projection) is
  not differentiated."""
  p = _l2_normalize(p)
  z = _l2_normalize(jax.lax.stop_gradient(z))
  return jnp.mean(2.0 - 2.0 * jnp.sum(p * z, axis=-1))


def dino_loss(student: Sequence[jax.Array], teacher: Sequence[jax.Array], center,
              student_temp: float = 0.1, teacher_temp: float = 0.04):
  """DINO's cross-entropy. `teacher`: T arrays (n, K) of the global views; `student`: S >= T
  arrays (n, K) whose first T are the same global views. For every pair (t, s) with s != t: the
  cross-entropy between softmax((teacher_t - center) / teacher_temp) (not differentiated) and
  log_softmax(student_s / student_temp), averaged over the batch; returns the mean over pairs."""
  if len(student) < len(teacher):
    raise ValueError(f"student: expected at least the {len(teacher)} teacher views, got "
                     f"{len(student)}")
  targets = [jax.nn.softmax((jax.lax.stop_gradient(t).astype(jnp.float32) - center)
                            / teacher_temp, axis=-1) for t in teacher]
  log_probs = [jax.nn.log_softmax(s.astype(jnp.float32) / student_temp, axis=-1) for s in student]
  terms = [jnp.mean(-jnp.sum(q * lp, axis=-1))
           for t, q in enumerate(targets) for s, lp in enumerate(log_probs) if s != t]
  return sum(terms) / len(terms)


def dino_center(center, teacher: Sequence[jax.Array], momentum: float = 0.9, batch_mean=None):
  """The centre's EMA update from the teacher outputs' batch mean (`batch_mean` overrides it,
  e.g. with the global batch's mean in the data-parallel step)."""
  if batch_mean is None:
    batch_mean = jnp.mean(jnp.concatenate(teacher, axis=0).astype(jnp.float32), axis=0,
                          keepdims=True)
  return center * momentum + batch_mean * (1.0 - momentum)
