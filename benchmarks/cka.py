"""Linear CKA benchmark: repsim_jax vs plain NumPy vs ckatorch, and streaming CKA memory.

  python benchmarks/cka.py                 # both parts (the streaming part in a subprocess)
  python benchmarks/cka.py --part full     # n=10,000, d=2048 float32 linear CKA timings
  python benchmarks/cka.py --part stream   # n=200,000, d=2048 MinibatchCKA peak-RSS delta

ckatorch (PyPI, needs torch) is optional: the comparison is skipped when it is not installed.
The streaming part runs in its own process so its peak RSS is not polluted by the first part.
"""

import argparse
import resource
import subprocess
import sys
import time

import numpy as np


def _time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def numpy_linear_cka(x, y):
  """Plain NumPy feature-space linear CKA (same algorithm as the library's n > d path)."""
  x = x - x.mean(0)
  y = y - y.mean(0)
  return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def part_full(n=10_000, d=2048, repeats=3):
  import jax

  from repsim_jax.similarity import linear_cka

  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, d), dtype=np.float32)
  # Y = X with permuted columns plus equal-power noise: population CKA = 1/2; the biased
  # estimator at d/n = 0.2 reads higher (about 0.585), identically for every implementation.
  y = x[:, rng.permutation(d)] + rng.standard_normal((n, d), dtype=np.float32)
  print(f"linear CKA, n={n}, d={d}, float32, backend={jax.default_backend()},"
        f" devices={jax.devices()}")

  xj, yj = jax.device_put(x), jax.device_put(y)
  t0 = time.perf_counter()
  val = float(linear_cka(xj, yj))
  print(f"  repsim_jax  first call (compile+run): {time.perf_counter() - t0:8.3f} s")
  t_jax = _time(lambda: linear_cka(xj, yj).block_until_ready(), repeats)
  print(f"  repsim_jax  jitted (median of {repeats}): {t_jax:8.3f} s   value={val:.6f}")

  t_np = _time(lambda: numpy_linear_cka(x, y), repeats)
  print(f"  numpy       feature-space float32:    {t_np:8.3f} s   value="
        f"{numpy_linear_cka(x, y):.6f}   ratio numpy/jax = {t_np / t_jax:.2f}x")

  try:
    import torch
    from ckatorch.core import cka_base
  except ImportError as e:
    print(f"  ckatorch    skipped ({e})")
    return
  torch.set_num_threads(max(1, torch.get_num_threads()))
  xt, yt = torch.from_numpy(x), torch.from_numpy(y)
  t0 = time.perf_counter()
  v_t = float(cka_base(xt, yt, kernel="linear"))  # its default path: float64 n×n Gram matrices
  t_t = time.perf_counter() - t0
  print(f"  ckatorch    cka_base(linear) 1 run:   {t_t:8.3f} s   value={v_t:.6f}"
        f"   ratio ckatorch/jax = {t_t / t_jax:.1f}x (torch {torch.__version__},"
        f" {torch.get_num_threads()} threads)")


def part_stream(n=200_000, d=2048, batch=500):
  import jax

  from repsim_jax.similarity import MinibatchCKA

  def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

  rng = np.random.default_rng(1)
  perm = rng.permutation(d)
  acc = MinibatchCKA()
  # Warm up (compile) on one batch so the baseline includes JAX/XLA's fixed footprint.
  xb = rng.standard_normal((batch, d), dtype=np.float32)
  MinibatchCKA().update(xb, xb).result().block_until_ready()
  base = rss_mib()
  t0 = time.perf_counter()
  for _ in range(n // batch):
    # Batches generated on the fly: the (n, d) matrices never exist.
    xb = rng.standard_normal((batch, d), dtype=np.float32)
    yb = xb[:, perm] + rng.standard_normal((batch, d), dtype=np.float32)
    acc.update(xb, yb)
  val = float(acc.result())
  dt = time.perf_counter() - t0
  peak = rss_mib()
  print(f"streaming MinibatchCKA, n={n}, d={d}, batch={batch}, backend={jax.default_backend()}:")
  print(f"  value={val:.5f} (population CKA 0.5), time {dt:.2f} s (incl. host RNG),"
        f" peak RSS {peak:.0f} MiB, delta over warm baseline {peak - base:.1f} MiB"
        f" (target <= 1024 MiB)")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--part", choices=["all", "full", "stream"], default="all")
  args = ap.parse_args()
  if args.part in ("all", "stream"):
    if args.part == "all":  # fresh process: ru_maxrss is a lifetime peak
      subprocess.run([sys.executable, __file__, "--part", "stream"], check=True)
    else:
      part_stream()
  if args.part in ("all", "full"):
    part_full()


if __name__ == "__main__":
  main()
