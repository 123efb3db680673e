"""The embedded default run: synthetic source -> pretrain -> fine-tune on a synthetic medical target.

  python -m repsim_jax.main --config=configs/default.py --workdir=runs/default

Runs on 2 CPU cores in a few minutes. `:key=val` args: pretrain_steps, finetune_steps, size,
model, seed. Anything else: `--config.pretrain.optim.lr=...`, `--config.finetune.train.batch_size=...`.
"""

import ml_collections

from repsim_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, pretrain_steps=600, finetune_steps=300, size=32,
                           model="resnet_small", seed=0)
  c = ml_collections.ConfigDict()
  c.job = "default"
  c.seed = a.seed

  # Source domain: "natural" colour images, more classes.
  p = config_lib.train_config()
  p.name = "pretrain"
  p.seed = a.seed
  p.data.source = "synthetic"
  p.data.kind = "natural"
  p.data.name = "natural"
  p.data.size = a.size
  p.data.num_classes = 8
  p.data.train_size = 6000
  p.data.val_size = 500
  p.data.test_size = 500
  p.data.difficulty = 0.3
  p.model.name = a.model
  p.optim.lr = 0.1
  p.train.num_steps = a.pretrain_steps
  p.train.batch_size = 64
  p.train.log_every = 50
  p.train.checkpoint_every = 200
  p.train.eval_splits = ("val",)
  c.pretrain = p

  # Target domain: "medical-like" grayscale lesions, fewer and imbalanced classes.
  f = config_lib.train_config()
  f.name = "finetune"
  f.seed = a.seed
  f.data.source = "synthetic"
  f.data.kind = "medical_gray"
  f.data.name = "medical_gray"
  f.data.size = a.size
  f.data.num_classes = 4
  f.data.train_size = 1500
  f.data.val_size = 300
  f.data.test_size = 1000
  f.data.difficulty = 0.5
  f.data.imbalance = 3.0
  f.model.name = a.model
  f.model.init = ""          # set to <workdir>/pretrain by the default job
  f.optim.lr = 0.02
  f.train.num_steps = a.finetune_steps
  f.train.batch_size = 64
  f.train.log_every = 50
  f.train.checkpoint_every = 100
  c.finetune = f

  # Fine-tuning methods compared side by side (each a `config.method` for the finetune config).
  c.methods = ml_collections.ConfigDict({"full_ft": {"name": "full_ft"}})
  return c
