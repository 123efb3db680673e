"""Fine-tuning a pretrained model on a (medical) target with a chosen method.

  python -m repsim_jax.main --config=configs/finetune.py:model=resnet18,dataset=dermamnist,size=64,init=runs/pretrain_r18 \
      --workdir=runs/ft_derma

`:key=val` args: model, source, dataset, size, init (run dir, .safetensors/.pth, ViT .npz),
method, steps, batch, lr, seed. `--config.method.*` sets the method's hyper-parameters;
`--config.train.population='seed=0,1,2,3'` trains several seeds / lrs / λs as one program
(repsim_jax/population.py).
"""

from repsim_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, model="resnet18", source="medmnist", dataset="dermamnist", size=28,
                           image_size=0, init="", method="full_ft", steps=0, epochs=10.0, batch=64,
                           lr=0.01, seed=0, data_dir="data")
  c = config_lib.train_config()
  c.name = "finetune"
  c.seed = a.seed
  c.data.source = a.source
  c.data.name = a.dataset
  c.data.size = a.size
  c.data.image_size = a.image_size
  c.data.data_dir = a.data_dir
  c.model.name = a.model
  c.model.init = a.init
  c.method = config_lib.method_config(a.method)  # with that method's defaults (its λ)
  c.optim.lr = a.lr
  c.train.batch_size = a.batch
  c.train.num_steps = a.steps
  c.train.num_epochs = a.epochs
  c.train.eval_every = 0
  return c
