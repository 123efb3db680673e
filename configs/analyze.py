"""Similarity and sharpness report for a finished run.

  python -m repsim_jax.main --config=configs/analyze.py:run=runs/default/finetune_repsim,baseline=runs/default/finetune_full_ft \
      --workdir=runs/default/analysis_repsim

`:key=val` args: run (a run dir), reference (default: the weights the run started from),
baseline (another run; sharpness is reported relative to it), split, max_examples, step.
Writes report.md / report.json, similarity.csv (every measure, every layer), the cross-layer
linear CKA matrix (CSV + heatmap PNG).
"""

import ml_collections

from repsim_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, run="", reference="", baseline="", split="test", max_examples=2000,
                           step=0, batch=64, seed=0)
  c = ml_collections.ConfigDict()
  c.job = "analyze"
  c.run = a.run
  c.reference = a.reference
  c.baseline = a.baseline
  c.split = a.split
  c.step = a.step
  c.max_examples = a.max_examples
  c.batch_size = a.batch
  c.seed = a.seed
  c.measures = ()            # () = every measure in repsim_jax.similarity.MEASURES
  c.probe_batches = 4
  c.sharpness = config_lib.sharpness_config()
  c.parallel = config_lib.parallel_config()
  return c
