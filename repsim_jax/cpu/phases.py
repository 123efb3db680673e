"""Stride phases: the backward pass of a strided window op, one input phase at a time.

With stride s and low padding pad_lo, input row h = s·a + p (phase p ∈ [0, s)) is read by
output row a + d through window tap i exactly when d = (p + pad_lo − i) / s is whole. So the
gradient of each phase gathers from a few shifted copies of the output gradient, and the phases
interleave back into the input's shape by a reshape: every input gradient is written once, with
no scatter and no zero-dilated intermediate. Max pooling and strided convolutions use this on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def counts(in_hw, strides) -> tuple[int, int]:
  """Rows and columns of input per phase: ⌈H / s_h⌉, ⌈W / s_w⌉."""
  return tuple(-(-n // s) for n, s in zip(in_hw, strides))


def taps(k: int, s: int, pad_lo: int, p: int) -> list[tuple[int, int]]:
  """(tap i, output offset d) for the window taps that reach input phase p, d increasing."""
  return [(i, (p + pad_lo - i) // s) for i in reversed(range(k)) if (p + pad_lo - i) % s == 0]


def shift(a: jax.Array, d: tuple[int, int], n: tuple[int, int]) -> jax.Array:
  """(N, H, W, C) -> b[:, i, j] = a[:, i + d_h, j + d_w] for i < n_h, j < n_w; zero where that is
  outside a."""
  # Negative padding crops.
  cfg = [(0, 0, 0)] + [(-dk, nk - a.shape[k + 1] + dk, 0) for k, (dk, nk) in enumerate(zip(d, n))]
  return lax.pad(a, jnp.zeros((), a.dtype), cfg + [(0, 0, 0)])


def interleave(grads, in_hw) -> jax.Array:
  """grads[p][q]: (N, A, B, C) for input rows s_h·a + p and columns s_w·b + q -> (N, H, W, C)."""
  n, a, b, c = grads[0][0].shape
  sh, sw = len(grads), len(grads[0])
  rows = [jnp.stack(cols, axis=3) for cols in grads]  # each (N, A, B, s_w, C)
  full = jnp.stack(rows, axis=2).reshape(n, a * sh, b * sw, c)  # from (N, A, s_h, B, s_w, C)
  return full[:, :in_hw[0], :in_hw[1], :]
