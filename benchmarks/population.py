"""K fine-tuning runs as one population program against K standalone runs, as a user runs them.

  python benchmarks/population.py [--members 8] [--steps 300] [--short 10] [--workdir DIR]

(`--short 0` skips the breakdown below, half of the commands; the speed-up is printed before it.)

The default run's fine-tune stage (configs/finetune.py at the default run's sizes: resnet_small,
32 px synthetic medical_gray target, batch 64, full fine-tuning from random init; members differ in
seed) is launched through the command line: once with `--config.train.population=seed=0,...,K-1`,
and K times one after another with `:seed=i`, each a fresh process (start-up and compilation
included). Every figure is the wall time of whole commands, measured in this one invocation:

- total: K standalone runs vs one population of K (the ratio is the speed-up a user sees);
- where the time goes, from the same commands at `--short` steps: per step = (T(steps) -
  T(short)) / (steps - short); fixed = T(short) minus the process start-up (importing jax and
  the package) = data, compilation, the final evaluation and checkpoints; start-up as measured.

Prints one JSON line per measurement, the speed-up as soon as it is known, then where the time goes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config.data.train_size=1500", "--config.data.val_size=300",
         "--config.data.test_size=1000", "--config.data.num_classes=4",
         "--config.data.difficulty=0.5", "--config.data.imbalance=3.0",
         "--config.train.log_every=50", "--config.train.checkpoint_every=100",
         "--config.train.tensorboard=False", "--config.analysis.final_similarity=False"]


def _command(steps: int, seed: int, population: str, data_dir: str, workdir: str) -> list[str]:
  arg = (f"model=resnet_small,source=synthetic,dataset=medical_gray,size=32,steps={steps},"
         f"batch=64,lr=0.02,seed={seed},data_dir={data_dir}")
  cmd = [sys.executable, "-m", "repsim_jax.main", f"--config={REPO}/configs/finetune.py:{arg}",
         f"--workdir={workdir}", *FLAGS]
  if population:
    cmd.append(f"--config.train.population={population}")
  return cmd


def _timed(cmd) -> float:
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
  return time.perf_counter() - t0


def measure(members: int, steps: int, root: str, data_dir: str) -> dict:
  """Wall seconds of K standalone runs and of one population of K at `steps` steps."""
  seeds = ",".join(str(i) for i in range(members))
  pop = _timed(_command(steps, 0, f"seed={seeds}", data_dir, os.path.join(root, f"pop{steps}")))
  solo = [_timed(_command(steps, i, "", data_dir, os.path.join(root, f"solo{steps}-{i}")))
          for i in range(members)]
  return {"steps": steps, "population_s": round(pop, 1), "standalone_s": round(sum(solo), 1),
          "standalone_each_s": [round(s, 1) for s in solo]}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--members", type=int, default=8)
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--short", type=int, default=10)
  ap.add_argument("--workdir", default="")
  a = ap.parse_args()
  root = a.workdir or tempfile.mkdtemp(prefix="population_bench_")
  data_dir = os.path.join(root, "data")
  # The synthetic set is generated once (cached under data_dir) before anything is timed.
  subprocess.run(_command(1, 0, "", data_dir, os.path.join(root, "warm")), check=True, cwd=REPO,
                 stdout=subprocess.DEVNULL)
  startup = min(_timed([sys.executable, "-c", "import jax, repsim_jax.train; jax.devices()"])
                for _ in range(3))
  print(json.dumps({"startup_s": round(startup, 2)}), flush=True)
  full = measure(a.members, a.steps, root, data_dir)
  print(json.dumps(full), flush=True)
  summary = {"members": a.members, "steps": a.steps,
             "speedup": round(full["standalone_s"] / full["population_s"], 2)}
  print(json.dumps(summary), flush=True)
  if not a.short:
    return
  short = measure(a.members, a.short, root, data_dir)
  print(json.dumps(short), flush=True)
  k, d = a.members, a.steps - a.short
  per_step_pop = (full["population_s"] - short["population_s"]) / d
  per_step_solo = (full["standalone_s"] - short["standalone_s"]) / (k * d)
  print(json.dumps({
      **summary,
      "population": {"total_s": full["population_s"],
                     "fixed_s": round(short["population_s"] - startup, 1),
                     "per_step_s (all members)": round(per_step_pop, 4)},
      "standalone": {"total_s": full["standalone_s"],
                     "fixed_s_each": round(short["standalone_s"] / k - startup, 1),
                     "per_step_s_each": round(per_step_solo, 4)},
      "startup_s_each": round(startup, 2),
      "step_ratio": round(k * per_step_solo / per_step_pop, 2)}), flush=True)


if __name__ == "__main__":
  main()
