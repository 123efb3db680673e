"""Images/s of the data-parallel feature extraction used by the transferability job.

  python benchmarks/feature_extraction.py [--model resnet50] [--size 224] [--batch 64] [--batches 4]

Runs `evaluation.make_step` (eval-mode forward, every representation pooled on device)
through `DataParallel` over all local devices on random images, and prints one JSON line.
"""

import argparse
import json
import time

import jax
import numpy as np

from repsim_jax import evaluation, models, parallel


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="resnet50")
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--batches", type=int, default=4)
  a = ap.parse_args()
  model = models.get_model(a.model, 1000, bn_axis_name=parallel.AXIS)
  x = np.random.default_rng(0).normal(size=(a.batch, a.size, a.size, 3)).astype(np.float32)
  variables = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0), x[:1], train=False))
  dp = parallel.DataParallel("shard_map", -1)
  step = dp.compile(evaluation.make_step(model, layers=None), donate_state=False, sharded_out=True)
  batch = {"image": x, "label": np.zeros(a.batch, np.int32), "mask": np.ones(a.batch, np.float32)}
  t0 = time.perf_counter()
  evaluation.extract_features(dp, step, variables, [batch])
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  feats = evaluation.extract_features(dp, step, variables, [batch] * a.batches)
  dt = time.perf_counter() - t0
  print(json.dumps({"model": a.model, "size": a.size, "batch": a.batch, "devices": dp.num_devices,
                    "backend": jax.default_backend(), "compile_plus_first_s": round(compile_s, 2),
                    "images_per_s": round(a.batches * a.batch / dt, 1),
                    "feature_dim": int(feats["pre_logits"].shape[1])}))


if __name__ == "__main__":
  main()
