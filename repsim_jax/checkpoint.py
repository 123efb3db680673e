"""Orbax checkpoints of a run, and loading pretrained weights from any supported source.

A run's checkpoint at step s holds three items, so other jobs can read just what they need:
  `variables`: the model's {'params', 'batch_stats'} (what `finetune` / `analyze` load),
  `train`:     the rest of the training state (optimiser, method parameters, step, ...),
  `meta`:      JSON: the data iterator state and the model name.
Orbax writes each step to a temporary directory and renames it when complete, so a run killed
at any moment leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves / restores a run's state under `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=_handlers())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, variables, train, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables),
        train=ocp.args.StandardSave(train),
        meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, variables_template, train_template):
    """Restores into the templates' structure; a different model is a one-line error."""
    saved = self.manager.item_metadata(step)
    check_compatible(saved["variables"], variables_template,
                     f"checkpoint {self.directory}/{step}")
    out = self.manager.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(_abstract(variables_template)),
        train=ocp.args.StandardRestore(_abstract(train_template)),
        meta=ocp.args.JsonRestore()))
    return out["variables"], out["train"], out["meta"]

  def close(self) -> None:
    self.manager.close()


def _handlers():
  return {"variables": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler()}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                      if not isinstance(x, jax.ShapeDtypeStruct) else x, tree)


def _flat_shapes(tree) -> dict[str, tuple]:
  from repsim_jax.optim.optimizers import path_str
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(p): tuple(getattr(v, "shape", np.shape(v))) for p, v in flat}


def check_compatible(saved, expected, where: str, *, ignore: str | None = None) -> None:
  """Raises a one-line ValueError naming the first key whose presence or shape differs."""
  a, b = _flat_shapes(saved), _flat_shapes(expected)
  for key in sorted(set(a) | set(b)):
    if ignore and key.startswith(ignore):
      continue
    if key not in a:
      raise ValueError(f"{where}: holds a different model: parameter {key!r} missing")
    if key not in b:
      raise ValueError(f"{where}: holds a different model: unexpected parameter {key!r}")
    if a[key] != b[key]:
      raise ValueError(f"{where}: holds a different model: {key!r} has shape {a[key]}, "
                       f"expected {b[key]}")


def load_run_variables(workdir: str, step: int | None = None) -> dict:
  """The model variables a run saved (latest step unless given), as NumPy."""
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{workdir}: no checkpoints/ directory (expected a repsim_jax run)")
  mngr = ocp.CheckpointManager(ckpt_dir, item_handlers=_handlers())
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{ckpt_dir}: no finished checkpoint")
  out = mngr.restore(step, args=ocp.args.Composite(variables=ocp.args.StandardRestore()))
  mngr.close()
  return jax.tree.map(np.asarray, dict(out["variables"]))


def load_pretrained(path: str, model_name: str, **model_kwargs) -> dict:
  """Model variables from a run dir (orbax), torchvision/timm `.safetensors`/`.pth`, or ViT `.npz`."""
  from repsim_jax.models import convert
  if os.path.isdir(path):
    return load_run_variables(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.model.init={path!r}: no such file or run directory")
  is_vit = model_name.startswith("vit")
  if path.endswith(".npz"):
    return convert.load_big_vision_vit_npz(path, arch=model_name, **model_kwargs)
  if path.endswith((".safetensors", ".pth", ".pt", ".bin")):
    if is_vit:
      return convert.load_timm_vit(path, arch=model_name, **model_kwargs)
    return convert.load_torchvision_resnet(path, arch=model_name, **model_kwargs)
  raise ValueError(f"config.model.init={path!r}: expected a run directory, .safetensors, .pth or .npz")
