"""Images/s and compile time of the jitted train step; PyTorch eager ratio where torch exists.

  python benchmarks/train_step.py [--steps 10] [--models resnet18@64,resnet18@224,vit_s16@224]
      [--methods full_ft,repsim:learned,repsim:procrustes,repsim:covariance,full_ft+sim]

A method spec `NAME[:q_mode[:retraction]][+sim][+sharp][+nocheck]`; `+sharp` logs every step
with in-step SAM sharpness (`analysis.in_step_sharpness="sam"`, default settings), so its ratio
over the plain step, minus 1 and divided by `train.log_every` (20), is the overhead at the
default logging cadence; `+nocheck` leaves out the step's
finiteness check of the new parameters and BatchNorm statistics, to measure what it costs.
Steps are timed as a run's unlogged steps are; `+sim` logs every step, with in-step similarity
(linear CKA of every representation to the pretrained model) and the method's diagnostics, to
measure what a logged step costs.

Prints one JSON line per (model, size, method). The step is the trainer's own per-device step
(`train.make_train_step`) compiled for one device of the default backend, batch 32, SGD momentum.
All runners are compiled first, then timed in rounds (--rounds) that take them in turn; a step
time is the median of the rounds' medians, and a ratio the median of the rounds' ratios, so that
load that comes and goes does not skew it. `..._fastest` ratios divide the fastest step of each:
on a shared machine other processes only ever add time, so that is the figure least touched by
them (timeit's advice for noisy machines). Where torch is installed, the same model and batch in
eager PyTorch runs on the same kind of device (CUDA when JAX runs on a GPU, with TF32 allowed as
JAX allows it by default there), in a process of its own (benchmarks/torch_reference.py) timed in
the same rounds. Host BLAS is single-threaded, as in the trainer (`cpu.single_threaded_blas`),
and glibc malloc uses huge pages, as in the command line (`cpu.malloc_on_huge_pages`; the
PyTorch process inherits it).
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import subprocess
import sys
import time

import jax

import numpy as np

from repsim_jax import config_lib, methods, models, parallel, train
from repsim_jax.cpu import host
from repsim_jax.optim import optimizers


def build(model_name: str, size: int, method_spec: str, batch: int):
  method_spec, nocheck = method_spec.removesuffix("+nocheck"), method_spec.endswith("+nocheck")
  checked_spec = method_spec
  method_spec, sharp = method_spec.removesuffix("+sharp"), method_spec.endswith("+sharp")
  method_spec, sim = method_spec.removesuffix("+sim"), method_spec.endswith("+sim")
  name, *rest = method_spec.split(":")
  overrides = dict(zip(("q_mode", "retraction"), rest))
  mcfg = config_lib.method_config(name, **overrides)
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
      nonfinite_step=np.asarray(-1, np.int32), skipped_steps=np.asarray(0, np.int32))
  dp = parallel.DataParallel("shard_map", 1)
  # Without +sim the step runs as on the steps a run does not log (diagnostics skipped).
  log_every = 1 if (sim or sharp) else config_lib.train_config().train.log_every
  # +sim / +sharp: the logged step as the trainer compiles it when it has in-step analyses.
  step = dp.compile(train.make_train_step(
      model, method, tx, "multiclass", log_every, in_step_similarity=sim,
      in_step_sharpness="sam" if sharp else "",
      sharpness_cfg=config_lib.train_config().analysis.sharpness,
      diagnose=True if (sim or sharp) else None))
  state, b = dp.put_replicated(state), dp.put_batch({"image": x, "label": y})
  if nocheck:  # trace the step once with the parameter/statistics finiteness check removed
    real, train._all_finite = train._all_finite, lambda tree: True  # noqa: E731
    try:
      jax.block_until_ready(step(state, b, dp.put_replicated(np.zeros((2,), np.uint32))))
    finally:
      train._all_finite = real
    state = build(model_name, size, checked_spec, batch)[2]
  return dp, step, state, b


def jax_runner(model_name, size, method_spec, batch):
  """Compiles the step; returns (compile seconds, a function that times n steps)."""
  dp, step, state, b = build(model_name, size, method_spec, batch)
  rng = dp.put_replicated(np.zeros((2,), np.uint32))
  holder = [state]

  def run():
    t0 = time.perf_counter()
    holder[0], m = step(holder[0], b, rng)
    jax.block_until_ready(m)
    return time.perf_counter() - t0

  return run(), lambda n: [run() for _ in range(n)]


def torch_runner(model_name, size, batch):
  """(a function that times n eager PyTorch steps of the same model and batch, device), run by
  torch_reference.py in a process of its own, on the GPU when JAX has one; None without torch."""
  if importlib.util.find_spec("torch") is None:
    return None
  device = "cuda" if jax.default_backend() == "gpu" else "cpu"
  run = served([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "torch_reference.py"),
                model_name, str(size), str(batch), device])
  return None if run is None else (run, device)


def served(cmd):
  """Starts a reference process that prints `ready` (or says why not and exits), then answers
  each line `N` with a JSON list of N step times; returns a function of N, or None."""
  proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  if proc.stdout.readline().strip() != "ready":
    proc.wait()
    return None
  atexit.register(proc.kill)

  def run(n):
    proc.stdin.write(f"{n}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())

  return run


def time_interleaved(runners: dict, steps: int, rounds: int) -> dict:
  """Per runner, a (rounds, steps per round) array of seconds per step. Rounds run the runners in
  turn, in alternating order (ABBA), so that load from other processes on a shared machine, and
  its drift, fall on every runner alike."""
  times = {k: [] for k in runners}
  per_round = max(1, -(-steps // rounds))
  order = list(runners)
  for r in range(rounds):
    for k in (order if r % 2 == 0 else order[::-1]):
      times[k].append(runners[k](per_round))
  return {k: np.asarray(v, np.float64) for k, v in times.items()}


def step_time(rounds: np.ndarray) -> float:
  """The median over rounds of each round's median step time."""
  return float(np.median(np.median(rounds, 1)))


def paired_ratio(rounds_a: np.ndarray, rounds_b: np.ndarray) -> float:
  """Median over rounds of a's median step time over b's in the same round: the ratio with the
  load that varies from round to round divided out."""
  return float(np.median(np.median(rounds_a, 1) / np.median(rounds_b, 1)))


@host.single_threaded_blas()
def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=10, help="timed steps per runner")
  ap.add_argument("--rounds", type=int, default=5, help="alternating rounds they are split into")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--models", default="resnet18@64,resnet18@224,vit_s16@224")
  ap.add_argument("--methods", default="full_ft")
  ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
  args = ap.parse_args()
  for spec in args.models.split(","):
    model_name, size = spec.split("@")
    size = int(size)
    method_specs = args.methods.split(",")
    runners, compile_s = {}, {}
    for method_spec in method_specs:
      compile_s[method_spec], runners[method_spec] = jax_runner(model_name, size, method_spec,
                                                                args.batch)
    torch_device = None
    if not args.no_torch:
      made = torch_runner(model_name, size, args.batch)
      if made is not None:
        runners["torch"], torch_device = made
    rounds_s = time_interleaved(runners, args.steps, args.rounds)
    first = rounds_s[method_specs[0]]
    for method_spec in method_specs:
      s = step_time(rounds_s[method_spec])
      row = {"model": model_name, "size": size, "method": method_spec, "batch": args.batch,
             "compile_s": round(compile_s[method_spec], 2), "step_s": round(s, 4),
             "images_per_s": round(args.batch / s, 1), "devices": jax.device_count(),
             "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}
      if method_spec == method_specs[0] and "torch" in rounds_s:
        row["torch_device"] = torch_device
        row["torch_step_s"] = round(step_time(rounds_s["torch"]), 4)
        row["ratio_ours_over_torch"] = round(paired_ratio(first, rounds_s["torch"]), 3)
        row["ratio_ours_over_torch_fastest"] = round(first.min() / rounds_s["torch"].min(), 3)
      if method_spec != method_specs[0]:
        row["ratio_over_first_method"] = round(paired_ratio(rounds_s[method_spec], first), 3)
        row["ratio_over_first_method_fastest"] = round(rounds_s[method_spec].min() / first.min(), 3)
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  host.malloc_on_huge_pages()  # may re-exec this process, as repsim_jax.main does
  main()
