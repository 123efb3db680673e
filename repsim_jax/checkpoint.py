"""Orbax checkpoints of a run, and loading pretrained weights from any supported source.

A run's checkpoint at step s holds three items, so other jobs can read just what they need:
  `variables`: the model's {'params', 'batch_stats'} (what `finetune` / `analyze` load),
  `train`:     the rest of the training state (optimiser, method parameters, step, ...),
  `meta`:      JSON: the data iterator state and the model name.
Orbax writes each step to a temporary directory and renames it when complete, so a run killed
at any moment leaves the previous checkpoints intact.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp


class CorruptCheckpoint(ValueError):
  """A checkpoint that cannot be read back as it was written."""


class Checkpointer:
  """Saves / restores a run's state under `workdir/checkpoints`.

  Each save stores a checksum of every array in `meta`, and a restore recomputes them: orbax's
  own files carry none, so flipped bits would otherwise load silently as wrong weights.
  """

  def __init__(self, workdir: str, *, keep: int = 2):
    if keep < 1:
      raise ValueError(f"config.train.keep_checkpoints={keep}: expected >= 1 (a run keeps at "
                       "least its final checkpoint)")
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=_handlers())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, variables, train, meta: dict) -> None:
    meta = dict(meta, checksums=checksums({"variables": variables, "train": train}))
    self.manager.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables),
        train=ocp.args.StandardSave(train),
        meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, variables_template, train_template):
    """Restores into the templates' structure; a different model is a one-line ValueError, a
    checkpoint that is unreadable or fails its checksums a `CorruptCheckpoint`."""
    where = f"checkpoint {self.directory}/{step}"
    try:
      saved = self.manager.item_metadata(step)
      saved_variables = saved["variables"]
    except Exception as e:  # noqa: BLE001  (orbax raises many types for a broken directory)
      raise CorruptCheckpoint(f"{where}: unreadable ({_reason(e)})") from None
    if saved_variables is None:
      raise CorruptCheckpoint(f"{where}: unreadable (no variables)")
    check_compatible(saved_variables, variables_template, where)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(_abstract(variables_template)),
          train=ocp.args.StandardRestore(_abstract(train_template)),
          meta=ocp.args.JsonRestore()))
    except ValueError as e:
      if "holds a different model" in str(e):
        raise
      raise CorruptCheckpoint(f"{where}: unreadable ({_reason(e)})") from None
    except Exception as e:  # noqa: BLE001
      raise CorruptCheckpoint(f"{where}: unreadable ({_reason(e)})") from None
    meta = dict(out["meta"])
    _verify(meta.pop("checksums", None), {"variables": out["variables"], "train": out["train"]},
            where)
    return out["variables"], out["train"], meta

  def restore_latest(self, variables_template, train_template):
    """(step, variables, train, meta) of the newest checkpoint that reads back intact, or None.

    A corrupt, truncated or half-deleted newer checkpoint is moved to `checkpoints_corrupt/`
    with one warning line, so the run resumes from the one before and later saves of that step
    do not collide with it.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if steps:
      _quiet_abandoned_reads()  # before: a failed read's siblings may end while it is raised
    for step in steps:
      try:
        return (step, *self.restore(step, variables_template, train_template))
      except CorruptCheckpoint as e:
        moved = self.quarantine(step)
        print(f"warning: {e}; moved to {moved}, trying the one before", file=sys.stderr,
              flush=True)
    return None

  def quarantine(self, step: int) -> str:
    dest_dir = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt")
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, f"{step}-{int(time.time())}")
    os.replace(os.path.join(self.directory, str(step)), dest)
    self.manager.reload()
    return dest

  def close(self) -> None:
    self.manager.close()


_QUIETED = []


def _quiet_abandoned_reads() -> None:
  """A failed restore leaves orbax's other async reads of that step to end on a closed event
  loop, each printing a traceback ('Event loop is closed', 'Task exception was never retrieved')
  that says nothing the warning line does not. Those two messages, and only they, are dropped
  from then on in this process."""
  if _QUIETED:
    return
  _QUIETED.append(True)
  import logging  # pylint: disable=g-import-not-at-top
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and "Event loop is closed" in str(unraisable.exc_value)):
      previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(
      lambda record: "exception was never retrieved" not in record.getMessage())


def _reason(e: Exception) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return (lines[0][:200] if lines else type(e).__name__)


def checksums(tree) -> dict[str, str]:
  """{array path: blake2b of its dtype, shape and bytes}: what a restore must reproduce."""
  from repsim_jax.optim.optimizers import path_str
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h = hashlib.blake2b(f"{a.dtype.str}{a.shape}".encode(), digest_size=12)
    h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    out[path_str(path)] = h.hexdigest()
  return out


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
  """The model variables a run saved (latest intact step unless given), as NumPy, checksummed."""
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{workdir}: no checkpoints/ directory (expected a repsim_jax run)")
  mngr = ocp.CheckpointManager(ckpt_dir, item_handlers=_handlers())
  try:
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise FileNotFoundError(f"{ckpt_dir}: no finished checkpoint")
    for s in steps:
      try:
        return _restore_variables(mngr, s, f"checkpoint {ckpt_dir}/{s}")
      except CorruptCheckpoint as e:
        if step is not None or s == steps[-1]:
          raise
        print(f"warning: {e}; reading the one before", file=sys.stderr, flush=True)
  finally:
    mngr.close()


def _restore_variables(mngr, step: int, where: str) -> dict:
  try:
    out = mngr.restore(step, args=ocp.args.Composite(variables=ocp.args.StandardRestore(),
                                                     meta=ocp.args.JsonRestore()))
  except Exception as e:  # noqa: BLE001
    raise CorruptCheckpoint(f"{where}: unreadable ({_reason(e)})") from None
  variables = jax.tree.map(np.asarray, dict(out["variables"]))
  _verify((out["meta"] or {}).get("checksums"), {"variables": variables}, where)
  return variables


def _verify(expected: dict | None, restored: dict, where: str) -> None:
  """The restored items' checksums equal those saved for them (items not restored are not
  compared); raises CorruptCheckpoint naming the first array that differs."""
  if expected is None:
    raise CorruptCheckpoint(f"{where}: no checksums (written by an older repsim_jax)")
  expected = {k: v for k, v in expected.items() if k.split("/")[0] in restored}
  got = checksums(restored)
  bad = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
  if bad:
    raise CorruptCheckpoint(f"{where}: checksum mismatch in {bad[0]}"
                            + (f" and {len(bad) - 1} more arrays" if len(bad) > 1 else ""))


def load_pretrained(path: str, model_name: str, **model_kwargs) -> dict:
  """Model variables from a run dir (orbax), torchvision/timm `.safetensors`/`.pth`, ViT `.npz`
  or Keras ResNet `.h5`."""
  from repsim_jax.models import convert
  if os.path.isdir(path):
    return load_run_variables(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.model.init={path!r}: no such file or run directory")
  is_vit = model_name.startswith("vit")
  if path.endswith(".npz"):
    return convert.load_big_vision_vit_npz(path, arch=model_name, **model_kwargs)
  if path.endswith(".h5"):
    return convert.load_keras_resnet(path, arch=model_name, **model_kwargs)
  if path.endswith((".safetensors", ".pth", ".pt", ".bin")):
    if is_vit:
      return convert.load_timm_vit(path, arch=model_name, **model_kwargs)
    return convert.load_torchvision_resnet(path, arch=model_name, **model_kwargs)
  raise ValueError(f"config.model.init={path!r}: expected a run directory, .safetensors, .pth, "
                   ".npz or .h5")
