"""`load_dataset(cfg)`: one entry point over the four data sources."""

from __future__ import annotations

from typing import Any

from repsim_jax.data.core import DatasetInfo

SOURCES = ("medmnist", "image_folder", "tfds", "synthetic")


def _get(cfg, key: str, default: Any) -> Any:
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None else value


def load_dataset(cfg) -> tuple[dict[str, Any], DatasetInfo]:
  """`_load` with its argument errors named as the config keys they come from: the loaders
  say `size: expected >= 8 pixels`, a user of the command line reads `config.data.size=4: ...`."""
  try:
    return _load(cfg)
  except ValueError as e:
    text = str(e)
    word = text.split(":", 1)[0]
    key = word[4:] if word.startswith("cfg.") else word
    if key.isidentifier() and key in cfg:
      raise ValueError(f"config.data.{key}={cfg[key]!r}:{text.split(':', 1)[1]}") from e
    raise


def _load(cfg) -> tuple[dict[str, Any], DatasetInfo]:
  """Loads the splits described by an ml_collections ConfigDict (or any mapping).

  `cfg.source` selects the loader; its keys (defaults in brackets):
  - 'medmnist': name (e.g. 'pathmnist' or 'path'), size [28], data_dir ['~/.medmnist'].
  - 'image_folder': root, csv [''], image_size [224], channels [3], val_fraction [0.1],
    test_fraction [0.1], split_seed [0], path_column ['path'], label_column ['label'],
    split_column ['split'], path_suffix [''], task [derived], name [root's base name].
  - 'tfds': name or builder_dir, data_dir, splits (dict ours -> TFDS split), image_key
    ['image'], label_key ['label'], image_size, task.
  - 'synthetic': kind ('natural' | 'medical_gray' | 'medical_rgb'), num_classes, train_size
    [2000], val_size [500], test_size [1000], size [28], difficulty [0.3], imbalance [1.0],
    seed [0], data_dir ['~/.repsim_jax/synthetic'].

  Returns:
    ({split name: random-access source}, DatasetInfo).
  """
  source = _get(cfg, "source", None)
  if source == "medmnist":
    from repsim_jax.data.medmnist import load_medmnist  # pylint: disable=g-import-not-at-top
    return load_medmnist(_get(cfg, "name", ""), int(_get(cfg, "size", 28)),
                         _get(cfg, "data_dir", "~/.medmnist"))
  if source == "image_folder":
    from repsim_jax.data.image_folder import load_image_folder  # pylint: disable=g-import-not-at-top
    return load_image_folder(
        _get(cfg, "root", ""), csv=_get(cfg, "csv", ""),
        image_size=int(_get(cfg, "image_size", 224)), channels=int(_get(cfg, "channels", 3)),
        val_fraction=float(_get(cfg, "val_fraction", 0.1)),
        test_fraction=float(_get(cfg, "test_fraction", 0.1)),
        split_seed=int(_get(cfg, "split_seed", 0)), path_column=_get(cfg, "path_column", "path"),
        label_column=_get(cfg, "label_column", "label"),
        split_column=_get(cfg, "split_column", "split"),
        path_suffix=_get(cfg, "path_suffix", ""), task=cfg.get("task", None) or None,
        name=cfg.get("name", None) or None, classes=tuple(cfg.get("classes", ()) or ()))
  if source == "tfds":
    from repsim_jax.data.tfds_source import load_tfds  # pylint: disable=g-import-not-at-top
    splits = cfg.get("splits", None)
    if splits is not None and hasattr(splits, "to_dict"):
      splits = splits.to_dict()
    image_size = cfg.get("image_size", None)
    return load_tfds(
        _get(cfg, "name", ""), data_dir=cfg.get("data_dir", None) or None,
        builder_dir=_get(cfg, "builder_dir", ""), splits=splits or None,
        image_key=_get(cfg, "image_key", "image"), label_key=_get(cfg, "label_key", "label"),
        image_size=None if image_size is None else int(image_size),
        task=cfg.get("task", None) or None)
  if source == "synthetic":
    from repsim_jax.data.synthetic import load_synthetic  # pylint: disable=g-import-not-at-top
    return load_synthetic(
        kind=_get(cfg, "kind", "natural"), num_classes=int(_get(cfg, "num_classes", 10)),
        train_size=int(_get(cfg, "train_size", 2000)), val_size=int(_get(cfg, "val_size", 500)),
        test_size=int(_get(cfg, "test_size", 1000)), size=int(_get(cfg, "size", 28)),
        difficulty=float(_get(cfg, "difficulty", 0.3)),
        imbalance=float(_get(cfg, "imbalance", 1.0)), seed=int(_get(cfg, "seed", 0)),
        data_dir=_get(cfg, "data_dir", "~/.repsim_jax/synthetic"))
  raise ValueError(f"cfg.source: expected one of {SOURCES}, got {source!r}")
