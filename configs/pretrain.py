"""Pretraining on a source dataset, supervised or self-supervised; its checkpoint is what
`finetune` loads (`--config.model.init=<this run dir>`).

  python -m repsim_jax.main --config=configs/pretrain.py:model=resnet18,source=synthetic \
      --workdir=runs/pretrain_r18
  python -m repsim_jax.main --config=configs/pretrain.py:objective=simclr,model=resnet18 \
      --workdir=runs/simclr_r18

`:key=val` args: objective (supervised | simclr | byol | dino), model, source (synthetic |
medmnist | image_folder | tfds), dataset (MedMNIST/TFDS name or synthetic kind), size, steps,
batch, lr (0 = 0.1 for supervised, else the objective's recipe below scaled by batch / 256).
Everything else with `--config.x.y=...` (`config.ssl.*` for the SSL objectives).
"""

from repsim_jax import config_lib

# The published recipes: optimiser, base learning rate (per 256 examples), weight decay.
RECIPES = {
    "simclr": dict(name="lars", lr=0.3, weight_decay=1e-6),
    "byol": dict(name="lars", lr=0.2, weight_decay=1.5e-6),
    "dino": dict(name="adamw", lr=5e-4, weight_decay=0.04),
}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, objective="supervised", model="resnet18", source="synthetic",
                           dataset="natural", size=64, steps=2000, batch=128, lr=0.0, seed=0)
  c = config_lib.train_config()
  c.name = "pretrain" if a.objective == "supervised" else f"pretrain_{a.objective}"
  c.seed = a.seed
  c.objective = a.objective
  c.data.source = a.source
  c.data.name = a.dataset
  c.data.size = a.size
  c.data.num_classes = 10
  c.data.train_size = 10000
  c.model.name = a.model
  c.optim.lr = a.lr or 0.1
  if a.objective in RECIPES:  # supervised keeps the trainer's SGD defaults; others fail validation
    recipe = RECIPES[a.objective]
    c.optim.name = recipe["name"]
    c.optim.lr = a.lr or recipe["lr"] * a.batch / 256
    c.optim.weight_decay = recipe["weight_decay"]
    c.optim.warmup_steps = max(1, a.steps // 20)
  c.train.batch_size = a.batch
  c.train.num_steps = a.steps
  c.train.eval_splits = ("val",)
  return c
