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
# jax.pmap steps on 8 CPU devices under XLA's default CPU scheduler (concurrency-optimised) can
# segfault inside its in-process all-reduce (InProcessCommunicator::AllReduce, jaxlib 0.10.2: a
# RepSim covariance step of a ResNet, with or without donation); under its memory-optimised
# scheduler they run. shard_map's programs never crashed and keep the default.
_PMAP_COMPILER_OPTIONS = {**_CPU_COMPILER_OPTIONS,
                          "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


@functools.cache
def compiler_options(pmap: bool = False) -> dict | None:
  """The XLA options jitted (or, with `pmap`, pmapped) steps compile with on CPU; None where this
  jaxlib does not know them."""
  options = _PMAP_COMPILER_OPTIONS if pmap else _CPU_COMPILER_OPTIONS
  try:
    jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(options)
  except Exception:  # an older or newer jaxlib without these options: keep its defaults
    return None
  return options
