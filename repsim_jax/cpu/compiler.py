"""XLA:CPU compiler options for the jitted steps (`parallel.DataParallel.compile` on CPU)."""

from __future__ import annotations

import functools

import jax
import numpy as np

# XLA:CPU (jaxlib 0.10) hands convolutions, dots and reductions to YNNPACK. Its convolutions
# barely use a second core at ResNet shapes (3×3, 64 channels, 32×32: 11.2 ms on 2 cores, 12.1 on
# one) where XLA's own Eigen convolutions do; keeping dots and reductions on YNNPACK but not
# convolutions makes a ResNet-18 train step on 2 cores 1.2x (64 px) to 1.5x (224 px) faster.
# Without YNNPACK's reductions the step is twice as slow, so only convolutions are moved.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                         "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def compiler_options() -> dict | None:
  """The XLA options jitted steps compile with on CPU; None where this jaxlib does not know them."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_COMPILER_OPTIONS).lower(np.float32(0)).compile()
  except Exception:  # an older or newer jaxlib without these options: keep its defaults
    return None
  return _CPU_COMPILER_OPTIONS
