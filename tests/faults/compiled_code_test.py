"""A process running run after run keeps clear of Linux's limit on its memory maps.

XLA:CPU keeps each compiled program's code in memory maps of its own until JAX drops the
program; the slow weight matrix (66 runs in one process) reached `vm.max_map_count` and its next
compile died in LLVM. `cpu.drop_compiled_programs_near_map_limit` runs before every run.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repsim_jax import train
from repsim_jax.cpu import host
from _tiny import tiny_config

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"),
                                reason="memory maps are counted through Linux's /proc")


def _maps(code_only=False):
  with open("/proc/self/maps") as f:
    rows = [line.split() for line in f]
  # Code: executable maps backed by no file (the JIT's), not the libraries'.
  return sum(1 for r in rows if not code_only or (r[1] == "r-xp" and len(r) == 5))


def _compiled(n=20):
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
  for k in range(1, n + 1):  # one program per shape
    f(np.ones((k, 3), np.float32))
  return f


_DROP = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import compiled_code_test as t
from repsim_jax.cpu import host
before = t._maps(code_only=True)
f = t._compiled()
out = {"programs": f._cache_size(), "code": t._maps(code_only=True) - before}
host.MAP_BUDGET = 1.0  # far from the limit: nothing is dropped
out["dropped_far"], out["programs_far"] = host.drop_compiled_programs_near_map_limit(), f._cache_size()
host.MAP_BUDGET = 0.0  # past the budget: every program goes
out["dropped"], out["programs_after"] = host.drop_compiled_programs_near_map_limit(), f._cache_size()
out["code_after"] = t._maps(code_only=True) - before
out["value"] = float(f(np.ones((2, 3), np.float32)))
print(json.dumps(out))
"""


def test_dropping_compiled_programs_unmaps_their_code():
  # In a process of its own: in a test worker, programs of earlier tests can be freed while
  # this one counts, and their maps go with them.
  out = subprocess.run([sys.executable, "-c", _DROP, os.path.dirname(os.path.abspath(__file__))],
                       capture_output=True, text=True, timeout=300, check=True)
  r = json.loads(out.stdout.splitlines()[-1])
  assert r["programs"] == 20 and r["code"] >= 20  # each program maps its code
  assert not r["dropped_far"] and r["programs_far"] == 20
  assert r["dropped"] and r["programs_after"] == 0
  assert r["code_after"] < r["code"] / 4
  assert r["value"] == pytest.approx(2 * np.tanh(3.0) * 2)


def test_each_run_starts_by_dropping_programs_past_the_budget(tmp_path, monkeypatch):
  f = _compiled(2)
  monkeypatch.setattr(host, "MAP_BUDGET", 0.0)
  res = train.train_and_evaluate(tiny_config(tmp_path, **{"train.num_steps": 2}),
                                 str(tmp_path / "run"))
  assert f._cache_size() == 0  # dropped before the run compiled its own programs
  assert res["final"]["test"]["num_examples"] == 32
