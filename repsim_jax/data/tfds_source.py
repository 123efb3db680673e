"""TFDS data sets read with `tfds` random-access data sources (array_record; no TensorFlow).

The data set must already be prepared in the user's data dir (`file_format='array_record'`).
Either `name` (a registered builder, optionally 'name/config:version', looked up in
`data_dir`) or `builder_dir` (a prepared '<data_dir>/<name>/<version>' directory, for builders
whose code is not importable) selects it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from repsim_jax.data.core import DatasetInfo, task_for

_VAL_NAMES = ("validation", "val", "valid")


class TfdsSource:
  """Wraps a tfds data source: `source[i] -> {'image': uint8 (H, W, C), 'label': int32}`.

  With `image_size` set, images of another size are resized (PIL bilinear, antialiased).
  """

  def __init__(self, data_source, *, image_key: str = "image", label_key: str = "label",
               image_size: int | None = None, name: str = "tfds"):
    self.data_source = data_source
    self.image_key = image_key
    self.label_key = label_key
    self.image_size = None if image_size is None else int(image_size)
    self.name = name

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.data_source[int(index)]
    image = np.asarray(record[self.image_key])
    if image.dtype != np.uint8:
      raise ValueError(f"{self.name}: feature {self.image_key!r} expected uint8, got {image.dtype}")
    if image.ndim == 2:
      image = image[..., None]
    s = self.image_size
    if s is not None and image.shape[:2] != (s, s):
      from PIL import Image  # pylint: disable=g-import-not-at-top
      im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
      image = np.asarray(im.resize((s, s), Image.Resampling.BILINEAR), np.uint8)
      image = image[..., None] if image.ndim == 2 else image
    return {"image": image, "label": np.asarray(record[self.label_key], np.int32)}

  def __repr__(self) -> str:
    return f"TfdsSource(name={self.name!r}, n={len(self)})"


def _label_space(feature, label_key: str, where: str) -> tuple[int, str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if isinstance(feature, tfds.features.ClassLabel):
    return feature.num_classes, task_for(feature.num_classes)
  shape = tuple(getattr(feature, "shape", ()) or ())
  if len(shape) == 1 and shape[0]:
    return int(shape[0]), "multilabel"
  raise ValueError(f"{where}: feature {label_key!r} must be a ClassLabel or a fixed-length (L,) "
                   f"multi-label vector, got {feature!r}")


def load_tfds(name: str = "", *, data_dir: str | None = None, builder_dir: str = "",
              splits: dict[str, str] | None = None, image_key: str = "image",
              label_key: str = "label", image_size: int | None = None, task: str | None = None):
  """Opens a prepared TFDS data set as grain-compatible random-access sources.

  Args:
    name: registered builder name ('name', 'name/config', 'name:version'), or '' with builder_dir.
    data_dir: TFDS data dir (default: TFDS's own default).
    builder_dir: a prepared data set directory, used instead of name.
    splits: {our split name: TFDS split spec}, e.g. {'train': 'train[:90%]', 'val':
      'train[90%:]', 'test': 'test'}; default: train, the first of validation/val/valid, test
      (those present).
    image_key, label_key: feature names.
    image_size: output side; required when the stored images vary in size.
    task: overrides the task derived from the label feature.

  Returns:
    ({split: TfdsSource}, DatasetInfo).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if builder_dir:
    builder_dir = os.path.expanduser(os.fspath(builder_dir))
    if not os.path.isdir(builder_dir):
      raise FileNotFoundError(f"{builder_dir}: TFDS builder directory not found")
    builder = tfds.builder_from_directory(builder_dir)
    where = builder_dir
  elif name:
    kwargs = {} if data_dir is None else {"data_dir": os.path.expanduser(os.fspath(data_dir))}
    try:
      builder = tfds.builder(name, **kwargs)
    except Exception as err:  # tfds raises several types (DatasetNotFoundError, ...)
      raise ValueError(f"name: TFDS data set {name!r} not found ({type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else ''})") from None
    where = f"tfds:{name}"
    if not builder.is_prepared():
      raise FileNotFoundError(f"{where}: not prepared in {builder.data_dir}; prepare it first "
                              "(tfds build --file_format=array_record)")
  else:
    raise ValueError("name: expected a TFDS data set name (or builder_dir), got ''")
  features = builder.info.features
  for key in (image_key, label_key):
    if key not in features:
      raise ValueError(f"{where}: missing feature {key!r} (features: {list(features.keys())})")
  num_classes, derived_task = _label_space(features[label_key], label_key, where)
  available = list(builder.info.splits.keys())
  if splits is None:
    splits = {}
    if "train" in available:
      splits["train"] = "train"
    val = next((v for v in _VAL_NAMES if v in available), None)
    if val is not None:
      splits["val"] = val
    if "test" in available:
      splits["test"] = "test"
    if not splits:
      raise ValueError(f"{where}: no train/validation/test split (splits: {available})")
  out = {}
  for ours, spec in dict(splits).items():
    try:
      ds = builder.as_data_source(split=spec)
    except Exception as err:  # invalid split spec or wrong file format
      raise ValueError(f"{where}: cannot open split {spec!r} as a data source "
                       f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                       ) from None
    out[ours] = TfdsSource(ds, image_key=image_key, label_key=label_key, image_size=image_size,
                           name=f"{builder.name}/{ours}")
  shape = tuple(features[image_key].shape)
  if len(shape) == 2:
    shape = shape + (1,)
  if image_size is not None:
    shape = (int(image_size), int(image_size), shape[-1])
  elif None in shape[:2]:
    raise ValueError(f"image_size: required, {where} stores images of varying size {shape}")
  info = DatasetInfo(builder.name, num_classes, task_for(num_classes, task or derived_task), shape)
  return out, info
