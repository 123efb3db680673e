"""Tiny runs shared by the fault-injection tests (seconds each on 2 CPU cores)."""

import os

from repsim_jax import config_lib
from repsim_jax.config_lib import set_keys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(os.path.dirname(REPO), "shared", "fixtures")


def tiny_config(tmp_path, **overrides):
  c = config_lib.train_config()
  c.data.source = "synthetic"
  c.data.name = "medical_gray"
  c.data.data_dir = str(tmp_path / "data")
  c.data.size = 16
  c.data.num_classes = 3
  c.data.train_size = 128
  c.data.val_size = 32
  c.data.test_size = 32
  c.data.difficulty = 0.2
  c.model.name = "small_cnn"
  c.optim.lr = 0.02
  c.optim.warmup_steps = 2
  c.train.batch_size = 16
  c.train.num_steps = 12
  c.train.log_every = 3
  c.train.checkpoint_every = 4
  c.train.tensorboard = False
  c.parallel.num_devices = 1
  set_keys(c, overrides)
  return c


def finetune_config(init: str, tmp_path, method: str = "full_ft", model: str = "resnet18",
                    **overrides):
  """configs/finetune.py as the command line loads it, on tiny synthetic data."""
  c = config_lib.load_config(os.path.join(REPO, "configs", "finetune.py"),
                             f"model={model},source=synthetic,dataset=medical_gray,size=16,"
                             f"steps=2,batch=8,method={method},init={init}")
  return set_keys(c, {"data.data_dir": str(tmp_path / "data"), "data.train_size": 32,
                      "data.val_size": 16, "data.test_size": 16, "data.num_classes": 3,
                      "analysis.max_examples": 16, "train.tensorboard": False,
                      "train.log_every": 1, "optim.warmup_steps": 0, **overrides})


def pretrained_run(tmp_path_factory, steps: int = 4) -> str:
  """The directory of a tiny finished run (small_cnn) for fine-tuning tests to start from."""
  from repsim_jax import train  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("pre")
  wd = str(tmp / "run")
  train.train_and_evaluate(tiny_config(tmp, **{"train.num_steps": steps,
                                               "train.eval_splits": ()}), wd)
  return wd
