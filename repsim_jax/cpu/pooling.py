"""Max pooling as the maximum of the kh·kw strided window slices (NHWC), with its own VJP.

`flax.linen.max_pool` lowers to a reduce-window whose gradient, in current JAX, is an argmax
carried through a variadic reduce-window over four materialised int32 index arrays the size of
the padded input. On XLA:CPU that costs ~45 ms of thread time per ResNet-18 step at 64 px
(batch 32), a fifth of the step. Here the forward pass is kh·kw elementwise maxima of strided
slices, and it also stores, per output, which window element was the *first* maximum in
row-major order: the tie rule of reduce-window's gradient (and of PyTorch's MaxPool2d), which
matters on flat image regions. The backward pass reads only that index and the output gradient,
one stride phase of the input at a time, so every input gradient is written once. (Re-deriving
the maximum's position from the input in the backward pass made XLA re-evaluate the stem's
BatchNorm and ReLU per window element: 120 ms of a 1.4 s ResNet-18 step at 224 px.)
The result is the same as `nn.max_pool` (-inf padding) and so is the gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from repsim_jax.cpu import phases


def _out_size(n: int, k: int, s: int, lo: int, hi: int) -> int:
  return (n + lo + hi - k) // s + 1


def _windows(xp, window, strides, out_hw):
  """The kh·kw strided slices of the padded input, each (N, Ho, Wo, C), in row-major order."""
  (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
  return [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]


def _pad(x, padding):
  (pt, pb), (pl, pr) = padding
  return jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-jnp.inf)


def _forward(x, window, strides, padding):
  """The pooled maximum and, per output, the row-major index of its window's first maximum."""
  if x.ndim != 4:
    raise ValueError(f"max_pool: expected NHWC input of rank 4, got shape {x.shape}")
  (pt, pb), (pl, pr) = padding
  out_hw = (_out_size(x.shape[1], window[0], strides[0], pt, pb),
            _out_size(x.shape[2], window[1], strides[1], pl, pr))
  slices = _windows(_pad(x, padding), window, strides, out_hw)
  out = functools.reduce(jnp.maximum, slices)
  # k = len(slices) marks a window without a maximum (NaN): no gradient, as in reduce-window's.
  first = jnp.full(out.shape, len(slices), jnp.uint8 if len(slices) < 256 else jnp.int32)
  for k in reversed(range(len(slices))):
    first = jnp.where(slices[k] == out, jnp.asarray(k, first.dtype), first)
  # Stored, not re-derived from the kh·kw slices at each of the backward pass's reads: XLA
  # duplicates cheap elementwise producers into their consumers but not a division (by 1 here;
  # the divisor depends on the data so XLA cannot fold it, but is 1 since first <= len(slices)).
  one = (first[0, 0, 0, 0] > len(slices)).astype(first.dtype) + 1
  return out, lax.div(first, one)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, strides, padding, in_hw):
  del in_hw  # the backward pass needs it; the forward reads it off x
  return _forward(x, window, strides, padding)[0]


def max_pool(x, window=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), *, backend=None):
  """`nn.max_pool(x, window, strides, padding)` for NHWC `x` with explicit ((lo, hi), (lo, hi)):
  the slices-and-index form on CPU (where it was measured), flax's own elsewhere."""
  if (backend or jax.default_backend()) != "cpu":
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    return nn.max_pool(x, tuple(window), tuple(strides), tuple(map(tuple, padding)))
  return _max_pool(x, tuple(window), tuple(strides), tuple(map(tuple, padding)),
                   tuple(x.shape[1:3]))


def _max_pool_fwd(x, window, strides, padding, in_hw):
  del in_hw
  return _forward(x, window, strides, padding)  # (output, residual: the first-maximum index)


def _max_pool_bwd(window, strides, padding, in_hw, first, g):
  """Each stride phase of the input sums the output gradients whose first maximum it was
  (`phases`), reading only the stored index and g."""
  (kh, kw), (sh, sw), ((pt, _), (pl, _)) = window, strides, padding
  n, _, _, c = g.shape
  na, nb = phases.counts(in_hw, strides)
  zero = jnp.zeros((), g.dtype)

  def phase(p, q):
    acc = jnp.zeros((n, na, nb, c), g.dtype)
    for i, di in phases.taps(kh, sh, pt, p):
      for j, dj in phases.taps(kw, sw, pl, q):
        term = jnp.where(first == i * kw + j, g, zero)
        acc = acc + phases.shift(term, (di, dj), (na, nb))
    return acc

  return (phases.interleave([[phase(p, q) for q in range(sw)] for p in range(sh)], in_hw),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
