"""Host-process settings (`repsim_jax.host`)."""

import platform
import subprocess
import sys

import pytest
import threadpoolctl

from repsim_jax import host


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
# temporary buffer; prints the page faults of the second and third rounds.
_REUSE = """
import ctypes, resource, sys, threading
from repsim_jax import host
if sys.argv[1] == "retain":
  assert host.retain_freed_memory()
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
print(faults() + faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_retain_freed_memory_stops_refaulting_big_blocks():
  def faults(mode):
    out = subprocess.run([sys.executable, "-c", _REUSE, mode], check=True, capture_output=True,
                         text=True)
    return int(out.stdout)

  pages = 2 * (150 << 20) // 4096
  assert faults("retain") < 0.01 * pages
  assert faults("default") > 10 * max(faults("retain"), 1)
