"""Images/s and compile time of the jitted train step; PyTorch eager ratio where torch exists.

  python benchmarks/train_step.py [--steps 10] [--models resnet18@64,resnet18@224,vit_s16@224]
      [--methods full_ft,repsim:learned,repsim:procrustes,repsim:covariance,full_ft+sim]

A method spec `NAME[:q_mode][+sim]`; `+sim` turns on in-step similarity logging (linear CKA of
every representation to the pretrained model) on every step, to measure its overhead.

Prints one JSON line per (model, size, method). The step is the trainer's own per-device step
(`train.make_train_step`) compiled for the single host CPU device, batch 32, SGD momentum.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

import numpy as np

from repsim_jax import config_lib, methods, models, parallel, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repsim_jax.optim import optimizers


def build(model_name: str, size: int, method_spec: str, batch: int):
  method_spec, sim = method_spec.removesuffix("+sim"), method_spec.endswith("+sim")
  name, _, mode = method_spec.partition(":")
  mcfg = config_lib.method_config(name, **({"q_mode": mode} if mode else {}))
  model = models.get_model(model_name, 10, bn_axis_name=parallel.AXIS,
                           **({"image_size": size} if model_name.startswith("vit") else {}))
  x = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
  y = np.random.default_rng(1).integers(0, 10, batch).astype(np.int32)
  variables = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0), x[:1], train=False))
  variables = dict(variables)
  variables.setdefault("batch_stats", {})
  method = methods.get_method(mcfg)
  mparams = method.init_params(None, variables, [{"image": x}], model.apply)
  params = {"model": variables["params"], "method": mparams}
  ocfg = config_lib.train_config().optim
  tx = method.optimizer(lambda offset=0: optimizers.make_optimizer(ocfg, 1000, params)[0], params)
  state = train.TrainState(
      step=np.asarray(0, np.int32), params=params, batch_stats=variables["batch_stats"],
      opt_state=tx.init(params),
      ref_variables=variables if (method.needs_reference or method.reference_forward or sim)
      else {},
      nonfinite_step=np.asarray(-1, np.int32))
  dp = parallel.DataParallel("shard_map", 1)
  step = dp.compile(train.make_train_step(model, method, tx, "multiclass", 1 if sim else 0))
  return dp, step, dp.put_replicated(state), dp.put_batch({"image": x, "label": y})


def time_jax(model_name, size, method_spec, batch, steps):
  dp, step, state, b = build(model_name, size, method_spec, batch)
  rng = dp.put_replicated(np.zeros((2,), np.uint32))
  t0 = time.perf_counter()
  state, m = step(state, b, rng)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, b, rng)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return compile_s, float(np.median(times))


def time_torch(model_name, size, batch, steps):
  try:
    import torch
  except ImportError:
    return None
  import torch_reference
  try:
    net = torch_reference.make(model_name, size)
  except ValueError:
    return None
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  x = torch.randn(batch, 3, size, size)
  y = torch.randint(0, 10, (batch,))
  net.train()
  times = []
  for i in range(steps + 1):
    t0 = time.perf_counter()
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    if i:
      times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--models", default="resnet18@64,resnet18@224,vit_s16@224")
  ap.add_argument("--methods", default="full_ft")
  args = ap.parse_args()
  for spec in args.models.split(","):
    model_name, size = spec.split("@")
    size = int(size)
    base = None
    for method_spec in args.methods.split(","):
      compile_s, step_s = time_jax(model_name, size, method_spec, args.batch, args.steps)
      row = {"model": model_name, "size": size, "method": method_spec, "batch": args.batch,
             "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
             "images_per_s": round(args.batch / step_s, 1), "devices": jax.device_count(),
             "backend": jax.default_backend()}
      if base is None:
        base = step_s
        torch_s = time_torch(model_name, size, args.batch, args.steps)
        if torch_s is not None:
          row["torch_step_s"] = round(torch_s, 4)
          row["ratio_ours_over_torch"] = round(step_s / torch_s, 3)
      else:
        row["ratio_over_first_method"] = round(step_s / base, 3)
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
