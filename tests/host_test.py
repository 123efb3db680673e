"""Host-process settings (`repsim_jax.host`)."""

import os
import platform
import subprocess
import sys

import pytest
import threadpoolctl

from repsim_jax.cpu import host


def _blas_threads():
  return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
          if i["user_api"] == "blas"}


def test_single_threaded_blas_limits_and_restores():
  import scipy.linalg  # noqa: F401
  before = _blas_threads()
  assert before, "no BLAS library found to limit"
  with host.single_threaded_blas():
    assert set(_blas_threads().values()) == {1}
  assert _blas_threads() == before


def test_single_threaded_blas_as_decorator():
  @host.single_threaded_blas()
  def threads():
    return set(_blas_threads().values())

  assert threads() == {1}


# A 150 MB block malloc'd, written and freed on a fresh thread, as XLA:CPU does with a step's
# temporary buffer; prints the command line it ran with, GLIBC_TUNABLES and the page faults of
# the second and third rounds.
_STEP_BUFFER = """
import ctypes, os, resource, sys, threading
from repsim_jax.cpu import host
if sys.argv[1] == "huge":
  host.malloc_on_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = 150 << 20
def step():
  p = libc.malloc(n); libc.memset(p, 1, n); libc.free(p)
def faults():
  t = threading.Thread(target=step)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  t.start(); t.join()
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(sys.argv[1:], os.environ.get("GLIBC_TUNABLES"), faults() + faults())
"""


def _thp_madvise():
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[madvise]" in f.read()
  except OSError:
    return False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not _thp_madvise(),
                    reason="glibc malloc with transparent huge pages in madvise mode only")
def test_malloc_on_huge_pages_reexecs_once_and_stops_4k_faults():
  def run(mode):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _STEP_BUFFER, mode, "x"], check=True,
                         capture_output=True, text=True, env=env, timeout=120)
    return out.stdout.rsplit(" ", 1)

  pages = 2 * (150 << 20) // 4096
  head, huge = run("huge")
  assert head == "['huge', 'x'] glibc.malloc.hugetlb=1"  # same arguments after the re-exec
  head, default = run("default")
  assert head == "['default', 'x'] None"
  assert int(huge) < 0.01 * pages
  assert int(default) > 10 * max(int(huge), 1)
