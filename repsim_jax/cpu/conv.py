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
  Strided ones take their input gradient as stride-1 convolutions, one per stride phase of the
  input (`_polyphase_input_grad`), not as XLA's convolution of a zero-dilated output gradient.
- Traced inside `member_batched()` (population training's vmap over members, each with its own
  kernel), one convolution per member in the same program (`_unrolled_vmap`). JAX's own batching
  rule makes a grouped convolution (its weight gradient is XLA:CPU's slowest path) and a batched
  dot for the 1x1 and im2col forms, both several times slower than the members' convolutions side
  by side. That form has reverse-mode derivatives only (a custom_vjp), so it is used only there:
  elsewhere forward mode (Hessian-vector products) works as with any JAX function.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax

from repsim_jax.cpu import phases

SMALL_OUTPUT = 16  # output H·W at or below which CPU uses im2col
_NHWC = ("NHWC", "HWIO", "NHWC")
_MEMBERS = contextvars.ContextVar("member_batched", default=False)


@contextlib.contextmanager
def member_batched():
  """While tracing a `vmap` over population members: their convolutions run one per member."""
  token = _MEMBERS.set(True)
  try:
    yield
  finally:
    _MEMBERS.reset(token)


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
  if not simple:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision,
                                    **kw)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  conv = _member_conv if _MEMBERS.get() else _cpu_conv
  return conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)), precision)


def _unrolled_vmap(f):
  """f, batched under vmap by one call per index of the mapped axis in the same program (the
  calls are independent, so XLA runs them side by side; `lax.map` would run them in turn)."""
  g = jax.custom_batching.custom_vmap(f)

  @g.def_vmap
  def rule(axis_size, in_batched, *args):
    outs = [g(*[a[i] if batched else a for a, batched in zip(args, in_batched)])
            for i in range(axis_size)]
    return (jax.tree.map(lambda *o: jnp.stack(o), *outs),
            jax.tree.map(lambda _: True, outs[0]))

  return g


# custom_vmap has no autodiff rules, so the gradient is a custom_vjp whose forward and backward
# are each batched member by member.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _member_conv(x, w, strides, padding, precision):
  return _unrolled_vmap(functools.partial(_cpu_conv, strides=strides, padding=padding,
                                          precision=precision))(x, w)


def _member_conv_fwd(x, w, strides, padding, precision):
  return _member_conv(x, w, strides, padding, precision), (x, w)


def _member_conv_bwd(strides, padding, precision, res, g):
  conv = functools.partial(_cpu_conv, strides=strides, padding=padding, precision=precision)
  return _unrolled_vmap(lambda x, w, g: jax.vjp(conv, x, w)[1](g))(*res, g)


_member_conv.defvjp(_member_conv_fwd, _member_conv_bwd)


def _lax_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


def _cpu_conv(x, w, strides, padding, precision, weight_grad=True):
  """An NHWC/HWIO convolution in the CPU form that suits its shape (see the module docstring);
  `weight_grad=False` where no gradient is taken of it (the input-gradient convolutions)."""
  kh, kw_, cin, cout = w.shape
  (pt, pb), (pl, pr) = padding
  sh, sw = strides
  if (kh, kw_) == (1, 1) and (pt, pb, pl, pr) == (0, 0, 0, 0):
    return jnp.dot(x[:, ::sh, ::sw, :], w[0, 0], precision=precision)
  ho = (x.shape[1] + pt + pb - kh) // sh + 1
  wo = (x.shape[2] + pl + pr - kw_) // sw + 1
  if ho * wo <= SMALL_OUTPUT:
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    cols = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
            for i in range(kh) for j in range(kw_)]
    patches = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
    return jnp.dot(patches, w.reshape(kh * kw_ * cin, cout), precision=precision)
  if weight_grad:
    x = _materialized(x)
  if strides != (1, 1):
    return _strided_conv(x, w, strides, padding, precision)
  return _lax_conv(x, w, strides, padding, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _strided_conv(x, w, strides, padding, precision):
  return _lax_conv(x, w, strides, padding, precision)


def _strided_conv_fwd(x, w, strides, padding, precision):
  return _lax_conv(x, w, strides, padding, precision), (x, w)


def _strided_conv_bwd(strides, padding, precision, res, g):
  x, w = res
  _, weight_vjp = jax.vjp(lambda w: _lax_conv(x, w, strides, padding, precision), w)
  return _polyphase_input_grad(g, w, x.shape[1:3], strides, padding, precision), weight_vjp(g)[0]


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def _polyphase_input_grad(g, w, in_hw, strides, padding, precision):
  """The input gradient of a strided convolution, one stride phase of the input at a time.

  Each phase is a stride-1 convolution of g, shifted by the phase's first output offset, with the
  kernel taps that reach it (channels swapped); `phases.interleave` puts the phases together.
  XLA's own form convolves a zero-dilated g, whose slow CPU path took 45 ms for ResNet-18's
  56 -> 28 px layer (batch 32), where the four phase convolutions take ~29 ms.
  """
  (kh, kw_, cin, _), (sh, sw), ((pt, _), (pl, _)) = w.shape, strides, padding
  na, nb = phases.counts(in_hw, strides)

  def phase(p, q):
    ti, tj = phases.taps(kh, sh, pt, p), phases.taps(kw_, sw, pl, q)
    if not ti or not tj:  # stride > kernel: these inputs reach no output
      return jnp.zeros((g.shape[0], na, nb, cin), g.dtype)
    k = jnp.stack([jnp.stack([w[i, j] for j, _ in tj]) for i, _ in ti]).swapaxes(2, 3)
    # Cut/zero-filled to the rows and columns a VALID convolution with len(ti) x len(tj) taps reads.
    gp = phases.shift(g, (ti[0][1], tj[0][1]), (na + len(ti) - 1, nb + len(tj) - 1))
    return _cpu_conv(gp, k, (1, 1), ((0, 0), (0, 0)), precision, weight_grad=False)

  return phases.interleave([[phase(p, q) for q in range(sw)] for p in range(sh)], in_hw)
