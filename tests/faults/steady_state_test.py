"""After the first steps, evaluation and checkpoint, training compiles (and traces) nothing new."""

import collections

import jax
import pytest

from repsim_jax import metric_writers, train
from _tiny import tiny_config

EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")


@pytest.mark.parametrize("method", ["full_ft", "repsim"])
def test_no_recompilation_after_warm_up(tmp_path, monkeypatch, method):
  counts = collections.Counter()

  def listener(event, duration, **kw):
    del duration, kw
    if event in EVENTS:
      counts[event] += 1
  jax.monitoring.register_event_duration_secs_listener(listener)
  snapshots = {}
  real = metric_writers.MetricWriter.write

  def write(self, step, split, m):
    real(self, step, split, m)
    snapshots[(step, split)] = dict(counts)
  monkeypatch.setattr(metric_writers.MetricWriter, "write", write)
  extra = {}
  if method == "repsim":
    pre = str(tmp_path / "pre")
    train.train_and_evaluate(tiny_config(tmp_path, **{"train.num_steps": 2}), pre)
    extra = {"model.init": pre, "method.name": "repsim", "analysis.final_similarity": False}
  try:
    # eval every 4, checkpoint every 4, log every 2 over 24 steps: 5 more cycles after the first.
    train.train_and_evaluate(tiny_config(tmp_path, **{
        "train.num_steps": 24, "train.eval_every": 4, "train.checkpoint_every": 4,
        "train.log_every": 2, **extra}), str(tmp_path / "run"))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  warm = snapshots[(6, "train")]  # after step 4's eval + checkpoint and one more logged step
  assert warm.get(EVENTS[1], 0) > 0
  assert snapshots[(22, "train")] == warm, (warm, snapshots[(22, "train")])
  assert snapshots[(20, "test")] == warm
