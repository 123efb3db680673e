"""Progress of long loops with an ETA: a tqdm bar on a terminal, plain lines in logs and CI.

`Training` reports a training run at its log steps (`step 120/1000 | loss 0.41 | 850 img/s |
ETA 1m03s`); `track` wraps any other long loop (evaluation, feature extraction, a sweep's runs).
Only process 0 reports; all output goes to stderr, so stdout keeps the results.
"""

from __future__ import annotations

import math
import os
import sys
import time

import jax
import tqdm

PLAIN_EVERY_S = 30.0  # at most one plain line per loop per this many seconds


def interactive() -> bool:
  """stderr is a terminal with a width (tqdm draws nothing on a zero-column one)."""
  if jax.process_index() != 0 or not sys.stderr.isatty():
    return False
  try:
    return os.get_terminal_size(sys.stderr.fileno()).columns > 0
  except OSError:
    return False


def _fmt(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "--"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Training:
  """A training run's progress, updated at its log steps."""

  def __init__(self, total_steps: int, batch_size: int, first_step: int = 0, name: str = ""):
    self.total, self.batch, self.name = total_steps, batch_size, name
    self._t0, self._s0 = time.perf_counter(), first_step
    self._bar = (tqdm.tqdm(total=total_steps, initial=first_step, desc=name.strip() or "train",
                           unit="step", file=sys.stderr, dynamic_ncols=True)
                 if interactive() else None)

  def reset_clock(self, step: int) -> None:
    """Restart the rate measurement (e.g. after the first step, which includes compilation)."""
    self._t0, self._s0 = time.perf_counter(), step

  def line(self, step: int, metrics: dict) -> str:
    dt = time.perf_counter() - self._t0
    steps = max(step - self._s0, 0)
    rate = steps * self.batch / dt if dt > 0 and steps else float("nan")
    eta = (self.total - step) * dt / steps if steps else float("nan")
    parts = [f"{self.name}step {step}/{self.total}"]
    parts += [f"{k} {float(v):.4g}" for k, v in metrics.items()]
    parts.append(f"{rate:.0f} img/s" if math.isfinite(rate) else "-- img/s")
    parts.append(f"ETA {_fmt(eta)}")
    return " | ".join(parts)

  def print(self, step: int, metrics: dict) -> None:
    if jax.process_index() != 0:
      return
    if self._bar is None:
      print(self.line(step, metrics), file=sys.stderr, flush=True)
      return
    self._bar.set_postfix({k: f"{float(v):.4g}" for k, v in metrics.items()}, refresh=False)
    self._bar.update(step - self._bar.n)
    if step >= self.total:
      self._bar.close()


def track(iterable, total: int | None, desc: str):
  """Yields from `iterable`; a bar on a terminal, else a plain line at most every 30 s and one
  when the loop ends (`desc: 40/40 in 12s`)."""
  if jax.process_index() != 0:
    yield from iterable
    return
  if interactive():
    yield from tqdm.tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr,
                         dynamic_ncols=True)
    return
  t0 = last = time.perf_counter()
  n = 0
  for n, item in enumerate(iterable, start=1):
    yield item
    now = time.perf_counter()
    if now - last >= PLAIN_EVERY_S:
      last = now
      eta = (total - n) * (now - t0) / n if total else float("nan")
      print(f"{desc}: {n}/{total or '?'} | ETA {_fmt(eta)}", file=sys.stderr, flush=True)
  if time.perf_counter() - t0 >= PLAIN_EVERY_S:
    print(f"{desc}: {n}/{total or n} in {_fmt(time.perf_counter() - t0)}", file=sys.stderr,
          flush=True)
