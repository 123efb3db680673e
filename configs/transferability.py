"""Transferability scores of several pretrained sources on one target dataset.

  python -m repsim_jax.main --workdir=runs/transfer \
    --config="configs/transferability.py:target=dermamnist,size=28,sources=\
imagenet=resnet18@weights/r18.safetensors;pretrain=runs/pretrain_r18"

`:key=val` args: sources, target (sets data.name), source (data source: medmnist |
image_folder | tfds | synthetic), size, image_size, data_dir, max_examples (0 = the whole train
split), batch, scores ('+'-separated subset of repsim_jax.jobs.transferability.SCORES), seed.
Sources: `name=model@path` items separated by ';' (quote them for the shell), or a file with one
item a line; `name=path` for a repsim_jax run dir (config.json names the model). Any other data
setting: `--config.data.*` (e.g. mean/std matching the sources' pretraining). With
`--config.sources=...` (no `:arg` splitting) items may also be separated by ','.
Writes <workdir>/features/<source>__<target>.npz (cache) and appends to <workdir>/scores.csv
(`source,target,score,value`); reruns reuse both (see repsim_jax/jobs/transferability.py).
"""

import ml_collections

from repsim_jax import config_lib
from repsim_jax.jobs.transferability import SCORES


def get_config(arg=None):
  a = config_lib.parse_arg(arg, sources="", target="", source="medmnist", size=28, image_size=0,
                           data_dir="data", max_examples=0, batch=64, scores="", seed=0)
  c = ml_collections.ConfigDict()
  c.job = "transferability"
  c.seed = a.seed
  c.sources = a.sources
  c.target_name = ""             # the CSV's target column; "" = data.name
  # The target: the trainer's full data block (every loader's keys).
  c.data = config_lib.train_config().data
  c.data.source = a.source
  c.data.name = a.target
  c.data.size = a.size
  c.data.image_size = a.image_size
  c.data.data_dir = a.data_dir
  c.max_examples = a.max_examples
  c.batch_size = a.batch
  c.scores = tuple(s for s in a.scores.split("+") if s) if a.scores else SCORES
  c.recompute = False            # True: recompute scores already in scores.csv
  # LP (repsim_jax.transferability.lp_fu.lp_score): NCA to n_components, k-NN.
  c.lp = ml_collections.ConfigDict({"n_components": 50, "k": 5, "pca_dim": 256, "steps": 200,
                                    "batch_size": 1024, "learning_rate": 1e-2})
  # FU: "" layers = the family default (job.FU_LAYERS); max_examples 0 = all cached examples.
  c.fu = ml_collections.ConfigDict({"early_layer": "", "first_layer": "", "max_examples": 512,
                                    "batch_size": 64, "margin": 0.05})
  c.nleep = ml_collections.ConfigDict({"covariance_type": "diag"})
  c.parallel = config_lib.parallel_config()
  return c
