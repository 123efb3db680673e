"""The shared base of the studies in experiments/: the default run's source pretraining and
target fine-tuning (configs/default.py) at a study's sizes, RepSim as the default run sets it,
and the same source pretrained with each self-supervised recipe (configs/pretrain.py):
`pretrain`, `finetune`, `repsim` and `ssl.{simclr,byol,dino}`.

  config_lib.load_config("configs/study.py", "size=32,finetune_steps=300,...")

`:key=val` args: pretrain_steps, ssl_steps, finetune_steps, size, model, lam, batch, data_dir
("" = each stage's own).
"""

import copy
import os

import ml_collections

from repsim_jax import config_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  a = config_lib.parse_arg(arg, pretrain_steps=1000, ssl_steps=1500, finetune_steps=300, size=32,
                           model="resnet_small", lam=0.3, batch=64, data_dir="")
  d = config_lib.load_config(
      os.path.join(HERE, "default.py"), f"pretrain_steps={a.pretrain_steps or 1},"
      f"finetune_steps={a.finetune_steps},size={a.size},model={a.model},lam={a.lam}")
  for c in (d.pretrain, d.finetune):
    if a.data_dir:
      c.data.data_dir = a.data_dir
    c.train.batch_size = a.batch
  c = ml_collections.ConfigDict()
  c.pretrain, c.finetune, c.repsim = d.pretrain, d.finetune, d.methods.repsim
  c.ssl = ml_collections.ConfigDict()
  for objective in ("simclr", "byol", "dino"):
    s = config_lib.load_config(
        os.path.join(HERE, "pretrain.py"), f"objective={objective},model={a.model},"
        f"size={a.size},steps={a.ssl_steps},batch={a.batch}")
    s.data = copy.deepcopy(d.pretrain.data)  # the same images as the supervised source
    if objective == "dino" and a.size < 96:
      s.ssl.out_dim, s.ssl.local_crops = 4096, 2  # DINO's 65,536 prototypes dwarf a small model
    c.ssl[objective] = s
  return c

