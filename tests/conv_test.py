"""The CPU forms of the convolution equal lax.conv_general_dilated (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from repsim_jax.cpu import conv

DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("shape,kernel,stride,pad", [
    ((4, 2, 2, 16), (3, 3, 16, 8), (1, 1), ((1, 1), (1, 1))),   # layer4 of ResNet @ 64 px
    ((4, 4, 4, 8), (3, 3, 8, 8), (2, 2), ((1, 1), (1, 1))),     # stride 2 into 2x2
    ((4, 4, 4, 8), (1, 1, 8, 16), (2, 2), ((0, 0), (0, 0))),    # 1x1 downsample
    ((2, 3, 5, 4), (3, 3, 4, 6), (1, 2), ((1, 0), (2, 1))),     # uneven everything
    ((2, 8, 8, 4), (3, 3, 4, 4), (1, 1), ((1, 1), (1, 1))),     # large map: lax, materialised
    ((2, 9, 9, 4), (1, 1, 4, 6), (2, 2), "VALID"),              # 1x1 as slice + matmul
    ((2, 8, 8, 4), (1, 1, 4, 6), (1, 1), "VALID"),              # 1x1, stride 1
    ((2, 9, 7, 4), (3, 3, 4, 6), (2, 1), "SAME"),               # string padding, large map
    # Strided, large map: the polyphase input gradient.
    ((2, 12, 12, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),   # ResNet's 3x3 downsample
    ((1, 17, 16, 3), (7, 7, 3, 5), (2, 2), ((3, 3), (3, 3))),   # ResNet's stem, odd height
    ((2, 13, 11, 2), (2, 3, 2, 3), (3, 2), ((0, 1), (2, 0))),   # stride > kernel: unread rows
])
def test_matches_lax_conv_and_its_gradients(shape, kernel, stride, pad):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), kernel)
  ref = lambda x, w: lax.conv_general_dilated(x, w, stride, pad, dimension_numbers=DN,
                                              precision=lax.Precision.HIGHEST)
  ours = lambda x, w: conv.conv_general_dilated(x, w, stride, pad, dimension_numbers=DN,
                                                precision=lax.Precision.HIGHEST)
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w))))
  for a, b in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_materialized_is_the_identity_for_values_and_gradients():
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 5, 3)) * 1e30
  x = x.at[1, 2, 3, 0].set(-1e-37).at[0, 0, 1, 0].set(-0.0)
  np.testing.assert_array_equal(conv._materialized(x), x)
  c = jax.random.normal(jax.random.PRNGKey(3), x.shape)
  g = jax.jit(jax.grad(lambda x: jnp.sum(conv._materialized(x) * c)))(x)
  np.testing.assert_array_equal(g, c)
  # A non-finite first element stays where it is instead of spreading to the whole output.
  for bad in (jnp.nan, jnp.inf):
    y = jax.jit(conv._materialized)(x.at[0, 0, 0, 0].set(bad))
    assert np.isfinite(y).sum() == x.size - 1


@pytest.mark.parametrize("shape,kernel,stride,pad", [
    ((2, 8, 8, 4), (3, 3, 4, 4), (1, 1), ((1, 1), (1, 1))),     # lax form
    ((2, 12, 12, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),   # strided: polyphase gradient
    ((4, 2, 2, 16), (3, 3, 16, 8), (1, 1), ((1, 1), (1, 1))),   # im2col
])
def test_hessian_vector_products_match_lax_conv(shape, kernel, stride, pad):
  """Forward over reverse (sharpness' Hessian-vector products) works through every CPU form."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), kernel)
  v = jax.random.normal(jax.random.PRNGKey(2), kernel)

  def hvp(f):
    grad = jax.grad(lambda w: jnp.sum(jnp.sin(f(x, w, stride, pad, dimension_numbers=DN,
                                                  precision=lax.Precision.HIGHEST))))
    return jax.jvp(grad, (w,), (v,))[1]

  np.testing.assert_allclose(hvp(conv.conv_general_dilated), hvp(lax.conv_general_dilated),
                             rtol=1e-4, atol=1e-4)


def test_member_batched_vmap_equals_lax_conv_per_member():
  """Population members (a vmap over kernels, traced inside `member_batched`): values and
  gradients of the one-convolution-per-member form equal lax.conv's."""
  xs = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 12, 12, 4))
  ws = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4, 6))

  def loss(f):
    return lambda x, w: jnp.sum(jnp.sin(f(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DN,
                                          precision=lax.Precision.HIGHEST)))

  def members(f):
    with conv.member_batched():
      return jax.jit(jax.vmap(jax.value_and_grad(loss(f), (0, 1))))(xs, ws)

  ours, ref = members(conv.conv_general_dilated), members(lax.conv_general_dilated)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  with conv.member_batched():
    jaxpr = str(jax.make_jaxpr(jax.vmap(loss(conv.conv_general_dilated)))(xs, ws))
  assert "feature_group_count=3" not in jaxpr  # not JAX's grouped convolution
