"""Host memory of the input pipeline on a large MedMNIST-format set, in memory vs memory-mapped.

  python benchmarks/data_memory.py [--images 14000] [--workers 0,2,8] [--in_memory_workers 0,2]
      [--dir /tmp/big]

Writes a synthetic 224 px RGB set (`--images` train images, 2.1 GB at 14,000) as an npz, then for
each mode (`mmap` off: the set in process memory; on: read through the per-split .npy cache) and
each grain worker count runs one epoch of the training iterator (flip_crop augmentation, global
batch 64) in a fresh process, sampling the memory of that process and its workers. Prints one
JSON line per run: peak total PSS (proportional set size: shared pages counted once, split
between the processes mapping them; what the machine really spends) and peak summed RSS (shared
pages counted in every process), both in GiB, images/s, and the load time (first load converts
the npz into the cache; later loads map it).
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np


def make_set(path: str, n: int) -> None:
  rng = np.random.default_rng(0)
  arrays = {}
  for split, k in (("train", n), ("val", 500), ("test", 500)):
    arrays[f"{split}_images"] = rng.integers(0, 256, (k, 224, 224, 3), dtype=np.uint8)
    arrays[f"{split}_labels"] = rng.integers(0, 9, (k, 1))
  from repsim_jax import io  # pylint: disable=g-import-not-at-top
  io.save_npz(path, **arrays)  # whole or not at all: a killed run leaves no truncated set


def child(path: str, mmap: bool, workers: int) -> None:
  from repsim_jax.data import make_train_iter, medmnist  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  splits, _ = medmnist.load_npz(path, medmnist.medmnist_spec("pathmnist", 224), mmap=mmap)
  load_s = time.perf_counter() - t0
  train = splits["train"]
  batch = 64
  it = make_train_iter(train, global_batch_size=batch, image_size=224, channels=3,
                       augment="flip_crop", seed=0, worker_count=workers)
  steps = len(train) // batch
  next(it)
  t0 = time.perf_counter()
  for _ in range(steps - 1):
    next(it)
  dt = time.perf_counter() - t0
  it.close()
  print(json.dumps({"load_s": round(load_s, 2), "images_per_s": round((steps - 1) * batch / dt, 1)}),
        flush=True)


def tree(pid: int) -> list[int]:
  out, todo = [], [pid]
  while todo:
    p = todo.pop()
    out.append(p)
    try:
      with open(f"/proc/{p}/task/{p}/children") as f:
        todo += [int(c) for c in f.read().split()]
    except OSError:
      pass
  return out


def memory(pids) -> tuple[float, float]:
  pss = rss = 0
  for p in pids:
    try:
      with open(f"/proc/{p}/smaps_rollup") as f:
        for line in f:
          if line.startswith("Pss:"):
            pss += int(line.split()[1])
          elif line.startswith("Rss:"):
            rss += int(line.split()[1])
    except OSError:
      pass
  return pss / 2**20, rss / 2**20  # kB -> GiB


def measure(path: str, mmap: bool, workers: int) -> dict:
  proc = subprocess.Popen([sys.executable, __file__, "--child", path, str(int(mmap)),
                           str(workers)], stdout=subprocess.PIPE, text=True)
  peak = [0.0, 0.0]

  def sample():
    while proc.poll() is None:
      pss, rss = memory(tree(proc.pid))
      peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
      time.sleep(0.2)

  t = threading.Thread(target=sample)
  t.start()
  out = proc.communicate()[0]
  t.join()
  res = json.loads(out.strip().splitlines()[-1])
  return {"mmap": mmap, "workers": workers, "peak_pss_gib": round(peak[0], 2),
          "peak_rss_sum_gib": round(peak[1], 2), **res}


def main():
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    child(sys.argv[2], bool(int(sys.argv[3])), int(sys.argv[4]))
    return
  ap = argparse.ArgumentParser()
  ap.add_argument("--images", type=int, default=14000)
  ap.add_argument("--workers", default="0,2,8", help="worker counts, memory-mapped")
  # Each in-memory worker holds a copy of the set: 8 of them need 9x its size.
  ap.add_argument("--in_memory_workers", default="0,2", help="worker counts, in memory")
  ap.add_argument("--dir", default="/tmp/repsim_data_memory")
  a = ap.parse_args()
  os.makedirs(a.dir, exist_ok=True)
  path = os.path.join(a.dir, "pathmnist_224.npz")
  if not os.path.exists(path):
    make_set(path, a.images)
  print(json.dumps({"set_gib": round(os.path.getsize(path) / 2**30, 2), "train_images": a.images}),
        flush=True)
  for mmap, counts in ((False, a.in_memory_workers), (True, a.workers)):
    for w in (int(x) for x in counts.split(",") if x):
      print(json.dumps(measure(path, mmap, w)), flush=True)


if __name__ == "__main__":
  main()
