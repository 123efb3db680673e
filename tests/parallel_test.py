"""XLA options of `parallel.DataParallel.compile` on CPU."""

import re

import jax
import numpy as np
import pytest
from jax import lax

from repsim_jax import cpu, parallel


def _loss_and_grads(x, w):
  def loss(x, w):
    y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (y * y).mean()
  return jax.value_and_grad(loss, argnums=(0, 1))(x, w)


def _ynn_convolutions(compiled) -> int:
  return sum(1 for line in compiled.as_text().splitlines()
             if '"__ynn_fusion"' in line and re.search(r'op_name="[^"]*conv_general_dilated"', line))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")
def test_cpu_options_move_convolutions_off_ynnpack_with_same_values():
  opts = cpu.compiler_options()
  if opts is None:
    pytest.skip("this jaxlib has no YNNPACK fusion options")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 16, 16, 64)).astype(np.float32)
  w = rng.normal(size=(3, 3, 64, 64)).astype(np.float32) / 24
  default = jax.jit(_loss_and_grads).lower(x, w).compile()
  ours = jax.jit(_loss_and_grads, compiler_options=opts).lower(x, w).compile()
  assert _ynn_convolutions(default) > 0  # what the options are for: XLA's default
  assert _ynn_convolutions(ours) == 0
  for a, b in zip(jax.tree.leaves(default(x, w)), jax.tree.leaves(ours(x, w))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # and a float64 reference for both
  with jax.enable_x64():
    ref = jax.jit(_loss_and_grads)(x.astype(np.float64), w.astype(np.float64))
  for a, r in zip(jax.tree.leaves(ours(x, w)), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu" or cpu.compiler_options() is None,
                    reason="CPU compiler options")
def test_data_parallel_compile_uses_the_cpu_options():
  dp = parallel.DataParallel("shard_map", 1)

  def step(state, batch, rng):
    return _loss_and_grads(batch, state)

  x = np.ones((8, 16, 16, 64), np.float32)
  w = np.full((3, 3, 64, 64), 0.01, np.float32)
  compiled = dp.compile(step, donate_state=False).lower(
      dp.put_replicated(w), dp.put_batch(x), dp.put_replicated(np.zeros(2, np.uint32))).compile()
  assert _ynn_convolutions(compiled) == 0
