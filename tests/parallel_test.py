"""Host thread settings of `parallel`."""

import threadpoolctl

from repsim_jax import parallel


def _blas_threads():
  return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
          if i["user_api"] == "blas"}


def test_single_threaded_blas_limits_and_restores():
  import scipy.linalg  # noqa: F401
  before = _blas_threads()
  assert before, "no BLAS library found to limit"
  with parallel.single_threaded_blas():
    assert set(_blas_threads().values()) == {1}
  assert _blas_threads() == before


def test_single_threaded_blas_as_decorator():
  @parallel.single_threaded_blas()
  def threads():
    return set(_blas_threads().values())

  assert threads() == {1}
