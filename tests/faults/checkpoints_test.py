"""Checkpoints under faults: flipped bits, truncation, half-deleted steps, NaN/Inf, keep=0."""

import json
import os

import jax
import numpy as np
import pytest

from repsim_jax import checkpoint, train
from repsim_jax.data import pipeline
from _tiny import tiny_config


def _largest_file(d):
  files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
  return max(files, key=os.path.getsize)


def _flip_two_bits(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x40
  data[len(data) // 3] ^= 0x02
  open(path, "wb").write(bytes(data))


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


FAULTS = {
    "bit_flips": lambda step_dir: _flip_two_bits(_largest_file(os.path.join(step_dir, "variables"))),
    "truncated": lambda step_dir: _truncate(_largest_file(os.path.join(step_dir, "train"))),
    "half_deleted": lambda step_dir: __import__("shutil").rmtree(os.path.join(step_dir, "variables")),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ckpt")
  wd = str(tmp / "ref")
  res = train.train_and_evaluate(tiny_config(tmp), wd)
  return tmp, res, checkpoint.load_run_variables(wd)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_corrupt_latest_checkpoint_is_skipped_and_the_run_resumes(finished, fault, capsys):
  tmp, ref, ref_vars = finished
  wd = str(tmp / fault)
  cfg = tiny_config(tmp)
  train.train_and_evaluate(cfg, wd)
  os.remove(os.path.join(wd, "results.json"))  # as if killed after the final checkpoint
  FAULTS[fault](os.path.join(wd, "checkpoints", "12"))
  res = train.train_and_evaluate(cfg, wd)
  err = capsys.readouterr()
  warnings = [l for l in err.err.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 1 and "checkpoints/12" in warnings[0], err.err
  assert "resumed from" in err.out and "at step 8" in err.out
  assert "Traceback" not in err.err and "Event loop is closed" not in err.err
  assert os.listdir(os.path.join(wd, "checkpoints_corrupt"))[0].startswith("12-")
  assert {k: v for k, v in res.items() if k != "train_seconds"} == \
      {k: v for k, v in ref.items() if k != "train_seconds"}
  got = checkpoint.load_run_variables(wd)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_vars)))


def test_flipped_bits_never_load_silently(finished):
  tmp, _, _ = finished
  wd = str(tmp / "flip_load")
  train.train_and_evaluate(tiny_config(tmp), wd)
  for step in ("8", "12"):
    _flip_two_bits(_largest_file(os.path.join(wd, "checkpoints", step, "variables")))
  with pytest.raises(checkpoint.CorruptCheckpoint, match=r"checkpoints/8: (checksum mismatch|unreadable)"):
    checkpoint.load_run_variables(wd)


def test_keep_zero_checkpoints_is_refused_at_start(tmp_path):
  with pytest.raises(ValueError, match=r"config.train.keep_checkpoints=0: expected a positive"):
    train.train_and_evaluate(tiny_config(tmp_path, **{"train.keep_checkpoints": 0}),
                             str(tmp_path / "k0"))
  assert not os.path.exists(tmp_path / "k0" / "checkpoints")


def _all_finite(tree):
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_divergence_stops_before_any_bad_checkpoint(tmp_path, dtype):
  cfg = tiny_config(tmp_path, **{"optim.lr": 1e6, "optim.warmup_steps": 0, "model.dtype": dtype,
                                 "optim.schedule": "constant", "train.num_steps": 40,
                                 "train.checkpoint_every": 1, "train.log_every": 5,
                                 "optim.weight_decay": 0.0})
  wd = str(tmp_path / "div")
  with pytest.raises(FloatingPointError, match=r"non-finite .* at step (\d+); stopped at step") as e:
    train.train_and_evaluate(cfg, wd)
  bad = int(str(e.value).split(" at step ")[1].split(";")[0])
  last = checkpoint.Checkpointer(wd).latest_step()
  assert last == bad - 1, (str(e.value), last)
  assert f"last good checkpoint: step {last} in" in str(e.value)
  for step in sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints"))):
    assert _all_finite(checkpoint.load_run_variables(wd, step)), step  # BN statistics included


def test_divergence_before_the_first_checkpoint_says_none_yet(tmp_path):
  cfg = tiny_config(tmp_path, **{"optim.lr": 1e6, "optim.warmup_steps": 0,
                                 "optim.schedule": "constant", "train.num_steps": 30,
                                 "train.checkpoint_every": 100, "optim.weight_decay": 0.0})
  with pytest.raises(FloatingPointError, match="last good checkpoint: none yet"):
    train.train_and_evaluate(cfg, str(tmp_path / "none"))
  assert not os.path.isdir(tmp_path / "none" / "checkpoints") or \
      not os.listdir(tmp_path / "none" / "checkpoints")


def _poison_batch(monkeypatch, at: int):
  """The training stream's `at`-th batch (1-based) carries one NaN pixel."""
  real = pipeline.make_train_iter

  def make_train_iter(*a, **kw):
    it, n = real(*a, **kw), [0]
    nxt = it.__next__

    class Poisoned:
      def __next__(self):
        b = nxt()
        n[0] += 1
        if n[0] == at:
          b = dict(b, image=np.array(b["image"]))
          b["image"][0, 0, 0, 0] = np.nan
        return b

      def __getattr__(self, name):
        return getattr(it, name)
    return Poisoned()
  monkeypatch.setattr(pipeline, "make_train_iter", make_train_iter)


def test_one_nan_batch_stops_at_that_step(tmp_path, monkeypatch):
  _poison_batch(monkeypatch, 5)
  with pytest.raises(FloatingPointError, match=r"at step 5; stopped at step 6; last good "
                                               r"checkpoint: step 4 in"):
    train.train_and_evaluate(tiny_config(tmp_path), str(tmp_path / "stop"))


def test_skip_nonfinite_steps_drops_the_update_and_counts_it(tmp_path, monkeypatch):
  const = {"optim.schedule": "constant", "optim.warmup_steps": 0}
  ref = train.fit(tiny_config(tmp_path, **const, **{"train.num_steps": 4}), str(tmp_path / "r4"))
  _poison_batch(monkeypatch, 5)
  out = train.fit(tiny_config(tmp_path, **const, **{"train.skip_nonfinite_steps": True,
                                                    "train.num_steps": 5}), str(tmp_path / "skip"))
  assert out.results["skipped_steps"] == 1
  # Step 5 was dropped, so the parameters are those after step 4 (the optimiser state too).
  for a, b in zip(jax.tree.leaves(out.state.params), jax.tree.leaves(ref.state.params)):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(l) for l in open(tmp_path / "skip" / "metrics.jsonl")]
  assert [r["skipped_steps"] for r in rows if r["split"] == "train"] == [0.0, 1.0]


def test_command_line_says_one_line_about_a_corrupt_checkpoint(tmp_path):
  """Through the command line (no pytest hooks catching them): orbax's abandoned async reads of
  the unreadable step print no 'Event loop is closed' / 'Task exception' tracebacks."""
  import subprocess
  import sys
  from _tiny import REPO
  args = [sys.executable, "-m", "repsim_jax.main",
          "--config=configs/finetune.py:model=small_cnn,source=synthetic,dataset=medical_gray,"
          "size=16,steps=8,batch=16", f"--config.data.data_dir={tmp_path / 'data'}",
          "--config.data.train_size=64", "--config.data.val_size=32", "--config.data.test_size=32",
          "--config.data.num_classes=3", "--config.train.checkpoint_every=4",
          "--config.train.tensorboard=False", f"--workdir={tmp_path / 'w'}"]
  first = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-2000:]
  os.remove(tmp_path / "w" / "results.json")
  _truncate(_largest_file(str(tmp_path / "w" / "checkpoints" / "8" / "variables")))
  out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.strip() and not l.startswith("[finetune] step")]
  assert len(lines) == 1 and lines[0].startswith("warning: checkpoint "), out.stderr[-3000:]
  assert "resumed from" in out.stdout and "at step 4" in out.stdout
