"""The embedded default run: synthetic source -> pretrain -> fine-tune on a synthetic medical target.

  python -m repsim_jax.main --config=configs/default.py --workdir=runs/default

About a minute on 2 CPU cores. `:key=val` args: pretrain_steps, finetune_steps, size, model, seed,
lam. For every stage at once: `--config.parallel.*` (devices, multi-host) and
`--config.data_dir`; anything else per stage: `--config.pretrain.optim.lr=...`, `--config.finetune.train.batch_size=...`.
"""

import ml_collections

from repsim_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, pretrain_steps=1000, finetune_steps=300, size=32,
                           model="resnet_small", seed=0, lam=0.3)
  c = ml_collections.ConfigDict()
  c.job = "default"
  c.seed = a.seed
  # Stage-wide settings, copied into every stage by the job: devices and hosts, and where the
  # generated data sets are cached.
  c.parallel = config_lib.parallel_config()
  c.data_dir = ""  # "" = each stage's data.data_dir

  # Source domain: "natural" colour images, more classes.
  p = config_lib.train_config()
  p.name = "pretrain"
  p.seed = a.seed
  p.data.source = "synthetic"
  p.data.name = "natural"
  p.data.size = a.size
  p.data.num_classes = 8
  p.data.train_size = 6000
  p.data.val_size = 500
  p.data.test_size = 500
  p.data.difficulty = 0.1
  p.model.name = a.model
  p.optim.name = "adam"
  p.optim.lr = 2e-3
  p.optim.weight_decay = 0.0
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
  # RepSim's λ weighs ‖FQ − P‖² (features centred and Frobenius-normalised, so the term is in
  # [0, 4]) against the cross-entropy: larger λ keeps the representation closer to the pretrained
  # one (higher CKA) at some cost in target accuracy; 0.3 keeps accuracy within a point of full
  # fine-tuning here (3-seed mean) at 2.9x its CKA at pre_logits (see experiments/repsim_vs_ft.py).
  c.methods = ml_collections.ConfigDict({
      "full_ft": config_lib.method_config("full_ft"),
      "repsim": config_lib.method_config("repsim", q_mode="learned", lam=a.lam),
  })
  return c
