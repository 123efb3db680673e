"""Config helpers: `get_config(arg)` argument strings and start-up validation.

Configs follow big_vision: `configs/X.py:get_config(arg)` where `arg` is `key=value,...`, then
`--config.a.b=c` overrides (ml_collections' config_flags). Everything is checked once, at start-up,
so a typo fails in a second instead of after an hour of training.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `"k1=v1,k2=v2"` into a ConfigDict, typed by `defaults`.

  Every key must appear in `defaults` (its value sets the type); an unknown key is an error.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item.strip():
      continue
    if "=" not in item:
      raise ValueError(f"config arg {item!r}: expected key=value (known keys: {sorted(defaults)})")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ValueError(f"config arg: unknown key {key!r} (known keys: {sorted(defaults)})")
    out[key] = _coerce(key, value, defaults[key])
  return out


def _coerce(key: str, value: str, default: Any):
  try:
    if isinstance(default, bool):
      if value.lower() in ("1", "true", "yes"):
        return True
      if value.lower() in ("0", "false", "no"):
        return False
      raise ValueError
    if isinstance(default, int):
      return int(value)
    if isinstance(default, float):
      return float(value)
  except ValueError:
    raise ValueError(f"config arg {key}={value!r}: expected {type(default).__name__}") from None
  return value


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, as `--config=path:arg` would load it (tests, notebooks)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("_repsim_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def lookup(config, key: str):
  """`config.<key>` for a dotted key."""
  for part in key.split("."):
    config = config[part]
  return config


def check_choice(config: ml_collections.ConfigDict, key: str, choices) -> None:
  """One-line error when `config.<key>` (dotted) is not one of `choices`."""
  value = lookup(config, key)
  if value not in choices:
    raise ValueError(f"config.{key}={value!r}: expected one of {sorted(choices)}")


def check_positive(config: ml_collections.ConfigDict, *keys: str) -> None:
  for key in keys:
    value = lookup(config, key)
    if not value > 0:
      raise ValueError(f"config.{key}={value!r}: expected a positive number")


def check_non_negative(config: ml_collections.ConfigDict, *keys: str) -> None:
  for key in keys:
    value = lookup(config, key)
    if value < 0:
      raise ValueError(f"config.{key}={value!r}: expected 0 or a positive number")


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config (what actually ran) as JSON to `workdir/config.json`."""
  from repsim_jax import io  # pylint: disable=g-import-not-at-top
  io.write_text(os.path.join(workdir, "config.json"),
                    json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str) + "\n")


def data_config() -> ml_collections.ConfigDict:
  """Every `config.data` key with its default: the one place data defaults live
  (`data.load_dataset` fills what a caller leaves out from here)."""
  d = ml_collections.ConfigDict()
  d.source = "synthetic"     # medmnist | image_folder | tfds | synthetic
  d.name = "medical_gray"    # MedMNIST / TFDS name; synthetic: natural | medical_gray | medical_rgb
  d.data_dir = "data"
  d.size = 28                # stored MedMNIST size (28/64/128/224) or synthetic size
  d.image_size = 0           # model input size; 0 = stored size
  d.channels = 3             # model input channels (grayscale is repeated); 0 = stored
  d.mean = (0.5, 0.5, 0.5)
  d.std = (0.25, 0.25, 0.25)
  d.augment = "flip_crop"    # none | flip_crop
  d.worker_count = 0
  # MedMNIST npz: images read memory-mapped from a per-split .npy cache beside the file (made
  # once), so grain workers share pages instead of copying the set: auto (files >= 256 MB) | on | off.
  d.mmap = "auto"
  d.num_classes = 4          # synthetic
  d.train_size = 2000          # synthetic
  d.val_size = 400           # synthetic
  d.test_size = 800           # synthetic
  d.difficulty = 0.5         # synthetic: 0 easy .. 1 hard
  d.imbalance = 1.0          # synthetic: ratio of largest to smallest class
  d.seed = 0                 # synthetic: generator seed
  d.task = ""                # image_folder / tfds: override the derived task
  d.root = ""                # image_folder: images (and the CSV) live here
  d.csv = ""                 # image_folder: path,label[,split] rows; "" = a folder per class
  d.val_fraction = 0.1       # image_folder without a split column
  d.test_fraction = 0.1
  d.split_seed = 0
  d.path_column = "path"
  d.label_column = "label"
  d.split_column = "split"
  d.path_suffix = ""
  d.classes = ()             # image_folder: the class labels in id order; () = the train split's
  d.builder_dir = ""         # tfds: a prepared dataset directory instead of name + data_dir
  d.keep_classes = ()          # single-label data: only these class ids, renumbered 0..k-1 in
                               # this order (e.g. (0, 4): a binary task from two classes)
  d.group_column = "patient"   # image_folder: patient ids (splits and folds keep a patient whole)
  # The train split only, after folds: a seeded class-wise subset (data scarcity, imposed
  # imbalance), val and test untouched. fraction of each class; imbalance r >= 1: geometric
  # class sizes, the first class r times the last (0 = as stored).
  d.train_fraction = 1.0
  d.train_imbalance = 0.0
  d.subsample_seed = 0
  d.folds = 0                  # k-fold: train + val pooled, fold `fold` of k is val; 0 = off
  d.fold = 0
  d.fold_seed = 0
  # Shortcut learning (DESIGN §6, `data.confounders`): an artefact on a fraction p of the positive
  # train / val images; test becomes i.i.d. `test`, `test_ood` and `test_clean`. "" = off.
  # `attribute`: positives from group A (the CSV column `attribute` equal to `group_a`) with
  # probability p, negatives all from A; an image folder's CSV holds the column.
  d.confounder = ml_collections.ConfigDict(dict(
      kind="", p=0.0, seed=0, positive=1, text="R", photons=2e7, photons_confounded=1.5e7,
      attribute="", group_a=""))
  d.splits = ml_collections.ConfigDict({"train": "train", "val": "validation", "test": "test"})
  d.image_key = "image"      # tfds
  d.label_key = "label"      # tfds
  return d


def parallel_config() -> ml_collections.ConfigDict:
  """`config.parallel`: devices, backend and the multi-host settings (every job that runs models)."""
  p = ml_collections.ConfigDict()
  p.backend = "shard_map"  # shard_map | pmap
  p.num_devices = -1       # -1 = all
  p.coordinator_address = ""
  p.num_processes = 1
  p.process_id = 0
  p.heartbeat_timeout_seconds = 30  # multi-host: a dead peer ends the run within this
  return p


def train_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with defaults; configs/*.py start from this and change a few."""
  c = ml_collections.ConfigDict()
  c.job = "train"
  c.name = ""
  c.seed = 0

  c.data = data_config()

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet_small"
  c.model.num_classes = 0         # 0 = the dataset's
  c.model.dtype = "float32"       # computation dtype: float32 | bfloat16
  c.model.init = ""               # run dir, .safetensors/.pth, ViT .npz, Keras .h5; "" = random
  c.model.reset_head = True       # new head for the new task when loading weights
  c.model.kwargs = ml_collections.ConfigDict()

  c.method = method_config("full_ft")

  # Pretraining objective (DESIGN §8): supervised (the task loss) | simclr | byol | dino.
  c.objective = "supervised"
  c.ssl = ssl_config()

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "momentum"       # sgd | momentum | adam | adamw | lars
  c.optim.lr = 0.05
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 5e-4
  c.optim.clip_norm = 0.0
  c.optim.schedule = "cosine"     # constant | cosine
  c.optim.warmup_steps = 20
  c.optim.lr_mults = ()           # (("regex", multiplier), ...)
  c.optim.freeze = ""             # regex of parameters that do not train

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64         # global batch, split over devices and processes
  c.train.eval_batch_size = 0     # 0 = batch_size
  c.train.num_steps = 0
  c.train.num_epochs = 5.0
  c.train.log_every = 20
  c.train.eval_every = 0          # 0 = only at the end
  c.train.eval_splits = ("val", "test")
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 2    # >= 1: the final checkpoint is always kept
  # A step with a NaN/Inf loss, gradient, parameter or BatchNorm statistic stops the run (no bad
  # state is ever checkpointed); True: drop that step's update instead and count it.
  c.train.skip_nonfinite_steps = False
  c.train.tensorboard = True
  # Population training (repsim_jax.population): "seed=0,1,2,3;optim.lr=0.01,0.1" trains every
  # combination (here 8 members) as one vmapped program, each an ordinary run directory under
  # the workdir; "" = one run. Members may differ in the seed and population.SCALARS.
  c.train.population = ""

  c.analysis = ml_collections.ConfigDict()
  # Log linear CKA of every representation to the pretrained model on the global batch, inside
  # the jitted step, every `train.log_every` steps.
  c.analysis.in_step_similarity = False
  # "sam" | "asam": also log the SAM-style sharpness of the global batch inside the jitted step,
  # every `train.log_every` steps (config.analysis.sharpness: rho / asam_rho, steps, m, eta).
  c.analysis.in_step_sharpness = ""
  # At the end of a run from pretrained weights: similarity of every layer to the pretrained model.
  c.analysis.final_similarity = True
  # Also at every evaluation (split "similarity" in metrics.jsonl): the trajectories of DESIGN §9.
  c.analysis.eval_similarity = False
  # A labelled *source* task (a data config; source "" = off). At every evaluation: k-NN
  # (ssl.knn_k, ssl.knn_temperature) and linear-probe accuracy of the backbone's pre_logits on
  # its val split, the first `source_bank_size` train examples voting / fitting (split "source"):
  # how much of the pretrained ability survives fine-tuning. Its input shape must be the target's.
  c.analysis.source_data = data_config()
  c.analysis.source_data.source = ""
  c.analysis.source_bank_size = 2000
  # Sharpness (repsim_jax.sharpness) on a fixed probe set every N steps and at the end; 0 = off.
  c.analysis.sharpness_every = 0
  c.analysis.probe_batches = 2
  c.analysis.sharpness = sharpness_config()
  c.analysis.measures = ("linear_cka",)
  c.analysis.split = "test"
  c.analysis.max_examples = 2000

  c.parallel = parallel_config()
  return c


def ssl_config() -> ml_collections.ConfigDict:
  """`config.ssl`: the SSL objectives' hyper-parameters (0 = the objective's published value)."""
  s = ml_collections.ConfigDict()
  s.temperature = 0.1            # SimCLR's NT-Xent temperature
  s.hidden_dim = 0               # head hidden width: SimCLR 2048, BYOL 4096, DINO 2048
  s.proj_dim = 0                 # projection: SimCLR 128, BYOL 256, DINO's bottleneck 256
  s.out_dim = 65536              # DINO: prototypes (K)
  s.momentum = 0.996             # BYOL / DINO: EMA momentum at step 0, cosine to 1
  s.crop_scale = (0.08, 1.0)     # SimCLR / BYOL random resized crop area
  s.blur = True                  # Gaussian blur with the objective's probabilities
  s.color_strength = 1.0         # colour jitter amplitudes x this (DESIGN §8's at 1)
  s.global_scale = (0.4, 1.0)    # DINO: global crops' area
  s.local_scale = (0.05, 0.4)    # DINO: local crops' area
  s.local_crops = 6              # DINO: M local crops
  s.local_size = 0               # DINO: local crop side; 0 = 96/224 of the input size
  s.student_temp = 0.1
  s.teacher_temp = 0.04
  s.warmup_teacher_temp = 0.04   # DINO: teacher temperature at step 0, linear to teacher_temp
  s.teacher_temp_warmup_steps = 0
  s.center_momentum = 0.9
  s.knn_k = 20                   # the k-NN monitor (cosine, temperature-weighted votes)
  s.knn_temperature = 0.07
  s.knn_bank_split = "train"     # labelled examples that vote
  s.knn_bank_size = 5000         # at most this many of them (the split's first)
  return s


def sharpness_config() -> ml_collections.ConfigDict:
  from repsim_jax import sharpness  # pylint: disable=g-import-not-at-top
  return sharpness.default_config()


# λ where 1 is not the right scale: DELTA's squared feature distance sums over channels and BSS's
# σ² grow with batch and width (both are in the hundreds at a pretrained ResNet-18), while RepSim's
# features are normalised. The papers' values: Li et al. 2019 (α = 0.01), Chen et al. 2019 (η = 0.001).
DEFAULT_LAM = {"delta": 0.01, "bss": 0.001}


def method_config(name: str = "full_ft", **overrides) -> ml_collections.ConfigDict:
  """Every method hyper-parameter (DESIGN §1) at `name`'s defaults; each method reads the ones
  it needs."""
  m = ml_collections.ConfigDict()
  m.name = name  # full_ft | linear_probe | lp_ft | l2sp | delta | bss | sam | asam | repsim
  # RepSim / DELTA / BSS strength λ, optionally warmed up.
  m.lam = DEFAULT_LAM.get(name, 1.0)
  m.lam_schedule = "constant"     # constant | warmup
  m.lam_warmup_steps = 0
  m.layers = ("pre_logits",)      # regularised representations (RepSim, DELTA)
  m.layer_weights = ()            # one weight per layer; () = all 1
  # RepSim.
  m.q_mode = "learned"            # learned | procrustes | identity | covariance | cka
  m.q_init = "identity"           # identity | procrustes
  m.q_optimizer = "sgd"           # sgd | adam (Riemannian, on the Stiefel manifold)
  m.q_lr = 0.1
  m.q_momentum = 0.9
  m.retraction = "polar"          # qr | cayley | polar (faster for Q's small steps: optim/stiefel.py)
  m.init_batches = 1              # batches used to initialise Q / C_P
  # L2-SP: ½α‖w − w₀‖² (backbone) + ½β‖w‖² (head); DELTA uses β for its head term too.
  m.alpha = 0.01
  m.beta = 0.01
  m.bss_k = 1                     # BSS: number of smallest singular values shrunk
  m.lp_steps = 100                # LP-FT: linear-probing steps before full fine-tuning
  m.rho = 0.05                    # SAM / ASAM radius
  m.eta = 0.01                    # ASAM: T_w = |w| + η
  m.update(overrides)
  return m


def renamed_method(m: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Method config `m` as method `name`: keys still at `m.name`'s defaults take `name`'s (DELTA's
  λ is not RepSim's); keys set to anything else keep their value."""
  old, new = method_config(m.name), method_config(name)
  with new.unlocked():
    for k in m:
      if k != "name" and (k not in old or m[k] != old[k]):
        new[k] = m[k]
  return new


def set_keys(cfg: ml_collections.ConfigDict, overrides):
  """`cfg` with dotted keys set (`{"optim.lr": 0.1}`); an unknown key is a one-line error.
  `method.name` renames the method with `renamed_method`, before the other keys are set, so that
  a key given with it keeps the value given."""
  for dotted, value in sorted(overrides.items(), key=lambda kv: kv[0] != "method.name"):
    if dotted == "method.name" and "method" in cfg:
      with cfg.unlocked():
        cfg.method = renamed_method(cfg.method, value)
      continue
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
      if p not in node:
        raise ValueError(f"{dotted}: no such config key")
      node = node[p]
    if leaf not in node:
      raise ValueError(f"{dotted}: no such config key")
    with node.unlocked():
      node[leaf] = tuple(value) if isinstance(value, list) else value
  return cfg
