"""`load_dataset(cfg)`: one entry point over the four data sources."""

from __future__ import annotations

from typing import Any

from repsim_jax.data.core import DatasetInfo

def load_dataset(cfg) -> tuple[dict[str, Any], DatasetInfo]:
  """`_load` with its argument errors named as the config keys they come from: the loaders
  say `size: expected >= 8 pixels`, a user of the command line reads `config.data.size=4: ...`."""
  try:
    return _load(cfg)
  except ValueError as e:
    text = str(e)
    word = text.split(":", 1)[0]
    key = word[4:] if word.startswith("cfg.") else word
    key = {"kind": "name"}.get(key, key)  # the synthetic loader's argument for config.data.name
    if key.isidentifier() and key in cfg:
      raise ValueError(f"config.data.{key}={cfg[key]!r}:{text.split(':', 1)[1]}") from e
    raise


def _with_defaults(cfg) -> dict:
  """`cfg` (a ConfigDict or mapping) over `config_lib.data_config()`'s defaults, except `name`:
  left out, an image folder is named after its root and the other sources refuse."""
  from repsim_jax import config_lib  # pylint: disable=g-import-not-at-top
  given = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  defaults = config_lib.data_config().to_dict()
  defaults.pop("name")
  return {**defaults, **{k: v for k, v in given.items() if v is not None}}


def _load(cfg) -> tuple[dict[str, Any], DatasetInfo]:
  """Loads the splits `cfg` describes (`config.data`; keys and defaults: `config_lib.data_config`).

  `cfg.source` selects the loader: 'medmnist' (name, size, data_dir), 'image_folder' (root, csv,
  image_size, channels, val/test_fraction, split_seed, the column names, path_suffix, task,
  classes, name [root's base name]), 'tfds' (name or builder_dir, data_dir, splits, image_key,
  label_key, image_size, task), 'synthetic' (name = natural | medical_gray | medical_rgb,
  num_classes, the split sizes, size, difficulty, imbalance, seed, data_dir).

  Returns:
    ({split name: random-access source}, DatasetInfo).
  """
  c = _with_defaults(cfg)
  source = c["source"]
  if source not in SOURCES:
    raise ValueError(f"cfg.source: expected one of {tuple(SOURCES)}, got {source!r}")
  if source in ("medmnist", "tfds", "synthetic") and not c.get("name") and not (
      source == "tfds" and c["builder_dir"]):
    raise ValueError(f"name: the {source} source needs a data set name")
  if (c.get("confounder") or {}).get("kind") == "attribute" and source != "image_folder":
    raise ValueError(f"config.data.confounder.kind='attribute': needs per-image metadata, which "
                     f"only image folders (a CSV column) have; config.data.source is {source!r}")
  splits, info = SOURCES[source](c)
  if c.get("keep_classes"):
    splits, info = keep_classes(splits, info, tuple(int(k) for k in c["keep_classes"]))
  if int(c.get("folds") or 0):
    from repsim_jax.data import folds  # pylint: disable=g-import-not-at-top
    splits = folds.kfold(splits, int(c["folds"]), int(c["fold"]), int(c["fold_seed"]))
  fraction, imbalance = float(c["train_fraction"]), float(c["train_imbalance"])
  if not 0 < fraction <= 1:
    raise ValueError(f"config.data.train_fraction={fraction}: expected 0 < fraction <= 1")
  if imbalance and imbalance < 1:
    raise ValueError(f"config.data.train_imbalance={imbalance}: expected 0 (as stored) or a "
                     "largest/smallest class ratio >= 1")
  if fraction < 1 or imbalance:
    from repsim_jax.data import folds  # pylint: disable=g-import-not-at-top
    if info.task == "multilabel":
      raise ValueError("config.data.train_fraction / train_imbalance: need single-label data")
    splits = {**splits, "train": folds.subsample(splits["train"], fraction, imbalance,
                                                 int(c["subsample_seed"]))}
  conf = c.get("confounder") or {}
  conf = conf.to_dict() if hasattr(conf, "to_dict") else dict(conf)
  if conf.get("kind"):
    from repsim_jax.data import confounders  # pylint: disable=g-import-not-at-top
    if conf["kind"] not in confounders.KINDS:
      raise ValueError(f"config.data.confounder.kind={conf['kind']!r}: expected one of "
                       f"{confounders.KINDS}")
    if info.task != "binary":
      raise ValueError(f"config.data.confounder.kind={conf['kind']!r}: needs a binary dataset; "
                       f"{info.name} is {info.task} with {info.num_classes} classes")
    defaults = config_defaults()["confounder"]
    splits = confounders.confound_splits(splits, _Attrs({**defaults, **conf}),
                                         int(conf.get("positive", 1)))
  return splits, info


def keep_classes(splits: dict, info: DatasetInfo, classes: tuple[int, ...]):
  """Only the examples of `classes`, relabelled by their position there."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from repsim_jax.data.core import ArraySource, task_for  # pylint: disable=g-import-not-at-top
  from repsim_jax.data.folds import Subset  # pylint: disable=g-import-not-at-top
  if info.task == "multilabel" or len(set(classes)) != len(classes) or len(classes) < 2 or not all(
      0 <= k < info.num_classes for k in classes):
    raise ValueError(f"config.data.keep_classes={classes}: expected 2 or more distinct class ids "
                     f"of the {info.num_classes}-class single-label dataset {info.name}")
  lut = np.full(info.num_classes, -1, np.int32)
  lut[list(classes)] = np.arange(len(classes))
  out = {}
  for name, src in splits.items():
    labels = lut[np.asarray(src.labels)]
    idx = np.flatnonzero(labels >= 0)
    if isinstance(src, ArraySource):
      out[name] = ArraySource(src.images[idx], labels[idx], src.name)
    else:
      out[name] = Subset([src], idx, labels=labels[idx])
  k = len(classes)
  return out, dataclasses.replace(info, num_classes=k, task=task_for(k))


class _Attrs(dict):
  __getattr__ = dict.__getitem__


def config_defaults() -> dict:
  from repsim_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.data_config().to_dict()


def _medmnist(c):
  from repsim_jax.data.medmnist import load_medmnist  # pylint: disable=g-import-not-at-top
  mmap = {"auto": "auto", "on": True, "off": False}.get(c["mmap"])
  if mmap is None:
    raise ValueError(f"config.data.mmap={c['mmap']!r}: expected 'auto', 'on' or 'off'")
  return load_medmnist(c["name"], int(c["size"]), c["data_dir"], mmap=mmap)


def _image_folder(c):
  from repsim_jax.data.image_folder import load_image_folder  # pylint: disable=g-import-not-at-top
  return load_image_folder(
      c["root"], csv=c["csv"], image_size=int(c["image_size"] or 224),
      channels=int(c["channels"] or 3), val_fraction=float(c["val_fraction"]),
      test_fraction=float(c["test_fraction"]), split_seed=int(c["split_seed"]),
      path_column=c["path_column"], label_column=c["label_column"],
      split_column=c["split_column"], path_suffix=c["path_suffix"], task=c["task"] or None,
      group_column=c["group_column"],
      attribute_column=_attribute_column(c),
      name=c.get("name") or None, classes=tuple(c["classes"] or ()))


def _attribute_column(c) -> str:
  """The CSV column an `attribute` confounder samples by ("" for other kinds)."""
  conf = c.get("confounder") or {}
  if conf.get("kind") != "attribute":
    return ""
  for key in ("attribute", "group_a"):
    if not str(conf.get(key) or ""):
      raise ValueError(f"config.data.confounder.{key}: needed for kind='attribute' (the CSV "
                       "column holding each image's group, e.g. attribute=sex, and the value of "
                       "group A in it, e.g. group_a=F)")
  return str(conf["attribute"])


def _tfds(c):
  from repsim_jax.data.tfds_source import load_tfds  # pylint: disable=g-import-not-at-top
  return load_tfds(
      c.get("name", ""), data_dir=c["data_dir"] or None, builder_dir=c["builder_dir"],
      splits=c["splits"] or None, image_key=c["image_key"], label_key=c["label_key"],
      image_size=int(c["image_size"]) or None, task=c["task"] or None)


def _synthetic(c):
  from repsim_jax.data.synthetic import load_synthetic  # pylint: disable=g-import-not-at-top
  return load_synthetic(
      kind=c["name"], num_classes=int(c["num_classes"]), train_size=int(c["train_size"]),
      val_size=int(c["val_size"]), test_size=int(c["test_size"]), size=int(c["size"]),
      difficulty=float(c["difficulty"]), imbalance=float(c["imbalance"]), seed=int(c["seed"]),
      data_dir=c["data_dir"])


# config.data.source -> its loader; the keys are the valid names.
SOURCES = {"medmnist": _medmnist, "image_folder": _image_folder, "tfds": _tfds,
           "synthetic": _synthetic}
