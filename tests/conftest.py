"""Test session setup: 8 simulated CPU devices, so data-parallel code runs as on an 8-chip host.

XLA reads XLA_FLAGS when jax initialises its backends, so this must happen before any test
imports jax.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Many tests (and the subprocesses of the resume / multi-process tests) compile the same tiny
# training step; a session-wide persistent compilation cache compiles each program once.
_CACHE_MADE = None  # removed when the session that made it ends (workers inherit the variable)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_MADE = tempfile.mkdtemp(
      prefix="repsim_jax_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
elif os.environ.get("PYTEST_XDIST_WORKER"):
  # Each worker its own directory (under the session's): jax reads and writes entries without a
  # lock, and its lock (a cache size limit) rescans the whole cache at every write.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      os.environ["JAX_COMPILATION_CACHE_DIR"], os.environ["PYTEST_XDIST_WORKER"])

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


def pytest_unconfigure(config):
  del config
  if _CACHE_MADE:
    import shutil
    shutil.rmtree(_CACHE_MADE, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: `-p no:xdist` runs without it
def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per core, at most 4 (each holds a jax process of 8 simulated devices
  and its compiled programs, a few GiB at peak)."""
  del config
  return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.fixture
def shared_dir():
  if not SHARED.is_dir():
    pytest.skip(f"{SHARED} not present (fixtures ship with the project's CI, not with a clone)")
  return SHARED
