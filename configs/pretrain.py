"""Pretraining on a source dataset, supervised or self-supervised; its checkpoint is what
`finetune` loads (`--config.model.init=<this run dir>`).

  python -m repsim_jax.main --config=configs/pretrain.py:model=resnet18,source=synthetic \
      --workdir=runs/pretrain_r18
  python -m repsim_jax.main --config=configs/pretrain.py:objective=simclr,model=resnet18 \
      --workdir=runs/simclr_r18

`:key=val` args: objective (supervised | simclr | byol | dino), model, source (synthetic |
medmnist | image_folder | tfds), dataset (MedMNIST/TFDS name or synthetic kind), size, steps,
batch, lr (0 = 0.1 for supervised, else the objective's recipe below for this batch).
Everything else with `--config.x.y=...` (`config.ssl.*` for the SSL objectives).
"""

from repsim_jax import config_lib

# The published recipes: optimiser, learning rate as a function of the batch, weight decay.
RECIPES = {
    # SimCLR's appendix B.1: 0.075 * sqrt(batch) for small batches (0.3 * batch / 256 at 4096).
    "simclr": dict(name="lars", lr=lambda b: 0.075 * b ** 0.5, weight_decay=1e-6),
    "byol": dict(name="lars", lr=lambda b: 0.2 * b / 256, weight_decay=1.5e-6),
    "dino": dict(name="adamw", lr=lambda b: 5e-4 * b / 256, weight_decay=0.04),
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
  if a.source == "synthetic":  # as many classes as the synthetic kind has, up to 10
    from repsim_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    c.data.num_classes = min(10, synthetic.max_classes(a.dataset))
  c.data.train_size = 10000
  c.model.name = a.model
  c.optim.lr = a.lr or 0.1
  if a.objective in RECIPES:  # supervised keeps the trainer's SGD defaults; others fail validation
    recipe = RECIPES[a.objective]
    c.optim.name = recipe["name"]
    c.optim.lr = a.lr or recipe["lr"](a.batch)
    c.optim.weight_decay = recipe["weight_decay"]
    c.optim.warmup_steps = max(1, a.steps // 20)
    if a.size < 96:  # small images: the CIFAR recipes (no blur, milder crops, warmer NT-Xent)
      c.ssl.blur, c.ssl.crop_scale, c.ssl.temperature = False, (0.2, 1.0), 0.2
  c.train.batch_size = a.batch
  c.train.num_steps = a.steps
  c.train.eval_splits = ("val",)
  return c
