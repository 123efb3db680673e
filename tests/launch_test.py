"""Executors of multi-run jobs (repsim_jax.launch): a local pool of worker processes and
submitit's debug executor give the results an inline run gives; a relaunch submits only what is
missing; a failed run is reported with its log while the others finish."""

import json
import os

import pytest

from repsim_jax import launch, runs, studies
from train_test import tiny_config

submitit = pytest.importorskip("submitit")


def _plan(tmp_path, seeds):
  return [studies.Run(tiny_config(tmp_path, **{"train.num_steps": 6, "seed": s}),
                      {"method": "full_ft", "seed": s}) for s in seeds]


def _launch(executor, **kw):
  c = launch.launch_config()
  c.executor, c.poll_seconds = executor, 0.5
  c.update(kw)
  return c


def test_worker_env_slices_devices_or_shares_memory():
  c = _launch("local", workers=4, devices_per_worker=2)
  assert launch.worker_env(1, c)["CUDA_VISIBLE_DEVICES"] == "2,3"
  shared = launch.worker_env(0, _launch("local", workers=4))
  assert shared == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.225"}
  with pytest.raises(ValueError, match=r"config.launch.executor='pbs'"):
    launch.validate(_launch("pbs"))
  with pytest.raises(ValueError, match=r"config.launch.hosts_per_run=2: .* not 'debug'"):
    launch.validate(_launch("debug", hosts_per_run=2))
  with pytest.raises(ValueError, match=r"config.launch.population=4 with hosts_per_run=2"):
    launch.validate(_launch("slurm", hosts_per_run=2, population=4))


def test_each_task_of_a_multi_host_job_takes_its_place(tmp_path, monkeypatch):
  """In a submitit job of 2 tasks (the local executor's environment variables), task r is
  process r of 2, and both name the same coordinator; outside a job the config is unchanged."""
  import socket
  import subprocess
  import sys
  cfg = tiny_config(tmp_path)
  assert launch.distributed_from_job(cfg) is cfg
  # Outside a job submitit is not imported: its logging set-up closes absl's stream, sys.stderr.
  probe = ("import sys; from repsim_jax import config_lib, launch; "
           "launch.distributed_from_job(config_lib.train_config()); "
           "assert 'submitit' not in sys.modules")
  env = {k: v for k, v in os.environ.items() if not k.startswith("SUBMITIT")}
  assert subprocess.run([sys.executable, "-c", probe], env=env).returncode == 0
  monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
  monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4242")
  monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "2")
  monkeypatch.setenv("SUBMITIT_LOCAL_LOCALID", "0")
  places = []
  for rank in (0, 1):
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", str(rank))
    places.append(launch.distributed_from_job(cfg).parallel)
  assert [p.process_id for p in places] == [0, 1]
  assert [p.num_processes for p in places] == [2, 2]
  address = places[0].coordinator_address
  assert address == places[1].coordinator_address and address.startswith(socket.gethostname())
  assert launch.distributed_from_job(cfg, port=1234).parallel.coordinator_address.endswith(":1234")
  assert cfg.parallel.num_processes == 1  # the task's copy changed, not the plan's config
  monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "1")
  assert launch.distributed_from_job(cfg) is cfg


def test_debug_executor_equals_inline(tmp_path):
  """The submitit code path in this process (its debug jobs open a debugger on an exception,
  so failures are tested with the local pool)."""
  inline = studies.execute(str(tmp_path / "inline"), _plan(tmp_path / "a", [0, 1]))
  debug = studies.execute(str(tmp_path / "debug"), _plan(tmp_path / "a", [0, 1]),
                          _launch("debug"))
  assert [r["final"] for r in debug] == [r["final"] for r in inline]


@pytest.mark.slow
def test_local_pool_runs_what_is_missing_and_keeps_finished_runs(tmp_path, capsys):
  workdir = str(tmp_path / "study")
  plan = _plan(tmp_path, [0, 1, 2])
  studies.execute(workdir, plan[:1])  # one finished before the launch
  bad = studies.Run(tiny_config(tmp_path, **{"data.name": "no_such_kind"}), {"method": "bad"})
  with pytest.raises(launch.RunFailed) as e:
    studies.execute(workdir, plan + [bad], _launch("local", workers=2))
  log = str(e.value).split("(log: ")[1].split(")")[0]
  assert os.path.exists(log) and "no_such_kind" in open(log).read()
  out = capsys.readouterr().out
  assert "launch: 3 finished, 0 running, 1 failed, 0 queued" in out
  for run in plan:
    assert runs.read_results(studies.run_dir(workdir, run)) is not None
  inline = studies.execute(str(tmp_path / "inline"), _plan(tmp_path, [0, 1, 2]))
  launched = os.listdir(os.path.join(workdir, "launch"))
  again = studies.execute(workdir, plan, _launch("local", workers=2))
  assert os.listdir(os.path.join(workdir, "launch")) == launched  # nothing submitted
  assert [r["final"] for r in again] == [r["final"] for r in inline]


def test_population_groups_runs_that_differ_in_seed_and_scalars(tmp_path):
  """Runs of one model and data differing in seed / lr train as populations of at most
  `population` members; their directories are the standalone runs' (read back inline)."""
  plan = [studies.Run(tiny_config(tmp_path, **{"train.num_steps": 6, "seed": s,
                                               "optim.lr": lr}), {"seed": s, "lr": lr})
          for s in (0, 1) for lr in (0.02, 0.05)]
  other = studies.Run(tiny_config(tmp_path, **{"train.num_steps": 6, "data.size": 12}),
                      {"seed": 0, "lr": 0.02, "size": 12})
  plan = plan[:2] + [other] + plan[2:]
  tasks = [launch.Task(r.cfg, str(i)) for i, r in enumerate(plan)]
  assert launch.population_groups(tasks, 3) == [[0, 1, 3], [2], [4]]
  assert launch.population_groups(tasks, 0) == [[i] for i in range(5)]
  workdir = str(tmp_path / "study")
  pop = studies.execute(workdir, plan, _launch("debug", population=4))
  assert [r.get("population", {}).get("members") for r in pop] == [4, 4, None, 4, 4]
  # Standalone, the same directories are finished runs: read back, nothing trains.
  again = studies.execute(workdir, plan)
  assert again == json.loads(json.dumps(pop, default=float))
  solo = studies.execute(str(tmp_path / "solo"), plan[:1])
  assert abs(solo[0]["final"]["val"]["loss"] - pop[0]["final"]["val"]["loss"]) <= 1e-4 * abs(
      solo[0]["final"]["val"]["loss"])


@pytest.mark.slow
def test_a_local_job_of_two_processes_is_one_multi_host_run(tmp_path):
  """hosts_per_run=2: one local submitit job of two processes, 4 simulated devices each, joined
  by jax.distributed, trains what one process on 8 devices trains."""
  import glob
  from repsim_jax import checkpoint, train
  from train_test import STABLE_LR, max_rel_err
  cfg = tiny_config(tmp_path, **{"parallel.num_devices": -1, "train.num_steps": 6,
                                 "optim.lr": STABLE_LR, "train.eval_splits": ("test",)})
  single = train.fit(cfg, str(tmp_path / "single"))
  c = _launch("local", workers=1, devices_per_worker=4, hosts_per_run=2)
  [multi] = launch.run_all([launch.Task(cfg, str(tmp_path / "multi"))], c,
                           folder=str(tmp_path / "launch"))
  for rank in (0, 1):
    [log] = glob.glob(str(tmp_path / "launch" / "worker0" / f"*_{rank}_log.out"))
    assert f"jax.distributed: process {rank} of 2, 4 of 8 devices" in open(log).read()
  params = checkpoint.load_run_variables(str(tmp_path / "multi"))["params"]
  assert max_rel_err(params, single.state.params["model"]) <= 1e-5
  assert multi["final"]["test"]["num_examples"] == 64
  assert multi["final"]["test"]["accuracy"] == pytest.approx(
      single.results["final"]["test"]["accuracy"], abs=1 / 64 + 1e-9)
