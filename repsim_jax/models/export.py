"""Writes published ImageNet weights as a `.safetensors` file that `config.model.init` reads.

  python -m repsim_jax.models.export torchvision:resnet18 weights/r18.safetensors
  python -m repsim_jax.models.export timm:vit_tiny_patch16_224 weights/vit_ti16.safetensors

Needs the library that publishes the weights (`pip install torch torchvision`, or `timm`) and
internet access once, to download them; fine-tuning from the file needs neither. The file is
checked by converting it for the matching repsim_jax model before the command says where it is.
Supported: torchvision `resnet18`, `resnet50`; timm `vit_tiny_patch16_224`,
`vit_small_patch16_224`, `vit_base_patch16_224` (other names: give `--arch`).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

# Published name -> the repsim_jax model its state dict converts to.
ARCHS = {"resnet18": "resnet18", "resnet50": "resnet50", "vit_tiny_patch16_224": "vit_ti16",
         "vit_small_patch16_224": "vit_s16", "vit_base_patch16_224": "vit_b16"}


def published_state_dict(library: str, name: str) -> dict[str, np.ndarray]:
  """The pretrained state dict of `name` from torchvision or timm, as float32 NumPy arrays."""
  if library == "torchvision":
    import torchvision  # pylint: disable=g-import-not-at-top
    model = torchvision.models.get_model(name, weights="DEFAULT")
  elif library == "timm":
    import timm  # pylint: disable=g-import-not-at-top
    model = timm.create_model(name, pretrained=True)
  else:
    raise ValueError(f"source: expected torchvision:NAME or timm:NAME, got {library!r}")
  return {k: (v.float() if v.is_floating_point() else v).detach().cpu().numpy()
          for k, v in model.state_dict().items()}


def write(state: dict[str, np.ndarray], path: str, arch: str) -> dict:
  """Writes `state` to `path` (safetensors, atomically) and converts it back for `arch`; returns
  the converted variables (the check that the file is what the trainer expects)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from repsim_jax import io  # pylint: disable=g-import-not-at-top
  from repsim_jax.models import convert  # pylint: disable=g-import-not-at-top
  state = {k: np.ascontiguousarray(v) for k, v in state.items()}
  io.atomic_write(path, lambda tmp: save_file(state, tmp))
  load = convert.load_timm_vit if arch.startswith("vit") else convert.load_torchvision_resnet
  return load(path, arch=arch)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("source", help="torchvision:NAME or timm:NAME")
  ap.add_argument("out", help="the .safetensors file to write")
  ap.add_argument("--arch", default="", help="the repsim_jax model (default: from NAME)")
  a = ap.parse_args(argv)
  library, _, name = a.source.partition(":")
  arch = a.arch or ARCHS.get(name, "")
  try:
    if not arch:
      raise ValueError(f"{a.source}: no repsim_jax model known for {name!r}; give --arch "
                       f"(one of {', '.join(sorted(set(ARCHS.values())))})")
    if not a.out.endswith(".safetensors"):
      raise ValueError(f"{a.out}: expected a .safetensors path")
    state = published_state_dict(library, name)
    write(state, a.out, arch)
  except ImportError as e:
    print(f"error: {a.source}: needs {e.name} (pip install torch torchvision, or timm)",
          file=sys.stderr)
    return 1
  except ValueError as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 1
  print(f"wrote {a.out} ({len(state)} tensors); fine-tune from it with "
        f"--config=configs/finetune.py:model={arch},init={a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
