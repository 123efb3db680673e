"""Supervised pretraining on a source dataset; its checkpoint is what `finetune` loads.

  python -m repsim_jax.main --config=configs/pretrain.py:model=resnet18,source=synthetic \
      --workdir=runs/pretrain_r18

`:key=val` args: model, source (synthetic | medmnist | image_folder | tfds), dataset (MedMNIST/TFDS
name or synthetic kind), size, steps, batch, lr. Everything else with `--config.x.y=...`.
"""

from repsim_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, model="resnet18", source="synthetic", dataset="natural", size=64,
                           steps=2000, batch=128, lr=0.1, seed=0)
  c = config_lib.train_config()
  c.name = "pretrain"
  c.seed = a.seed
  c.data.source = a.source
  c.data.name = a.dataset
  c.data.size = a.size
  c.data.num_classes = 10
  c.data.train_size = 10000
  c.model.name = a.model
  c.optim.lr = a.lr
  c.train.batch_size = a.batch
  c.train.num_steps = a.steps
  c.train.eval_splits = ("val",)
  return c
