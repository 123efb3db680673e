"""Host-process settings that CPU training steps need to run at full speed.

Both fix interference between XLA's CPU runtime and the rest of the process, not XLA itself:
host BLAS threads that spin on XLA's cores, and a C allocator that unmaps and re-faults XLA's
step buffers every step.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform

import threadpoolctl

# glibc mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


@contextlib.contextmanager
def single_threaded_blas():
  """Host BLAS/LAPACK on one thread while jitted steps run (usable as a decorator too).

  XLA's CPU runtime spreads convolutions and dots over all cores itself, but its LAPACK kernels
  (the Cholesky / QR / SVD of the Stiefel retraction and of Procrustes, every RepSim step) call
  scipy's OpenBLAS, whose own worker threads busy-wait after each call and take cores from XLA's
  threads for the rest of the step: on 2 cores a 512² retraction cost ~40 ms of a 160 ms
  ResNet-18 step instead of 3 ms. Large one-off factorisations lose ~30% on 2 cores instead,
  so this is for the training loop, not for the whole process.
  """
  import scipy.linalg  # noqa: F401  (loads the OpenBLAS that jaxlib's LAPACK calls, so it is limited)
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    yield


def retain_freed_memory() -> bool:
  """Makes glibc malloc keep freed large blocks for reuse; False (and nothing done) off glibc.

  XLA:CPU allocates a step's temporary buffer (134 MB for ResNet-18 at 64 px, batch 32; ~1.5 GB
  at 224 px) on one of its worker threads and frees it when the step ends. glibc serves blocks
  that large with mmap, or from a thread arena that cannot hold them, and unmaps them on free,
  so every step page-faults the whole buffer in again: 33K faults and ~25% of a 2-core step.
  One arena, no mmap and a 2 GiB trim threshold keep the buffer in the heap between steps. The
  price is that up to 2 GiB freed at the top of the heap is not returned to the OS.

  Call it before JAX starts its CPU backend: threads that have already allocated keep their own
  arenas. It is process-wide and permanent, so the command line calls it, not the library.
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  return all(libc.mallopt(k, v) == 1 for k, v in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
