"""What there is to choose from, on the command line.

  python -m repsim_jax.catalog [models | datasets | methods | objectives | confounders | jobs |
                                weights]   (all when omitted)

Every list is read from the registry the config keys are checked against (`models.MODEL_NAMES`,
the MedMNIST catalogue and synthetic kinds, `methods.METHODS`, `jobs.JOBS`), so it cannot drift
from what a config accepts.
"""

from __future__ import annotations

import sys

WEIGHT_FORMATS = (
    ("run directory", "a repsim_jax pretraining or fine-tuning run (its latest checkpoint)"),
    (".safetensors / .pth", "torchvision ResNet state dicts (resnet18, resnet50) and timm ViT "
                            "ones (vit_ti16, vit_s16, vit_b16); ImageNet weights from "
                            "`python -m repsim_jax.models.export`"),
    ("SSL releases", "MoCo v1/v2/v3 ResNet-50, DINO ResNet-50 / ViT (teacher or student), timm "
                     "DINO ViTs, DINOv2 ViT-S/B/L (with or without registers): the backbone "
                     "under its prefix, projection heads dropped"),
    (".npz", "Google / big_vision ViT checkpoints (e.g. ViT-B_16.npz)"),
    (".h5", "Keras ResNet-50 weights, e.g. RadImageNet's RadImageNet-ResNet50_notop.h5 (model "
            "resnet50_keras; needs h5py: the `h5` extra)"),
)


def models() -> list[tuple[str, str]]:
  from repsim_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  out = []
  for name in models_lib.MODEL_NAMES:
    cls, defaults = models_lib._REGISTRY[name]  # pylint: disable=protected-access
    out.append((name, f"{cls.__name__}({', '.join(f'{k}={v}' for k, v in defaults.items())})"))
  return out


def datasets() -> list[tuple[str, str]]:
  from repsim_jax.data import medmnist, synthetic  # pylint: disable=g-import-not-at-top
  out = [(f"medmnist: {name}", f"{task}, {classes} classes, {channels} channel"
          + ("s" if channels > 1 else ""))
         for name, (classes, task, channels) in sorted(medmnist.CATALOGUE.items())]
  out += [(f"synthetic: {kind}", f"built in, up to {synthetic.max_classes(kind)} classes, "
           f"{3 if kind != 'medical_gray' else 1} channel"
           + ("s" if kind != "medical_gray" else ""))
          for kind in synthetic.KINDS]
  out += [("image_folder", "your images: a folder and a CSV of path,label[,split]"),
          ("tfds", "any TensorFlow Datasets image classification set (config.data.name)")]
  return out


def methods() -> list[tuple[str, str]]:
  from repsim_jax import config_lib, methods as methods_lib  # pylint: disable=g-import-not-at-top
  out = []
  for name in sorted(methods_lib.METHODS):
    cfg = config_lib.method_config(name)
    method = methods_lib.get_method(cfg)
    keys = ", ".join(f"{k}={cfg[k]!r}" for k in method.uses)
    out.append((name, method.summary + (f"; keys: {keys}" if keys else "")))
  return out


def objectives() -> list[tuple[str, str]]:
  from repsim_jax import ssl  # pylint: disable=g-import-not-at-top
  what = {"supervised": "the task loss (labels)", "simclr": "NT-Xent, global-batch negatives",
          "byol": "EMA target, predictor", "dino": "EMA teacher, centring, multi-crop"}
  return [(name, what[name] + "; config.objective") for name in ssl.NAMES]


def confounders() -> list[tuple[str, str]]:
  from repsim_jax.data import confounders as conf  # pylint: disable=g-import-not-at-top
  what = {"tag": "a white letter (config.data.confounder.text)", "patch": "a white square",
          "lowpass": "high spatial frequencies removed", "noise": "CT-like Poisson noise, "
          "stronger on confounded images", "attribute": "a sampled group of an image folder's "
          "CSV column (config.data.confounder.attribute, .group_a)"}
  return [(k, what[k] + "; config.data.confounder.kind") for k in conf.KINDS]


def jobs() -> list[tuple[str, str]]:
  from repsim_jax import jobs as jobs_lib  # pylint: disable=g-import-not-at-top
  return [(name, jobs_lib.DESCRIPTIONS[name]) for name in jobs_lib.JOBS]


SECTIONS = {"models": models, "datasets": datasets, "methods": methods,
            "objectives": objectives, "confounders": confounders, "jobs": jobs,
            "weights": lambda: list(WEIGHT_FORMATS)}


def main(argv: list[str]) -> int:
  wanted = argv[1:] or list(SECTIONS)
  unknown = [w for w in wanted if w not in SECTIONS]
  if unknown:
    print(f"error: unknown section {unknown[0]!r}; expected some of {', '.join(SECTIONS)}",
          file=sys.stderr)
    return 2
  for section in wanted:
    rows = SECTIONS[section]()
    print(f"{section}:")
    width = max(len(name) for name, _ in rows)
    for name, what in rows:
      print(f"  {name.ljust(width)}  {what}")
    print()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
