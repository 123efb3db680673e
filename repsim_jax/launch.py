"""Where the runs of a multi-run job execute (`config.launch`, a study's `--executor`).

- `inline`: one after another in this process (the default).
- `local`: a pool of `workers` worker processes on this machine (submitit's local executor), each
  with its own device visibility (`devices_per_worker` GPUs, or simulated CPU devices).
- `slurm`: a SLURM job array through submitit (`pip install 'repsim_jax[cluster]'`), at most
  `array_parallelism` tasks at a time, each task one run; a preempted or timed-out task is
  requeued (up to `max_requeues`) and resumes from its last checkpoint.
- `debug`: submitit's in-process executor (the submitit code path, no processes), for tests.

With `hosts_per_run` > 1 each task is one multi-host run: a SLURM job of that many nodes (one task
per node), or that many processes of one local job, joined by `jax.distributed` with the
coordinator on the job's first host (`distributed_from_job`).

Every run is a `train.train_and_evaluate(cfg, run_dir)` in a directory named by its config
identity, so a relaunch submits only what has no results.json (finished runs are read back),
never repeats a finished run and never mixes two configs' results. The parent collects results
as runs finish, prints progress (finished / running / failed / queued) when it changes, and
reports each failed run with its log path instead of hanging; finished runs stay on disk.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import os
import time
from typing import Any, Sequence

import ml_collections

EXECUTORS = ("inline", "local", "slurm", "debug")


def launch_config() -> ml_collections.ConfigDict:
  """`config.launch`: the executor and its resources."""
  c = ml_collections.ConfigDict()
  c.executor = "inline"          # inline | local | slurm | debug
  c.workers = 2                  # local: runs at once
  c.devices_per_worker = 0       # local: GPUs per worker (CUDA_VISIBLE_DEVICES slices); on CPU,
                                 # simulated devices per worker; 0 = every worker sees all
  c.mem_fraction = 0.0           # local, workers sharing accelerators: XLA memory fraction per
                                 # worker (0 = 0.9 / workers when devices_per_worker is 0)
  c.folder = ""                  # submitit logs and pickles; "" = <workdir>/launch
  c.partition = ""               # slurm
  c.account = ""
  c.qos = ""
  c.constraint = ""
  c.time_min = 240               # slurm: minutes per task (a task past it is requeued)
  c.gpus_per_task = 0
  c.cpus_per_task = 8
  c.mem_gb = 0                   # 0 = the partition's default
  c.array_parallelism = 64       # slurm: tasks of the array running at once
  c.max_requeues = 3             # slurm: requeues per task after preemption / time-out
  c.hosts_per_run = 1            # > 1: each run is a jax.distributed run of this many processes
                                 # (slurm: nodes, one task each; local: processes of one job)
  c.coordinator_port = 0         # hosts_per_run > 1: 0 = derived from the job id
  c.poll_seconds = 5.0
  # > 1: runs that differ only in seed and population.SCALARS (seeds, lr / λ grids of one model
  # and data) train as populations of up to this many members, one program and one task each
  # (repsim_jax.population); their run directories are the standalone runs'. 0 or 1: one by one.
  c.population = 0
  return c


@dataclasses.dataclass
class Task:
  """One run: its config and its (identity-named) directory."""
  cfg: ml_collections.ConfigDict
  run_dir: str
  name: str = ""


class RunFailed(RuntimeError):
  """Some runs failed; the others finished (their results are on disk)."""


def worker_env(slot: int, launch) -> dict[str, str]:
  """Environment of local worker `slot`: its devices and, when accelerators are shared, XLA's
  memory settings (no preallocation, a fraction each), set before the worker imports jax."""
  env = {}
  k = int(launch.devices_per_worker)
  if k:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(slot * k + i) for i in range(k))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={k}"  # CPU: k simulated devices
  else:
    fraction = float(launch.mem_fraction) or 0.9 / max(int(launch.workers), 1)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.3f}"
  return env


class TrainTask:
  """The callable a submitit job runs. It sets the worker's environment before jax is imported
  and, when SLURM preempts or times the task out, asks submitit to requeue the same call: the
  trainer resumes from the run's last checkpoint."""

  def __init__(self, env: dict[str, str] | None = None, port: int = 0):
    self.env, self.port = dict(env or {}), port

  def __call__(self, cfg, run_dir):
    """One run's results, or a population's list (`cfg` and `run_dir` lists)."""
    os.environ.update(self.env)
    if not isinstance(cfg, list) and (joined := distributed_from_job(cfg, self.port)) is not cfg:
      from repsim_jax import parallel  # pylint: disable=g-import-not-at-top
      cfg = joined
      parallel.initialize_distributed(cfg.parallel)
    if isinstance(cfg, list):
      from repsim_jax import population  # pylint: disable=g-import-not-at-top
      return [o.results for o in population.fit(cfg, run_dir)]
    from repsim_jax import train  # pylint: disable=g-import-not-at-top
    return train.train_and_evaluate(cfg, run_dir)

  def checkpoint(self, cfg, run_dir: str):
    import submitit  # pylint: disable=g-import-not-at-top
    return submitit.helpers.DelayedSubmission(TrainTask(self.env, self.port), cfg, run_dir)


def distributed_from_job(cfg, port: int = 0):
  """`cfg` with this task's place in a multi-host run when the submitit job has several tasks
  (`hosts_per_run` > 1): process id = the task's global rank, coordinator = the job's first host.
  Every task derives the same port from the job id (or takes `port`, `launch.coordinator_port`),
  so they need not talk first. Outside a submitit job, or in a job of one task, `cfg` itself."""
  # Only inside a submitit job (which sets this variable): importing submitit elsewhere would
  # reconfigure logging, and absl's handler closes its stream, sys.stderr, when it is replaced.
  if not os.environ.get("SUBMITIT_EXECUTOR"):
    return cfg
  try:
    import submitit  # pylint: disable=g-import-not-at-top
    env = submitit.JobEnvironment()
  except (ImportError, RuntimeError):
    return cfg
  if env.num_tasks <= 1:
    return cfg
  from repsim_jax import config_lib  # pylint: disable=g-import-not-at-top
  port = port or (
      20000 + int(hashlib.sha256(str(env.job_id).encode()).hexdigest(), 16) % 20000)
  cfg = config_lib.set_keys(copy.deepcopy(cfg), {
      "parallel.coordinator_address": f"{env.hostnames[0]}:{port}",
      "parallel.num_processes": env.num_tasks, "parallel.process_id": env.global_rank})
  return cfg


def validate(launch) -> None:
  if launch.executor not in EXECUTORS:
    raise ValueError(f"config.launch.executor={launch.executor!r}: expected one of {EXECUTORS}")
  if launch.executor == "local" and int(launch.workers) < 1:
    raise ValueError(f"config.launch.workers={launch.workers}: expected >= 1")
  hosts = int(launch.get("hosts_per_run", 1))
  if hosts < 1:
    raise ValueError(f"config.launch.hosts_per_run={hosts}: expected >= 1")
  if hosts > 1 and launch.executor not in ("local", "slurm"):
    raise ValueError(f"config.launch.hosts_per_run={hosts}: a multi-host run needs "
                     f"config.launch.executor=local or slurm, not {launch.executor!r}")
  if hosts > 1 and int(launch.get("population", 0)) > 1:
    raise ValueError(f"config.launch.population={launch.population} with hosts_per_run={hosts}: "
                     "populations train on one host; set one of them to 1")
  if launch.executor != "inline" and importlib.util.find_spec("submitit") is None:
    raise ValueError(f"config.launch.executor={launch.executor!r} needs submitit: pip install "
                     "'repsim_jax[cluster]'")


def _executor(launch, folder: str):
  import submitit  # pylint: disable=g-import-not-at-top
  if launch.executor == "debug":
    return submitit.DebugExecutor(folder)
  if launch.executor == "local":
    ex = submitit.LocalExecutor(folder)
    ex.update_parameters(timeout_min=int(launch.time_min),
                         tasks_per_node=int(launch.get("hosts_per_run", 1)))
    return ex
  ex = submitit.AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=int(launch.max_requeues))
  params = dict(timeout_min=int(launch.time_min), slurm_array_parallelism=int(launch.array_parallelism),
                cpus_per_task=int(launch.cpus_per_task), tasks_per_node=1,
                nodes=int(launch.get("hosts_per_run", 1)),
                name="repsim_jax")
  if launch.gpus_per_task:
    params["gpus_per_node"] = int(launch.gpus_per_task)
  if launch.mem_gb:
    params["mem_gb"] = int(launch.mem_gb)
  for key in ("partition", "account", "qos", "constraint"):
    if launch[key]:
      params[f"slurm_{key}"] = launch[key]
  ex.update_parameters(**params)
  return ex


def population_groups(tasks: Sequence[Task], size: int) -> list[list[int]]:
  """Task indices in groups that can train as one population (same config up to the seed and
  population.SCALARS, supervised), each of at most `size`, in task order; singletons else."""
  from repsim_jax import config_lib, population, runs  # pylint: disable=g-import-not-at-top
  if size <= 1:
    return [[i] for i in range(len(tasks))]
  by_key: dict[str, list[int]] = {}
  for i, t in enumerate(tasks):
    c = config_lib.set_keys(copy.deepcopy(t.cfg), {
        k: type(config_lib.lookup(t.cfg, k))(0) for k in population.KEYS})
    key = runs.identity(c) if t.cfg.get("objective", "supervised") == "supervised" else f"solo{i}"
    by_key.setdefault(key, []).append(i)
  groups = [g[j:j + size] for g in by_key.values() for j in range(0, len(g), size)]
  return sorted(groups, key=lambda g: g[0])


def run_all(tasks: Sequence[Task], launch=None, folder: str = "") -> list[dict]:
  """The results of every task, in order: finished runs read back, the others trained by the
  executor (as populations with `launch.population` > 1). Raises RunFailed naming every failed
  run and its log once the others are done."""
  launch = launch or launch_config()
  validate(launch)
  groups = population_groups(tasks, int(launch.get("population", 0)))
  units = [tasks[g[0]] if len(g) == 1 else
           Task([tasks[i].cfg for i in g], [tasks[i].run_dir for i in g],
                "population of " + ", ".join(tasks[i].name or tasks[i].run_dir for i in g))
           for g in groups]
  done = _run_units(units, launch, folder)
  out: list[Any] = [None] * len(tasks)
  for g, r in zip(groups, done):
    for i, ri in zip(g, r if len(g) > 1 else [r]):
      out[i] = ri
  return out


def _read(task: Task):
  from repsim_jax import runs  # pylint: disable=g-import-not-at-top
  if isinstance(task.run_dir, list):
    found = [runs.read_results(d) for d in task.run_dir]
    return None if any(f is None for f in found) else found
  return runs.read_results(task.run_dir)


def _run_units(tasks: Sequence[Task], launch, folder: str) -> list:
  if launch.executor == "inline":
    out = []
    for t in tasks:
      out.append(TrainTask()(t.cfg, t.run_dir))
      print(f"launch: {len(out)}/{len(tasks)} tasks finished", flush=True)
    return out
  results: list[Any] = [_read(t) for t in tasks]
  todo = [i for i, r in enumerate(results) if r is None]
  folder = launch.folder or folder
  os.makedirs(folder, exist_ok=True)
  failed: dict[int, str] = {}
  if todo:
    _submit_and_wait(tasks, todo, launch, folder, results, failed)
  if failed:
    lines = "\n".join(f"  {tasks[i].name or tasks[i].run_dir}: {why}" for i, why in failed.items())
    raise RunFailed(f"{len(failed)} of {len(tasks)} runs failed (the others finished and are "
                    f"kept; relaunch to retry only these):\n{lines}")
  return results


def _failure(job, e) -> str:
  return (f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]} "
          f"(log: {job.paths.stderr})")


def _submit_and_wait(tasks, todo, launch, folder, results, failed) -> None:
  if launch.executor == "debug":  # submitit's debug jobs run when their result is asked for
    ex = _executor(launch, folder)
    for i in todo:
      job = ex.submit(TrainTask(), tasks[i].cfg, tasks[i].run_dir)
      try:
        results[i] = job.result()
      except Exception as e:  # pylint: disable=broad-except
        failed[i] = _failure(job, e)
    return
  pending = list(todo)            # not yet submitted
  running: dict[int, Any] = {}    # task index -> submitit job
  free = list(range(int(launch.workers))) if launch.executor == "local" else []
  slot_of: dict[int, int] = {}
  if launch.executor == "slurm":
    ex = _executor(launch, folder)
    with ex.batch():  # one job array
      jobs = [ex.submit(TrainTask(port=int(launch.get("coordinator_port", 0))), tasks[i].cfg,
                        tasks[i].run_dir) for i in pending]
    running, pending = dict(zip(pending, jobs)), []
  last = None
  while pending or running:
    while pending and free:  # local: one worker per slot, each with its own devices
      i, slot = pending.pop(0), free.pop(0)
      ex = _executor(launch, os.path.join(folder, f"worker{slot}"))
      task = TrainTask(worker_env(slot, launch), int(launch.get("coordinator_port", 0)))
      running[i] = ex.submit(task, tasks[i].cfg, tasks[i].run_dir)
      slot_of[i] = slot
    for i, job in list(running.items()):
      if not job.done():
        continue
      del running[i]
      if i in slot_of:
        free.append(slot_of.pop(i))
      try:
        results[i] = job.results()[0]  # a multi-host job: process 0's
      except Exception as e:  # pylint: disable=broad-except
        failed[i] = _failure(job, e)
        print(f"launch: failed {tasks[i].name or tasks[i].run_dir}: {failed[i]}", flush=True)
    # SLURM's own queue counts as queued; a local job is running once submitted.
    waiting = sum(job.state in ("PENDING", "REQUEUED") for job in running.values()
                  ) if launch.executor == "slurm" else 0
    state = (sum(r is not None for r in results), len(running) - waiting, len(failed),
             len(pending) + waiting)
    if state != last:
      print("launch: {} finished, {} running, {} failed, {} queued".format(*state), flush=True)
      last = state
    if pending or running:
      time.sleep(float(launch.poll_seconds))
