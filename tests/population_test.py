"""Population training: members equal their standalone runs, and their directories are runs."""

import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "faults"))
from _tiny import pretrained_run, tiny_config  # noqa: E402

from repsim_jax import jobs, metric_writers, population, runs, train  # noqa: E402


class Killed(BaseException):
  """Stands in for SIGKILL (BaseException: nothing catches it on the way)."""


def _max_rel_err(a, b):
  """Largest over parameter leaves of max|a - b| / max|b|."""
  return max(float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _cfg(tmp_path, **kw):
  return tiny_config(tmp_path, **{"train.num_steps": 20, "train.log_every": 5,
                                  "train.checkpoint_every": 10, "train.eval_every": 10,
                                  "train.eval_splits": ("val",), **kw})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  return pretrained_run(tmp_path_factory)


def test_parse_is_the_grid_of_the_keys_values():
  assert population.parse("seed=0,1; optim.lr=0.1,0.01") == [
      {"seed": 0, "optim.lr": 0.1}, {"seed": 0, "optim.lr": 0.01},
      {"seed": 1, "optim.lr": 0.1}, {"seed": 1, "optim.lr": 0.01}]
  for bad, says in [("seed=0,0", "distinct"), ("optim.momentum=0.9,0.8", "key of"),
                    ("seed=a,b", "takes numbers"), ("", "no members"), ("seed", "key=v1")]:
    with pytest.raises(ValueError, match=says):
      population.parse(bad)


def test_members_are_the_standalone_runs_configs(tmp_path):
  cfg = _cfg(tmp_path, **{"train.population": "seed=3,4;method.lam=0.5,2",
                          "method.name": "repsim", "model.init": "x"})
  pairs = population.members(cfg, str(tmp_path / "pop"))
  assert len(pairs) == 4
  c, wd = pairs[1]
  standalone = _cfg(tmp_path, **{"seed": 3, "method.name": "repsim", "model.init": "x",
                                 "method.lam": 2.0})
  assert runs.identity(c) == runs.identity(standalone)
  assert wd == runs.run_dir(str(tmp_path / "pop"), "seed=3,lam=2", standalone)
  assert population.varying_keys([p[0] for p in pairs]) == ("method.lam",)
  other = _cfg(tmp_path, **{"optim.momentum": 0.5})
  with pytest.raises(ValueError, match="differ in config.optim.momentum"):
    population.varying_keys([_cfg(tmp_path), other])


def _compare(tmp_path, cfgs):
  pop = population.fit(cfgs, [str(tmp_path / f"member{i}") for i in range(len(cfgs))])
  for i, c in enumerate(cfgs):
    solo = train.fit(c, str(tmp_path / f"solo{i}"))
    # 20 steps of vmapped float32 arithmetic against the standalone program.
    assert _max_rel_err(pop[i].state.params, solo.state.params) <= 1e-5
    assert _max_rel_err(pop[i].state.batch_stats, solo.state.batch_stats) <= 1e-5
    assert pop[i].results["population"] == {"members": len(cfgs), "index": i}
    assert pop[i].results["identity"] == solo.results["identity"]
    rows = lambda wd: [(r["step"], r["split"]) for r in metric_writers.read_metrics(wd)]  # noqa: E731
    assert rows(str(tmp_path / f"member{i}")) == rows(str(tmp_path / f"solo{i}"))
    np.testing.assert_allclose(pop[i].results["final"]["val"]["loss"],
                               solo.results["final"]["val"]["loss"], rtol=1e-4)
  return pop


# Members differ in seed (head init, data order) and learning rate / λ; RepSim's Stiefel transform
# and BatchNorm statistics are per member. The 8-device cases split each member's batch of 16.
@pytest.mark.parametrize("method,devices", [
    ("full_ft", 1), ("repsim", 8),
    pytest.param("full_ft", 8, marks=pytest.mark.slow),
    pytest.param("repsim", 1, marks=pytest.mark.slow)])
def test_members_equal_their_standalone_runs(tmp_path, pretrained, method, devices):
  if method == "full_ft":
    cfgs = [_cfg(tmp_path, seed=s, **{"optim.lr": lr, "parallel.num_devices": devices})
            for s, lr in ((0, 0.02), (1, 0.05))]
  else:
    cfgs = [_cfg(tmp_path, seed=s, **{"method.name": "repsim", "model.init": pretrained,
                                      "method.lam": lam, "parallel.num_devices": devices})
            for s, lam in ((0, 0.3), (1, 3.0))]
  _compare(tmp_path, cfgs)


def test_population_job_writes_member_runs_that_read_back(tmp_path, capsys):
  cfg = _cfg(tmp_path, **{"train.population": "seed=0,1,2", "train.num_steps": 6,
                          "train.eval_every": 0})
  wd = str(tmp_path / "pop")
  os.makedirs(wd)
  results = jobs.run(cfg, wd)
  summary = json.load(open(os.path.join(wd, "population.json")))
  assert [r["seed"] for r in summary] == [0, 1, 2]
  for r, row in zip(results, summary):
    member_dir = os.path.join(wd, row["run_dir"])
    assert json.load(open(os.path.join(member_dir, "results.json"))) == json.loads(
        json.dumps(r, default=float))
    assert row["final"] == r["final"]
  assert capsys.readouterr().out.count("done: ") == 3
  # A standalone run of a member's config reads the member's results back, trains nothing.
  c0, d0 = population.members(cfg, wd)[0]
  again = train.fit(c0, d0)
  assert again.state is None and again.results == results[0]


def test_killed_population_resumes_and_a_member_resumes_standalone(tmp_path, monkeypatch):
  cfgs = [_cfg(tmp_path, seed=s) for s in (0, 1)]
  dirs = [str(tmp_path / f"m{s}") for s in (0, 1)]
  reference = [train.fit(c, str(tmp_path / f"ref{i}")) for i, c in enumerate(cfgs)]
  real = metric_writers.MetricWriter.write

  def write(self, s, sp, m):
    real(self, s, sp, m)
    if (s, sp) == (15, "train") and self.path.startswith(dirs[1]):
      raise Killed("killed after step 15")
  monkeypatch.setattr(metric_writers.MetricWriter, "write", write)
  with pytest.raises(Killed):
    population.fit(cfgs, dirs)
  monkeypatch.setattr(metric_writers.MetricWriter, "write", real)
  # Member 0 resumes on its own from the population's step-10 checkpoint; then the population
  # of both resumes member 1 alone (member 0 is finished).
  solo = train.fit(cfgs[0], dirs[0])
  rest = population.fit(cfgs, dirs)
  assert rest[0].state is None and rest[0].results == json.loads(json.dumps(solo.results,
                                                                            default=float))
  # Member 1 ran 10 population steps, then 10 standalone ones. On the 8-device client a ReLU
  # input within rounding of 0 in its steps 16-20 flips one element's gradient: one BatchNorm
  # bias entry of block1 then differs by 7e-6 (6e-4 of that leaf's largest entry), in the
  # uninterrupted population too; every other leaf agrees to 2e-5.
  for out, ref, tol in ((solo, reference[0], 1e-5), (rest[1], reference[1], 1e-3)):
    assert _max_rel_err(out.state.params, ref.state.params) <= tol
    assert out.results["best_val"]["step"] == ref.results["best_val"]["step"]
  rows = [(r["step"], r["split"]) for r in metric_writers.read_metrics(dirs[1])]
  assert rows == [(r["step"], r["split"]) for r in metric_writers.read_metrics(
      str(tmp_path / "ref1"))]


def test_a_diverging_member_stops_alone(tmp_path):
  cfgs = [_cfg(tmp_path, **{"optim.lr": lr, "train.num_steps": 10, "optim.warmup_steps": 0})
          for lr in (0.02, 1e30)]
  dirs = [str(tmp_path / f"m{i}") for i in range(2)]
  with pytest.raises(FloatingPointError, match="1 of 2 population members stopped: .*m1"):
    population.fit(cfgs, dirs)
  assert os.path.exists(os.path.join(dirs[0], "results.json"))
  assert not os.path.exists(os.path.join(dirs[1], "results.json"))
