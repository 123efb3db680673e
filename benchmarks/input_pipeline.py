"""Input pipeline throughput: images/s delivered at 64 px with augmentation, global batch 32.

Runs the grain pipeline on a synthetic MedMNIST-format set (generated into a temp dir, read
through the real npz loader) for a few configurations and prints one JSON line each.
Usage: python benchmarks/input_pipeline.py [--steps 200] [--workers 0,2]
"""

import argparse
import json
import os
import tempfile
import time

from repsim_jax.data import load_synthetic, make_train_iter


def measure(source, *, stored, image_size, channels, augment, worker_count, prefetch, steps,
            batch=32):
  it = make_train_iter(source, global_batch_size=batch, image_size=image_size, channels=channels,
                       mean=0.5, std=0.25, augment=augment, seed=0, worker_count=worker_count,
                       prefetch=prefetch)
  try:
    for _ in range(10):  # warm-up: worker start-up, first permutation
      next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
      next(it)
    dt = time.perf_counter() - t0
  finally:
    it.close()
  return {"stored": stored, "image_size": image_size, "channels": channels, "augment": augment,
          "global_batch_size": batch, "worker_count": worker_count, "prefetch": prefetch,
          "steps": steps, "images_per_s": round(steps * batch / dt, 1),
          "ms_per_batch": round(1000 * dt / steps, 3)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--workers", default="0,2")
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(",") if w]
  with tempfile.TemporaryDirectory() as tmp:
    configs = [
        ("medical_rgb", 64, 3, "64px rgb"),    # stored at 64 px: no resize
        ("medical_gray", 28, 3, "28px gray"),  # resize 28 -> 64 and gray -> RGB
    ]
    print(json.dumps({"cpu_count": os.cpu_count()}))
    for kind, size, channels, stored in configs:
      splits, _ = load_synthetic(kind=kind, num_classes=8, train_size=4096, val_size=8,
                                 test_size=8, size=size, seed=0, data_dir=tmp)
      for augment in ("flip_crop", "dihedral_crop"):
        for w in workers:
          print(json.dumps(measure(splits["train"], stored=stored, image_size=64,
                                   channels=channels, augment=augment, worker_count=w,
                                   prefetch=2, steps=args.steps)), flush=True)


if __name__ == "__main__":
  main()
