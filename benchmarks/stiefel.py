"""Time per optimiser update of one Stiefel leaf Q (default 2048 × 2048) for each retraction.

Compares the Riemannian optimisers of `repsim_jax.optim.stiefel` (SGD with momentum for every
retraction, Adam + QR) with a plain `optax.adam` update of a same-size Euclidean leaf. Each step is
one jitted call (update + apply_updates), timed after compilation; figures are the median of
--repeats calls, with host BLAS single-threaded as in the trainer. Also prints ‖QᵀQ − I‖_F after
the timed steps.

  python benchmarks/stiefel.py                      # 2048 × 2048, float32, default backend
  python benchmarks/stiefel.py --d-ft 2048 --d-pre 512 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from repsim_jax.cpu import host
from repsim_jax.optim import stiefel as st


def _time_optimizer(tx, q0, grads, repeats):
  @jax.jit
  def step(q, state, g):
    updates, state = tx.update(g, state, q)
    return optax.apply_updates(q, updates), state

  q, state = q0, tx.init(q0)
  t0 = time.perf_counter()
  q, state = jax.block_until_ready(step(q, state, grads[0]))  # compile + first run
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    q, state = jax.block_until_ready(step(q, state, grads[(i + 1) % len(grads)]))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), min(times), compile_s, float(st.orthogonality_error(q))


@host.single_threaded_blas()  # as in the trainer
def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d-ft", type=int, default=2048)
  parser.add_argument("--d-pre", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--lr", type=float, default=1e-3)
  args = parser.parse_args()
  if args.d_ft < args.d_pre:
    raise SystemExit("--d-ft must be >= --d-pre")

  dtype = jnp.dtype(args.dtype)
  dev = jax.devices()[0]
  print(f"backend={jax.default_backend()} device={dev.device_kind} jax={jax.__version__} "
        f"optax={optax.__version__}")
  print(f"Q: {args.d_ft} x {args.d_pre} {args.dtype}, repeats={args.repeats} (median / min "
        f"seconds per jitted update+apply, after compile)")

  q0 = st.identity_init(args.d_ft, args.d_pre, dtype)
  keys = jax.random.split(jax.random.key(0), 2)
  grads = [jax.random.normal(k, q0.shape, dtype) for k in keys]

  cases = [("optax.adam (Euclidean leaf)", optax.adam(args.lr))]
  for method in st.RETRACTIONS:
    cases.append((f"stiefel_sgd  momentum=0.9 {method}", st.stiefel_sgd(args.lr, method=method)))
  for method in st.RETRACTIONS:
    cases.append((f"stiefel_adam {method}", st.stiefel_adam(args.lr, method=method)))

  baseline = None
  print(f"{'optimiser':36s} {'median ms':>10s} {'min ms':>9s} {'x adam':>7s} "
        f"{'compile s':>9s} {'|QtQ-I|_F':>10s}")
  for name, tx in cases:
    med, best, comp, err = _time_optimizer(tx, q0, grads, args.repeats)
    baseline = baseline or med
    # The Euclidean baseline is not constrained, so its orthogonality error is not a figure.
    err_s = "-" if name.startswith("optax.") else f"{err:.2e}"
    print(f"{name:36s} {med * 1e3:10.2f} {best * 1e3:9.2f} {med / baseline:7.1f} "
          f"{comp:9.2f} {err_s:>10s}")


if __name__ == "__main__":
  main()
