"""Run directories under faults: another config, a second writer, a kill anywhere, a re-run."""

import json
import os
import subprocess
import sys

import jax
import pytest

from repsim_jax import config_lib, jobs, metric_writers, runs, train
from _tiny import REPO, pretrained_run, tiny_config


class Killed(BaseException):
  """Stands in for SIGKILL inside the process (BaseException: nothing catches it on the way)."""


def _kill_at(monkeypatch, step, split, where=""):
  """Kills the process after the (step, split) row of a run whose directory contains `where`."""
  real = metric_writers.MetricWriter.write

  def write(self, s, sp, m):
    real(self, s, sp, m)
    if (s, sp) == (step, split) and where in self.path:
      raise Killed(f"killed after writing {split} at step {step}")
  monkeypatch.setattr(metric_writers.MetricWriter, "write", write)


def _cfg(tmp_path, **kw):
  return tiny_config(tmp_path, **{"train.eval_every": 3, "train.eval_splits": ("val", "test"),
                                  **kw})


def _rows(wd):
  return [(r["step"], r["split"]) for r in metric_writers.read_metrics(wd)]


def _without_times(results):
  return {k: v for k, v in results.items() if k != "train_seconds"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ref")
  wd = str(tmp / "run")
  return train.train_and_evaluate(_cfg(tmp), wd), metric_writers.read_metrics(wd), tmp


# Kill points: between checkpoints (train row 9, after the step-8 checkpoint), inside an
# evaluation (val at 6, before the step-8 checkpoint), and after the final checkpoint (test at 12).
@pytest.mark.parametrize("step,split", [(9, "train"), (6, "val"), (12, "test")])
def test_killed_and_resumed_run_equals_uninterrupted(reference, monkeypatch, step, split):
  ref, ref_rows, tmp = reference
  wd = str(tmp / f"killed_{step}_{split}")
  with monkeypatch.context() as m:
    _kill_at(m, step, split)
    with pytest.raises(Killed):
      train.train_and_evaluate(_cfg(tmp), wd)
  assert not os.path.exists(os.path.join(wd, "results.json"))
  resumed = train.train_and_evaluate(_cfg(tmp), wd)
  saved = json.load(open(os.path.join(wd, "results.json")))
  assert _without_times(saved) == _without_times(json.loads(json.dumps(ref)))
  assert _without_times(resumed) == _without_times(ref)
  assert resumed["best_val"]["step"] == ref["best_val"]["step"]
  rows = metric_writers.read_metrics(wd)
  assert len(rows) == len(set(_rows(wd))), "a (step, split) row written twice"
  assert rows == ref_rows


def test_finished_run_is_read_back_not_rewritten(reference, capsys):
  ref, _, tmp = reference
  wd = str(tmp / "run")
  mtime = os.stat(os.path.join(wd, "results.json")).st_mtime_ns
  again = train.train_and_evaluate(_cfg(tmp, **{"train.log_every": 6}), wd)  # not identity
  assert again == json.loads(json.dumps(ref))
  assert os.stat(os.path.join(wd, "results.json")).st_mtime_ns == mtime
  assert "already finished" in capsys.readouterr().out


@pytest.mark.parametrize("key,value,shown", [("optim.lr", 0.05, "optim.lr: 0.02 -> 0.05"),
                                             ("seed", 3, "seed: 0 -> 3"),
                                             ("data.seed", 1, "data.seed: 0 -> 1")])
def test_another_config_in_a_run_dir_is_refused(reference, key, value, shown):
  _, _, tmp = reference
  wd = str(tmp / "run")
  before = open(os.path.join(wd, "config.json")).read()
  with pytest.raises(runs.RunMismatch, match="holds a run of another config") as e:
    train.train_and_evaluate(_cfg(tmp, **{key: value}), wd)
  assert shown in str(e.value) and "another --workdir" in str(e.value)
  assert open(os.path.join(wd, "config.json")).read() == before


def test_identity_ignores_cadence_and_devices(tmp_path):
  a = tiny_config(tmp_path)
  b = tiny_config(tmp_path, **{"train.log_every": 7, "train.checkpoint_every": 9,
                               "parallel.num_devices": 8, "parallel.backend": "pmap",
                               "train.tensorboard": True, "name": "x"})
  assert runs.identity(a) == runs.identity(b)
  for key, value in [("optim.lr", 0.1), ("method.name", "repsim"), ("data.seed", 2),
                     ("train.eval_every", 5)]:
    assert runs.identity(tiny_config(tmp_path, **{key: value})) != runs.identity(a), key


def test_second_writer_is_refused_and_a_dead_one_taken_over(tmp_path, capsys):
  wd = str(tmp_path / "run")
  with runs.exclusive(wd):
    with pytest.raises(runs.RunLocked, match=rf"in use by pid {os.getpid()} on "):
      train.train_and_evaluate(tiny_config(tmp_path), wd)
  assert not os.path.exists(os.path.join(wd, "checkpoints"))
  # A holder killed with SIGKILL leaves its pid in the file; the kernel has dropped its flock.
  code = f"import os; from repsim_jax import runs\nwith runs.exclusive({wd!r}): os.kill(os.getpid(), 9)"
  assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == -9
  assert open(os.path.join(wd, ".lock")).read().startswith("pid ")
  train.train_and_evaluate(tiny_config(tmp_path, **{"train.num_steps": 2}), wd)
  assert "taking over the lock of pid" in capsys.readouterr().out


def test_workdir_that_is_a_file(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(NotADirectoryError, match=rf"--workdir={f}: is a file"):
    train.train_and_evaluate(tiny_config(tmp_path), str(f))


def _default_config(tmp_path, lam):
  c = config_lib.load_config(os.path.join(REPO, "configs", "default.py"),
                             f"pretrain_steps=2,finetune_steps=2,size=16,lam={lam}")
  for stage in (c.pretrain, c.finetune):
    stage.data.train_size, stage.data.val_size, stage.data.test_size = 128, 64, 64
    stage.train.tensorboard = False
    stage.analysis.max_examples = 64
  c.parallel.num_devices = 1  # once for every stage
  c.data_dir = str(tmp_path / "data")
  return c


@pytest.mark.slow  # the default selection's time budget: among its slowest
def test_default_run_reruns_only_the_changed_stage(tmp_path):
  wd = str(tmp_path / "default")
  config = lambda lam: _default_config(tmp_path, lam)  # noqa: E731
  first = jobs.run(config(0.3), wd)
  stages = sorted(d for d in os.listdir(wd) if "-" in d)
  mtimes = {d: os.stat(os.path.join(wd, d, "results.json")).st_mtime_ns for d in stages}
  second = jobs.run(config(1.0), wd)
  now = sorted(d for d in os.listdir(wd) if "-" in d)
  assert len(now) == len(stages) + 1
  new = [d for d in now if d not in stages]
  assert new[0].startswith("finetune_repsim-")
  assert {d: os.stat(os.path.join(wd, d, "results.json")).st_mtime_ns for d in stages} == mtimes
  assert os.path.realpath(os.path.join(wd, "finetune_repsim")) == os.path.join(wd, new[0])
  assert second["methods"]["full_ft"] == first["methods"]["full_ft"]
  assert second["methods"]["repsim"] != first["methods"]["repsim"]
  cfg = json.load(open(os.path.join(wd, new[0], "config.json")))
  assert cfg["method"]["lam"] == 1.0 and new[0].endswith(runs.identity(cfg))
  assert cfg["parallel"]["num_devices"] == 1


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  return pretrained_run(tmp_path_factory)


# RepSim's Q with Stiefel Adam (moments and count in the optimiser state) and LP-FT killed after
# its probe-to-full switch at step 6 (the masked backbone optimiser's counter) resume to the same weights.
@pytest.mark.parametrize("method,keys", [
    ("repsim", {"method.q_optimizer": "adam", "method.lam": 3.0}),
    ("lp_ft", {"method.lp_steps": 6})])
def test_methods_with_their_own_state_resume_exactly(tmp_path, pretrained, monkeypatch, method,
                                                     keys):
  import numpy as np
  cfg = lambda: _cfg(tmp_path, **{"model.init": pretrained, "method.name": method, **keys})  # noqa: E731
  ref = train.fit(cfg(), str(tmp_path / "ref"))
  wd = str(tmp_path / "killed")
  with monkeypatch.context() as m:
    _kill_at(m, 9, "train")
    with pytest.raises(Killed):
      train.fit(cfg(), wd)
  resumed = train.fit(cfg(), wd)
  assert _without_times(resumed.results) == _without_times(ref.results)
  for a, b in zip(jax.tree.leaves((resumed.state.params, resumed.state.opt_state)),
                  jax.tree.leaves((ref.state.params, ref.state.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Slow: the default run end to end (cli_test::test_default_run) and a SIGKILLed run resuming
# exactly (train_test::test_resume_after_sigkill_matches_uninterrupted) stay in the default set.
@pytest.mark.slow
def test_default_run_killed_in_a_stage_resumes_to_the_same_summary(tmp_path, monkeypatch):
  ref = jobs.run(_default_config(tmp_path, 0.3), str(tmp_path / "ref"))
  wd = str(tmp_path / "killed")
  with monkeypatch.context() as m:
    _kill_at(m, 2, "train", where="finetune_repsim")
    with pytest.raises(Killed):
      jobs.run(_default_config(tmp_path, 0.3), wd)
  resumed = jobs.run(_default_config(tmp_path, 0.3), wd)
  strip = lambda r: json.loads(json.dumps(r, default=str).replace(str(tmp_path), ""))  # noqa: E731
  assert {k: v for k, v in strip(resumed).items() if k != "workdir"} == \
      {k: v for k, v in strip(ref).items() if k != "workdir"}


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)],
                         ids=["worker_killed", "coordinator_killed"])
def test_killed_peer_ends_the_others_with_one_line(tmp_path, victim):
  """2 jax.distributed processes; SIGKILL one after its step-20 checkpoint. The survivor exits 1
  within the heartbeat timeout (+ 1 s polling) with one `error:` line naming the last checkpoint,
  and that checkpoint restores."""
  import signal
  import time
  from repsim_jax import checkpoint
  port, wd, timeout = _free_port(), tmp_path / "multi", 5
  args = ["--config=configs/finetune.py:model=small_cnn,source=synthetic,dataset=medical_gray,"
          "size=16,steps=100000,batch=32", f"--config.data.data_dir={tmp_path / 'data'}",
          "--config.data.train_size=128", "--config.data.val_size=32", "--config.data.test_size=32",
          "--config.data.num_classes=3", "--config.train.checkpoint_every=20",
          "--config.train.tensorboard=False", "--config.train.eval_splits=('test',)",
          f"--config.parallel.coordinator_address=localhost:{port}",
          f"--config.parallel.heartbeat_timeout_seconds={timeout}",
          "--config.parallel.num_processes=2", f"--workdir={wd}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, "-m", "repsim_jax.main", *args,
                             f"--config.parallel.process_id={i}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    deadline = time.time() + 300
    while not (wd / "checkpoints" / "20").is_dir():
      assert time.time() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.1)
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.time()
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=timeout + 60)
    took = time.time() - killed_at
  finally:
    for p in procs:
      p.kill()
  assert survivor.returncode == 1
  assert took < timeout + 15, took
  # Besides progress lines (stderr) and gloo's connection notes, one line: no stack, no log.
  import re
  lines = [l for l in err.splitlines()
           if l.strip() and "Gloo" not in l and not re.match(r"^\[finetune\] step \d+/", l)]
  assert len(lines) == 1 and lines[0].startswith(f"error: process {1 - victim}: "), err[-3000:]
  assert "Last checkpoint: step " in lines[0]
  step = int(lines[0].split("Last checkpoint: step ")[1].split()[0])
  assert step >= 20
  assert "params" in checkpoint.load_run_variables(str(wd), step)
