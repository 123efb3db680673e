"""Making XLA:CPU fast: everything the project does only because it runs on CPUs too.

The models ask for `conv_general_dilated` (for `nn.Conv`) and `max_pool`, and get forms that avoid
XLA:CPU's slow paths on CPU (`conv`, `pooling`, with `phases` for their strided gradients) and
JAX's own everywhere else; `compiler_options` are the XLA flags the jitted steps compile with on
CPU; `host` holds the process settings (single-threaded host BLAS while steps run, glibc malloc on
huge pages via one re-exec at start-up, and dropping compiled programs between runs before
their code exhausts the process's memory maps). Each module says what it fixes and what it was
measured to gain; figures are in benchmarks/ and the README.
"""

from __future__ import annotations

from repsim_jax.cpu.host import (drop_compiled_programs_near_map_limit, malloc_on_huge_pages,
                                 single_threaded_blas)


def __getattr__(name):
  # The jax-using parts load on first use, so the command line can re-exec itself (host) before
  # importing jax.
  if name == "conv_general_dilated":
    from repsim_jax.cpu.conv import conv_general_dilated  # pylint: disable=g-import-not-at-top
    return conv_general_dilated
  if name == "max_pool":
    from repsim_jax.cpu.pooling import max_pool  # pylint: disable=g-import-not-at-top
    return max_pool
  if name == "compiler_options":
    from repsim_jax.cpu.compiler import compiler_options  # pylint: disable=g-import-not-at-top
    return compiler_options
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["compiler_options", "conv_general_dilated", "drop_compiled_programs_near_map_limit",
           "malloc_on_huge_pages", "max_pool", "single_threaded_blas"]
