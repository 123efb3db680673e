"""Host-process settings that CPU training steps need to run at full speed.

Both fix interference between XLA's CPU runtime and the rest of the process, not XLA itself:
host BLAS threads that spin on XLA's cores, and a C allocator that maps XLA's step buffers
afresh every step in 4 KiB pages.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys

import threadpoolctl

_HUGETLB = "glibc.malloc.hugetlb"
_MAX_MAP_COUNT = "/proc/sys/vm/max_map_count"
MAP_BUDGET = 0.5  # the share of the kernel's limit on memory maps compiled code may hold
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def malloc_on_huge_pages() -> None:
  """Re-executes this program once with glibc malloc on transparent huge pages, where that helps.

  XLA:CPU allocates a step's temporary buffer (134 MB for ResNet-18 at 64 px, batch 32; 1 GB at
  224 px; 4.4 GB for ViT-S/16 at 224 px) and frees it when the step ends; glibc maps blocks that
  large afresh and unmaps them on free, so every step faults the whole buffer in again, 4 KiB at
  a time: ~25% of a 2-core ResNet step and ~45% of a ViT step. With `glibc.malloc.hugetlb=1`
  malloc asks for 2 MiB pages and the faults drop 500-fold with no extra memory held (keeping the
  freed buffer instead, with mallopt, was as fast on ResNets but fragmented the heap to 2.5x the
  memory on ViT). glibc reads its tunables only at start-up, hence the re-exec; it happens only
  on glibc >= 2.35 with transparent huge pages in `madvise` mode (in `always` mode the kernel
  already uses them; in `never` it cannot). Process-wide, so the command line calls it, not the
  library, first thing in `__main__`.
  """
  if (platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"
      or _HUGETLB in os.environ.get("GLIBC_TUNABLES", "")):  # already set, maybe by the user
    return
  if tuple(int(v) for v in platform.libc_ver()[1].split(".")[:2]) < (2, 35):
    return
  try:
    with open(_THP_MODE) as f:
      if "[madvise]" not in f.read():
        return
  except OSError:
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"),
                                                         f"{_HUGETLB}=1"]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)


def drop_compiled_programs_near_map_limit() -> bool:
  """Drops JAX's compiled programs when they hold over `MAP_BUDGET` of Linux's limit on a
  process's memory maps; True if it did. Call it between runs.

  XLA:CPU loads each compiled program's code into memory maps of its own (thousands for one
  fine-tune run's programs) and unmaps them only when JAX drops the programs. A process that runs
  run after run (the slow test matrix, a sweep or a study on the inline executor, the default
  job) reached `vm.max_map_count` (65,530 by default) after a few dozen runs, and the next
  compile died inside LLVM ("Unable to allocate section memory", or a segfault). Programs of
  finished runs are dropped with the rest and recompiled only if a later run needs them.
  """
  try:
    with open(_MAX_MAP_COUNT) as f:
      limit = int(f.read())
    with open("/proc/self/maps", "rb") as f:
      used = sum(1 for _ in f)
  except (OSError, ValueError):  # not Linux: no such limit to keep clear of
    return False
  if used <= MAP_BUDGET * limit:
    return False
  import gc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
  gc.collect()  # programs held only by reference cycles of finished runs
  return True
