"""SSL step time (SimCLR, BYOL; views made on device) and the views' share of it; the same
objective in eager PyTorch with lightly's heads, losses and transforms where they are installed.

  python benchmarks/ssl_step.py [--objectives simclr,byol] [--model resnet18] [--size 64]
      [--batch 64] [--steps 30] [--rounds 5] [--torch-python PATH]

Prints one JSON line per objective. The JAX step is the trainer's (`train.make_ssl_train_step`,
LARS, the objective's published heads) compiled for one device; `views_s` times the same
view generation (`ssl.augment.make_views`) jitted alone on the same batch, and `views_share` is
its ratio to the step. The PyTorch step (benchmarks/torch_ssl_reference.py, a process of its own,
as in train_step.py) includes its augmentation too: lightly's SimCLR / BYOL transforms on PIL
images, one example at a time as its data loaders do, then forward, loss and an SGD step.
Where JAX runs on a GPU, PyTorch runs on it too (CUDA), and its model part is also timed alone
on views made once (`torch_model_step_s`: lightly with enough loader workers to hide the host
transforms, the stricter comparison). `--torch-python` runs it with another interpreter (one
with torch, torchvision and lightly).
Rounds alternate the runners (see train_step.py) and ratios are medians of per-round ratios; each
round times 6 steps by default (with 2, a round's median is the mean of two steps, one of them
right after the other runner's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import paired_ratio, served, step_time, time_interleaved  # noqa: E402

from repsim_jax import config_lib, models, parallel, ssl, train  # noqa: E402
from repsim_jax.cpu import host  # noqa: E402
from repsim_jax.optim import optimizers  # noqa: E402


def jax_runners(objective: str, model_name: str, size: int, batch: int):
  """(compile seconds, step runner, views runner) for the trainer's SSL step."""
  model = models.get_model(model_name, 0, bn_axis_name=parallel.AXIS)
  obj = ssl.get_objective(objective, config_lib.ssl_config(), size, 1000)
  x = np.random.default_rng(0).uniform(size=(batch, size, size, 3)).astype(np.float32)
  variables = jax.tree.map(np.asarray, dict(model.init(jax.random.PRNGKey(0), x[:1])))
  feature_dim = model.apply(variables, x[:1])[1]["pre_logits"].shape[-1]
  heads, obj_state = obj.init(jax.random.PRNGKey(1), variables, feature_dim)
  params = {"model": variables["params"], "method": {}, "ssl": heads}
  ocfg = config_lib.train_config().optim
  ocfg.name, ocfg.lr, ocfg.weight_decay = "lars", 0.3 * batch / 256, 1e-6
  tx = optimizers.make_optimizer(ocfg, 1000, params)[0]
  state = train.TrainState(step=np.asarray(0, np.int32), params=params,
                           batch_stats=variables["batch_stats"], opt_state=tx.init(params),
                           ref_variables={}, nonfinite_step=np.asarray(-1, np.int32),
                           skipped_steps=np.asarray(0, np.int32), objective_state=obj_state)
  dp = parallel.DataParallel("shard_map", 1)
  step = dp.compile(train.make_ssl_train_step(model, obj, tx, (0.5,) * 3, (0.25,) * 3))
  holder = [dp.put_replicated(state)]
  b = dp.put_batch({"image": x})
  rng = dp.put_replicated(np.zeros((2,), np.uint32))
  specs = obj.view_specs()
  views = jax.jit(lambda k, im: ssl.augment.make_views(k, im, specs))
  xs, key = jnp.asarray(x), jax.random.PRNGKey(0)

  def run_step():
    t0 = time.perf_counter()
    holder[0], m = step(holder[0], b, rng)
    jax.block_until_ready(m)
    return time.perf_counter() - t0

  def run_views():
    t0 = time.perf_counter()
    jax.block_until_ready(views(key, xs))
    return time.perf_counter() - t0

  compile_s = run_step()
  run_views()
  return compile_s, (lambda n: [run_step() for _ in range(n)]), (lambda n: [run_views() for _ in range(n)])


def torch_runner(python: str, objective: str, model_name: str, size: int, batch: int,
                 device: str, part: str):
  """Times n eager PyTorch + lightly steps in a process of its own; None where it cannot run."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_ssl_reference.py")
  return served([python, script, objective, model_name, str(size), str(batch), device, part])


@host.single_threaded_blas()
def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--objectives", default="simclr,byol")
  ap.add_argument("--model", default="resnet18")
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--torch-python", default=sys.executable)
  ap.add_argument("--no-torch", action="store_true")
  args = ap.parse_args()
  for objective in args.objectives.split(","):
    compile_s, run_step, run_views = jax_runners(objective, args.model, args.size, args.batch)
    runners = {"step": run_step, "views": run_views}
    if not args.no_torch:
      # On a GPU both the whole lightly step (its host transforms included) and its model part
      # alone (views made once: as if loader workers hid the transforms) are timed.
      device = "cuda" if jax.default_backend() == "gpu" else "cpu"
      for part in ("step", "model") if device == "cuda" else ("step",):
        made = torch_runner(args.torch_python, objective, args.model, args.size, args.batch,
                            device, part)
        if made is not None:
          runners["torch" if part == "step" else "torch_model"] = made
    t = time_interleaved(runners, args.steps, args.rounds)
    s = step_time(t["step"])
    row = {"objective": objective, "model": args.model, "size": args.size, "batch": args.batch,
           "compile_s": round(compile_s, 2), "step_s": round(s, 4),
           "images_per_s": round(args.batch / s, 1), "views_s": round(step_time(t["views"]), 4),
           "views_share": round(paired_ratio(t["views"], t["step"]), 3),
           "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}
    if "torch" in t:
      row["torch_step_s"] = round(step_time(t["torch"]), 4)
      row["ratio_ours_over_torch"] = round(paired_ratio(t["step"], t["torch"]), 3)
      row["ratio_ours_over_torch_fastest"] = round(t["step"].min() / t["torch"].min(), 3)
    if "torch_model" in t:
      row["torch_model_step_s"] = round(step_time(t["torch_model"]), 4)
      row["ratio_ours_over_torch_model"] = round(paired_ratio(t["step"], t["torch_model"]), 3)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  host.malloc_on_huge_pages()
  main()
