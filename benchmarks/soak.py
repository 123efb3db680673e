"""Host memory over a long run: does RSS stay flat after warm-up?

  python benchmarks/soak.py [--steps 20000] [--every 500] [--workdir /tmp/soak]

A tiny run (small_cnn, synthetic 16 px images, batch 32, 1 device) for `--steps` steps with an
evaluation of val and test and a checkpoint every `--every` steps (keeping 2), through
`train.fit` as the command line runs it. A thread samples this process's resident set size
(VmRSS) every second with the step the run has logged. Prints one JSON line: RSS at the end of
warm-up (the first `--warmup` steps, which compile the train, eval and checkpoint paths), at the
end, its maximum after warm-up, the growth after warm-up in percent, and RSS at each quarter
of the steps after warm-up (a leak grows steadily; allocator settling does not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time

from repsim_jax import config_lib, metric_writers, train


def rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def last_step(workdir: str) -> int:
  try:
    rows = metric_writers.read_metrics(workdir)
  except (FileNotFoundError, ValueError):
    return 0
  return rows[-1]["step"] if rows else 0


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=20000)
  ap.add_argument("--every", type=int, default=500)
  ap.add_argument("--warmup", type=int, default=2000)
  ap.add_argument("--workdir", default="/tmp/repsim_soak")
  args = ap.parse_args()
  shutil.rmtree(args.workdir, ignore_errors=True)
  c = config_lib.train_config()
  c.data.source = "synthetic"
  c.data.name = "medical_gray"
  c.data.data_dir = os.path.join(args.workdir, "data")
  c.data.size, c.data.num_classes = 16, 3
  c.data.train_size, c.data.val_size, c.data.test_size = 512, 128, 128
  c.model.name = "small_cnn"
  c.train.batch_size = 32
  c.train.num_steps = args.steps
  c.train.log_every = 100
  c.train.eval_every = c.train.checkpoint_every = args.every
  c.train.eval_splits = ("val", "test")
  c.train.keep_checkpoints = 2
  c.train.tensorboard = False
  c.analysis.final_similarity = False
  c.parallel.num_devices = 1
  run_dir = os.path.join(args.workdir, "run")
  samples, done = [], threading.Event()

  def sample():
    while not done.wait(1.0):
      samples.append((last_step(run_dir), rss_mib()))

  t = threading.Thread(target=sample, daemon=True)
  t.start()
  start = time.perf_counter()
  train.fit(c, run_dir)
  seconds = time.perf_counter() - start
  done.set()
  t.join()
  samples.append((args.steps, rss_mib()))
  after = [r for s, r in samples if s >= args.warmup]
  warm = after[0]
  print(json.dumps({"steps": args.steps, "eval_and_checkpoint_every": args.every,
                    "warmup_steps": args.warmup, "rss_mib_after_warmup": round(warm, 1),
                    "rss_mib_end": round(after[-1], 1), "rss_mib_max_after_warmup": round(max(after), 1),
                    "growth_percent": round(100 * (after[-1] - warm) / warm, 2),
                    "max_growth_percent": round(100 * (max(after) - warm) / warm, 2),
                    "rss_mib_by_step": {s: round(r, 1) for s, r in _by_quarter(samples, args)},
                    "samples": len(samples), "seconds": round(seconds, 1)}))


def _by_quarter(samples, args):
  """(step, RSS) of the first sample at or past each quarter of the steps after warm-up."""
  marks = [args.warmup + q * (args.steps - args.warmup) // 4 for q in range(5)]
  for m in marks:
    hit = next(((s, r) for s, r in samples if s >= m), samples[-1])
    yield hit


if __name__ == "__main__":
  main()
