"""Where metrics go: JSON lines (`metrics.jsonl`), TensorBoard events, and a progress line."""

from __future__ import annotations

import json
import math
import os

import jax

from repsim_jax.io import write_text


class MetricWriter:
  """Appends `{"step": s, "split": ..., name: value}` lines and TensorBoard scalars.

  Only process 0 writes, so a multi-host run produces one set of files.
  A run resumed from a checkpoint keeps the first `keep_rows` rows (`rows` when that checkpoint
  was saved) and drops the rest, which the interrupted segment wrote after it and this one
  writes again: each (step, split) once. TensorBoard events after `resume_step` are purged.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int = 0,
               keep_rows: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self.rows = keep_rows
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if os.path.exists(self.path):
        kept = read_metrics(workdir)[:keep_rows]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
      if tensorboard:
        from tensorboardX import SummaryWriter  # TensorBoard files without TensorFlow.
        self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1)

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      self.rows += 1
      return
    row = {"step": int(step), "split": split}
    row.update({k: _py(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    self.rows += 1
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"{split}/{k}", v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def _py(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
