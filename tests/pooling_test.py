"""Slice-based max pooling equals flax's reduce-window max pooling: values and gradients, ties too."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repsim_jax.cpu import pooling

CASES = [
    ((2, 9, 9, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),   # ResNet stem pool, odd input
    ((2, 8, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),   # even input
    ((1, 7, 5, 2), (2, 3), (1, 2), ((0, 1), (2, 0))),   # uneven window, strides, padding
    ((2, 6, 6, 4), (2, 2), (2, 2), ((0, 0), (0, 0))),   # non-overlapping
    ((1, 11, 10, 2), (2, 1), (3, 2), ((0, 0), (0, 0))),  # stride > window: rows no window reads
    ((2, 9, 9, 3), (3, 3), (2, 2), ((0, 0), (0, 0))),   # no padding: the last row/column unread
]


def _ref(x, window, strides, padding):
  return nn.max_pool(x, window, strides=strides, padding=padding)


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_matches_reduce_window(shape, window, strides, padding, ties):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  if ties:  # ReLU-like: flat zero regions and repeated values, where the tie rule matters
    x = jnp.round(jnp.maximum(x, 0.0) * 2) / 2
  r = jax.random.normal(jax.random.PRNGKey(1), _ref(x, window, strides, padding).shape)
  ours = pooling.max_pool(x, window, strides, padding)
  np.testing.assert_array_equal(ours, _ref(x, window, strides, padding))
  g_ours = jax.grad(lambda x: jnp.sum(pooling.max_pool(x, window, strides, padding) * r))(x)
  g_ref = jax.grad(lambda x: jnp.sum(_ref(x, window, strides, padding) * r))(x)
  # Overlapping windows add their contributions in another order: float32 rounding only.
  np.testing.assert_allclose(g_ours, g_ref, rtol=1e-6, atol=1e-6)


def test_first_maximum_takes_the_gradient():
  # Constant input: every window is all ties; the first (row-major) element of each gets it all.
  g = jax.grad(lambda x: jnp.sum(pooling.max_pool(x) * jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)))(
      jnp.ones((1, 4, 4, 1)))
  want = np.zeros((4, 4))
  want[:2, :2] = [[1, 2], [3, 4]]
  np.testing.assert_array_equal(g[0, :, :, 0], want)


def test_jit_and_bfloat16():
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 4)).astype(jnp.bfloat16)
  out = jax.jit(pooling.max_pool)(x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, _ref(x, (3, 3), (2, 2), ((1, 1), (1, 1))))


def test_rank_error():
  with pytest.raises(ValueError, match="rank 4"):
    pooling.max_pool(jnp.zeros((8, 8, 3)))


def test_the_custom_form_is_taken_only_on_cpu():
  # Measured on XLA:CPU only: on GPU/TPU the backend's own reduce-window (and its gradient) runs.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 9, 3)), jnp.float32)
  cpu_form = str(jax.make_jaxpr(lambda x: pooling.max_pool(x, backend="cpu"))(x))
  other = str(jax.make_jaxpr(lambda x: pooling.max_pool(x, backend="gpu"))(x))
  assert "custom_vjp" in cpu_form and "reduce_window" not in cpu_form
  assert "reduce_window_max" in other and "custom_vjp" not in other
  np.testing.assert_array_equal(pooling.max_pool(x, backend="gpu"), pooling.max_pool(x))
