"""A drop-in `conv_general_dilated` for `nn.Conv` that avoids slow XLA:CPU paths.

On CPU (everywhere else it is `lax.conv_general_dilated` itself; the HWIO kernel layout is
unchanged):
- 1x1 convolutions are a strided slice and one matmul. XLA's own form of their weight gradient
  is a convolution with a 28x28 "kernel" (ResNet's stride-2 downsample at 224 px): 3-4x slower
  than the matmul, which XLA hands to its matmul library.
- Tiny output maps (at most SMALL_OUTPUT positions) gather the kh·kw shifted windows and do one
  matmul: XLA's convolution is pathologically slow for tiny feature maps with many channels (a 3x3
  conv on a (32, 2, 2, 512) input takes ~0.4 s, 70x its im2col equivalent; ResNet layer4 at 64 px).
- Everything else is XLA's convolution with its input passed through `_materialized`. XLA computes
  a weight gradient from the input transposed to (C, H, W, N), and it fuses that transpose with the
  elementwise chain that made the input (BatchNorm, residual add, ReLU of up to two blocks),
  re-evaluating the chain at every element in the transposed, cache-hostile order: up to 77 ms for
  a (32, 28, 28, 128) activation at 224 px, where transposing the stored activation takes 3 ms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

SMALL_OUTPUT = 16  # output H·W at or below which CPU uses im2col


def _materialized(x: jax.Array) -> jax.Array:
  """x itself, computed so that XLA keeps it as one stored array that its consumers read.

  XLA duplicates cheap elementwise producers into every consumer fusion but not a division, so
  x / 1 stops the chain that made x from being re-evaluated inside the weight gradient's
  transpose; in the backward pass, g / 1 does the same for the output gradient. The 1 is
  1 + 0·x[0, 0, 0, 0] (that element made finite first), which XLA cannot fold away. Dividing by
  1 is exact (XLA:CPU flushes subnormals in every op, this one too).
  """
  return x / lax.stop_gradient(1 + 0 * jnp.nan_to_num(x[0, 0, 0, 0], posinf=0.0, neginf=0.0))


def _is_nhwc(dn) -> bool:
  if dn is None:
    return False
  if isinstance(dn, lax.ConvDimensionNumbers):
    n = len(dn.lhs_spec)
    return (dn.lhs_spec == (0, n - 1) + tuple(range(1, n - 1))
            and dn.out_spec == dn.lhs_spec and dn.rhs_spec == (n - 1, n - 2) + tuple(range(n - 2)))
  return tuple(dn) == ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kw):
  simple = (jax.default_backend() == "cpu" and lhs.ndim == 4 and feature_group_count == 1
            and not kw and _is_nhwc(dimension_numbers)
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1))))
  if simple:
    kh, kw_, cin, cout = rhs.shape
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw_), window_strides, padding)
    (pt, pb), (pl, pr) = padding
    sh, sw = window_strides
    if (kh, kw_) == (1, 1) and (pt, pb, pl, pr) == (0, 0, 0, 0):
      return jnp.dot(lhs[:, ::sh, ::sw, :], rhs[0, 0], precision=precision)
    ho = (lhs.shape[1] + pt + pb - kh) // sh + 1
    wo = (lhs.shape[2] + pl + pr - kw_) // sw + 1
    if ho * wo <= SMALL_OUTPUT:
      x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
      cols = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
              for i in range(kh) for j in range(kw_)]
      patches = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
      return jnp.dot(patches, rhs.reshape(kh * kw_ * cin, cout), precision=precision)
    lhs = _materialized(lhs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count, precision=precision,
                                  **kw)
