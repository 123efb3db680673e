"""Weight converters: torchvision ResNet / timm ViT state dicts, Google ViT `.npz` files and
Keras ResNet-50 `.h5` files (RadImageNet).

Each loader builds the target model's variable shapes with `jax.eval_shape` (no compute), maps
every Flax leaf to its source key(s), checks shapes, and rejects leftover source keys, so a
wrong `arch` fails loudly with a one-line ValueError naming the file and the first offending
key. Weights are read with `safetensors.numpy`, `.pth` files by `models.pth` (neither needs torch),
`.h5` files with h5py (the `h5` extra; Keras is not needed).

The number of classes and input channels come from the checkpoint (0 classes when it has no
head); build the matching model with
`get_model(arch, variables['params']['head']['bias'].shape[0], **model_kwargs)`
(or `num_classes=0` when `'head' not in variables['params']`).
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from repsim_jax.models import MODEL_NAMES, get_model

Array = np.ndarray
# A source spec: the source key(s) of one Flax leaf and how to combine them into its value.
_Spec = tuple[tuple[str, ...], Callable[..., Array]]

_IGNORED_SUFFIXES = ("num_batches_tracked",)  # torch BatchNorm step counters
# Objects training scripts save around the weights, unwrapped in this order (DINO saves both
# networks; its releases and evaluations use the teacher).
_WRAPPERS = ("state_dict", "model", "teacher", "student", "module")
# Where the backbone lives in self-supervised checkpoints: MoCo v1/v2 (`encoder_q`, beside the
# key encoder and the queue), MoCo v3 (`base_encoder`, beside the momentum encoder and the
# predictor), DINO (`backbone`, beside its head). Keys outside the first prefix present belong
# to those other networks and are dropped.
_BACKBONE_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.base_encoder.", "base_encoder.",
                      "module.backbone.", "backbone.")


def _read_state_dict(path: str | os.PathLike) -> dict[str, Array]:
  """Reads a `.safetensors` or `.pth`/`.pt`/`.bin` state dict into NumPy arrays."""
  p = Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"path: no such checkpoint file {str(p)!r}")
  suffix = p.suffix.lower()
  if suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      state = dict(load_file(str(p)))
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
      raise ValueError(f"{p.name}: not a readable .safetensors file (truncated or not "
                       f"safetensors: {str(e).splitlines()[0][:120]})") from None
  elif suffix in (".pth", ".pt", ".bin"):
    obj = _read_torch(p)
    for wrapper in _WRAPPERS:
      if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
      raise ValueError(f"{p.name}: expected a state dict, got {type(obj).__name__}")
    state = {str(k): np.asarray(v, np.float32) if np.asarray(v).dtype == np.float16 else
             np.asarray(v) for k, v in obj.items() if isinstance(v, np.ndarray)}
  else:
    raise ValueError(f"path: expected a .safetensors or .pth file, got {p.name!r}")
  # DataParallel / DDP checkpoints prefix every key with 'module.'.
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  state = ssl_backbone(state)
  _check_values(p.name, state)
  return state


def ssl_backbone(state: Mapping[str, Array]) -> dict[str, Array]:
  """The backbone of a self-supervised checkpoint's state dict, in the plain layout: the keys
  under the first of `_BACKBONE_PREFIXES` present (prefix removed), and without a projection
  head (`fc.*` / `head.*` keys other than a linear classifier's weight and bias). A plain state
  dict comes back unchanged."""
  state = dict(state)
  for prefix in _BACKBONE_PREFIXES:
    if any(k.startswith(prefix) for k in state):
      state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
      break
  linear = {"fc.weight", "fc.bias", "head.weight", "head.bias"}
  heads = [k for k in state if k.startswith(("fc.", "head.")) and k not in linear]
  if heads:  # an MLP projection head (MoCo v2/v3): drop it, and any linear layer beside it
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}
  return state


def _read_torch(p: Path):
  """A torch.save file as Python objects with NumPy arrays: zip checkpoints (torch >= 1.6) by
  `models.pth` without torch; the pre-1.6 format needs torch."""
  from repsim_jax.models import pth  # pylint: disable=g-import-not-at-top
  if zipfile.is_zipfile(p):
    return pth.load(str(p), p.name)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return pth.load(str(p), p.name)  # raises: says how to convert or install
  def to_numpy(x):
    if isinstance(x, Mapping):
      return {k: to_numpy(v) for k, v in x.items()}
    return (x.float() if x.is_floating_point() else x).numpy() if hasattr(x, "numpy") else x

  return to_numpy(torch.load(str(p), map_location="cpu", weights_only=True))


def _check_values(name: str, state: Mapping[str, Array]) -> None:
  """Weights that cannot be right are refused; a lossless float16 upcast is said once."""
  half = [k for k, v in state.items() if v.dtype in (np.float16,) or str(v.dtype) == "bfloat16"]
  if half:
    print(f"warning: {name}: {len(half)} tensors are 16-bit floats (e.g. {half[0]!r}); read as "
          "float32", file=sys.stderr, flush=True)
  for k, v in state.items():
    if not np.issubdtype(v.dtype, np.number) or not np.issubdtype(v.dtype, np.floating):
      continue
    if not np.all(np.isfinite(v)):
      raise ValueError(f"{name}: tensor {k!r} contains NaN or Inf")
    if k.endswith(("running_var", "moving_variance")) and np.any(v < 0):
      raise ValueError(f"{name}: BatchNorm variance {k!r} has negative values "
                       f"(min {float(v.min()):.3g}); the file is corrupt")


def _oihw_to_hwio(w: Array) -> Array:
  return np.transpose(w, (2, 3, 1, 0))


def _torch_leaf(w: Array) -> Array:
  """torch layout -> flax layout by rank: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
  if w.ndim == 4:
    return _oihw_to_hwio(w)
  if w.ndim == 2:
    return w.T
  return w


def _target_shapes(model, in_channels: int, image_size: int) -> dict[tuple[str, ...], Any]:
  x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return traverse_util.flatten_dict(dict(variables))


def _assemble(name: str, source: Mapping[str, Array], targets, spec_fn, ignored=()):
  """Fills every target leaf from `source` via spec_fn(path) -> (keys, combine)."""
  out, used = {}, set()
  for path, sds in targets.items():
    keys, combine = spec_fn(path)
    for k in keys:
      if k not in source:
        raise ValueError(f"{name}: missing key {k!r} (needed for {'/'.join(path)})")
    value = np.asarray(combine(*[source[k] for k in keys]))
    if value.shape != tuple(sds.shape):
      shapes = ", ".join(f"{k} {tuple(source[k].shape)}" for k in keys)
      raise ValueError(f"{name}: key {keys[0]!r} has the wrong shape ({shapes}; "
                       f"{'/'.join(path)} needs {tuple(sds.shape)})")
    out[path] = value.astype(np.float32)  # host arrays, as a run directory's checkpoint gives
    used.update(keys)
  extra = [k for k in source if k not in used and not k.endswith(_IGNORED_SUFFIXES)
           and k not in ignored]
  if extra:
    raise ValueError(f"{name}: unexpected key {extra[0]!r} ({len(extra)} source keys have no "
                     f"place in the model; wrong arch or model kwargs?)")
  return traverse_util.unflatten_dict(out)


def _arch_model(name: str, arch: str, num_classes: int, model_kwargs):
  try:
    return get_model(arch, num_classes, **model_kwargs)
  except ValueError as e:
    raise ValueError(f"arch: cannot build {arch!r} for {name}: {e}") from None


# ---------------------------------------------------------------------------------------------
# torchvision ResNet


def _torchvision_resnet_key(path: tuple[str, ...]) -> _Spec:
  collection, *mods, leaf = path
  parts = []
  for m in mods:
    if m == "head":
      parts.append("fc")
    elif m == "downsample_conv":
      parts.append("downsample.0")
    elif m == "downsample_bn":
      parts.append("downsample.1")
    else:
      parts.append(re.sub(r"^(layer\d+)_(\d+)$", r"\1.\2", m))
  torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}[leaf]
  del collection  # params and batch_stats live side by side in a torch state dict
  return ((".".join(parts + [torch_leaf]),), _torch_leaf)


def load_torchvision_resnet(path: str | os.PathLike, *, arch: str = "resnet50",
                            **model_kwargs) -> dict[str, Any]:
  """Converts a torchvision ResNet state dict into `{'params', 'batch_stats'}`.

  Args:
    path: `.safetensors` (no torch needed) or `.pth` (needs torch) state dict.
    arch: registry name of a ResNet (`resnet18`, `resnet50`, `resnet_small`).
    **model_kwargs: ResNet overrides, e.g. `stage_sizes=(1, 1, 1, 1)` for a torchvision
      `ResNet(Bottleneck, [1, 1, 1, 1])` with arch='resnet50'.
  Returns:
    variables for `get_model(arch, num_classes, **model_kwargs)`; num_classes = fc rows.
  """
  name = Path(path).name
  state = _read_state_dict(path)
  if "conv1.weight" not in state:
    raise ValueError(f"{name}: missing key 'conv1.weight' (not a torchvision ResNet state dict)")
  num_classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else 0
  model = _arch_model(name, arch, num_classes, model_kwargs)
  targets = _target_shapes(model, int(state["conv1.weight"].shape[1]), 64)
  return _assemble(name, state, targets, _torchvision_resnet_key)


# ---------------------------------------------------------------------------------------------
# Keras ResNet-50 (keras.applications layout; RadImageNet's released weights)

_KERAS_BN = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}


def _keras_resnet_key(path: tuple[str, ...]) -> _Spec:
  _, *mods, leaf = path
  if mods == ["head"]:
    layer = "predictions"
  elif mods in (["conv1"], ["bn1"]):
    layer = f"conv1_{mods[0][:-1]}"
  else:
    stage, block = re.fullmatch(r"layer(\d+)_(\d+)", mods[0]).groups()
    sub = re.fullmatch(r"(conv|bn)(\d)|downsample_(conv|bn)", mods[1])
    kind, index = (sub.group(1), sub.group(2)) if sub.group(1) else (sub.group(3), "0")
    layer = f"conv{int(stage) + 1}_block{int(block) + 1}_{index}_{kind}"
  is_bn = layer.endswith("_bn")
  return ((f"{layer}/{_KERAS_BN[leaf] if is_bn else leaf}",), lambda w: w)


def _read_keras_h5(path: Path) -> dict[str, Array]:
  """`{layer/weight: array}` of a Keras HDF5 weights file (`save_weights` in Keras 2, or a
  whole-model `.h5` with a `model_weights` group, Keras 2 or 3's legacy format). Weight names
  keep their last two parts without the `:0` suffix, so a ResNet nested in another model
  reads like a plain one."""
  try:
    import h5py  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"{path.name}: reading Keras .h5 weights needs h5py: "
                      "pip install 'repsim_jax[h5]'") from None
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise ValueError(f"{path.name}: not a readable HDF5 file ({str(e)[:120]})") from None
  with f:
    g = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in g.attrs:
      hint = (" (Keras 3's .weights.h5 layout names variables by position; save with "
              "model.save('model.h5') instead)" if "layers" in g and "vars" in g else "")
      raise ValueError(f"{path.name}: no 'layer_names' attribute: not a Keras HDF5 weights "
                       f"file{hint}")
    text = lambda b: b.decode("utf8") if isinstance(b, bytes) else str(b)  # noqa: E731
    state = {}
    for layer in map(text, g.attrs["layer_names"]):
      for weight in map(text, g[layer].attrs.get("weight_names", [])):
        key = "/".join(weight.split(":")[0].split("/")[-2:])
        state[key] = np.asarray(g[layer][weight])
  _check_values(path.name, state)
  return state


def load_keras_resnet(path: str | os.PathLike, *, arch: str = "resnet50_keras",
                      **model_kwargs) -> dict[str, Any]:
  """Converts a Keras `ResNet50` HDF5 file (e.g. RadImageNet's `RadImageNet-ResNet50_notop.h5`)
  into `{'params', 'batch_stats'}`.

  Keras' v1 ResNet differs from torchvision's: the stride sits in a block's first 1x1 conv,
  every conv has a bias and BatchNorm's epsilon is 1.001e-5; `resnet50_keras` is that model.
  Kernels are HWIO in both frameworks, so the mapping is a renaming.

  Args:
    path: a `.h5` file as `model.save_weights` (Keras 2) or `model.save` (Keras 2, or Keras 3's
      legacy HDF5) writes it.
    arch: a Keras-layout ResNet (`resnet50_keras`); stage sizes or width via model_kwargs.
  Returns:
    variables for `get_model(arch, num_classes, **model_kwargs)`; num_classes = the
    `predictions` layer's outputs, 0 for `include_top=False` files.
  """
  p = Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"path: no such checkpoint file {str(p)!r}")
  state = _read_keras_h5(p)
  if "conv1_conv/kernel" not in state:
    raise ValueError(f"{p.name}: missing key 'conv1_conv/kernel' (not a Keras ResNet)")
  num_classes = int(state["predictions/kernel"].shape[1]) if "predictions/kernel" in state else 0
  model = _arch_model(p.name, arch, num_classes, model_kwargs)
  if not (getattr(model, "conv_bias", False) and getattr(model, "block", None) == "bottleneck_v1"):
    raise ValueError(f"{p.name}: Keras ResNet weights need a Keras-layout model "
                     f"(config.model.name='resnet50_keras'), got {arch!r}")
  targets = _target_shapes(model, int(state["conv1_conv/kernel"].shape[2]), 64)
  return _assemble(p.name, state, targets, _keras_resnet_key)


# ---------------------------------------------------------------------------------------------
# timm ViT


def _timm_vit_key(path: tuple[str, ...]) -> _Spec:
  _, *mods, leaf = path
  if mods == ["patch_embed"]:
    mods = ["patch_embed", "proj"]
  parts = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", m) for m in mods]
  if leaf in ("cls_token", "reg_token", "pos_embed", "gamma"):
    torch_leaf = leaf
  else:
    torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
  return ((".".join(parts + [torch_leaf]),), _torch_leaf if leaf == "kernel" else (lambda w: w))


def _dinov2_official_to_timm(state: dict[str, Array]) -> dict[str, Array]:
  """facebookresearch/dinov2 keys -> timm's (what timm's own filter does): the mask token
  dropped; with registers, `register_tokens` -> `reg_token` and the class token's position
  row folded into the class token, so only patches have position embeddings."""
  state = {k: v for k, v in state.items() if k != "mask_token"}
  if "register_tokens" in state:
    state["reg_token"] = state.pop("register_tokens")
    state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
    state["pos_embed"] = state["pos_embed"][:, 1:]
  return state


def _vit_geometry(name: str, state: Mapping[str, Array], model_kwargs) -> dict[str, Any]:
  """The ViT's layout from its state dict: patch size, registers, LayerScale, whether the class
  (and register) tokens have position rows, and image_size from the patch grid."""
  kwargs = dict(model_kwargs)
  num_pos = int(state["pos_embed"].shape[1])
  regs = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
  kwargs.setdefault("patch_size", int(state["patch_embed.proj.weight"].shape[-1]))
  kwargs.setdefault("num_registers", regs)
  kwargs.setdefault("layer_scale", "blocks.0.ls1.gamma" in state)
  if "class_pos_embed" not in kwargs:
    square = lambda m: m > 0 and int(round(m ** 0.5)) ** 2 == m  # noqa: E731
    if square(num_pos - 1 - regs):
      kwargs["class_pos_embed"] = True
    elif square(num_pos):
      kwargs["class_pos_embed"] = False
    else:
      raise ValueError(f"{name}: position embedding has {num_pos} rows, not a square patch "
                       f"grid (+ 1 class token{f' + {regs} registers' if regs else ''})")
  grid = int(round((num_pos - ((1 + regs) if kwargs["class_pos_embed"] else 0)) ** 0.5))
  kwargs.setdefault("image_size", grid * kwargs["patch_size"])
  return kwargs


def load_timm_vit(path: str | os.PathLike, *, arch: str = "vit_b16",
                  **model_kwargs) -> dict[str, Any]:
  """Converts a timm VisionTransformer state dict (cls-token pooling) into `{'params'}`.

  Args:
    path: `.safetensors` or `.pth` state dict (e.g. timm's `vit_tiny_patch16_224`).
    arch: registry ViT name (`vit_ti16`, `vit_s16`, `vit_b16`); patch_size and image_size are
      taken from the checkpoint unless passed in model_kwargs.
  Returns:
    variables for `get_model(arch, num_classes, image_size=..., **model_kwargs)`.
  """
  name = Path(path).name
  state = _dinov2_official_to_timm(_read_state_dict(path))
  for k in ("patch_embed.proj.weight", "pos_embed", "cls_token"):
    if k not in state:
      raise ValueError(f"{name}: missing key {k!r} (not a timm cls-token ViT state dict)")
  kwargs = _vit_geometry(name, state, model_kwargs)
  registry = get_model(arch, 0) if arch in MODEL_NAMES else None
  for key in ("num_registers", "layer_scale", "class_pos_embed"):
    if registry is not None and key not in model_kwargs and getattr(registry, key) != kwargs[key]:
      raise ValueError(f"{name}: the checkpoint has {key}={kwargs[key]!r} but arch {arch!r} has "
                       f"{getattr(registry, key)!r}; pick the matching arch (e.g. "
                       f"{'vit_s14_reg4_dinov2' if kwargs['num_registers'] else 'vit_s14_dinov2'} "
                       f"for DINOv2) or pass {key}= in the model kwargs")
  num_classes = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
  model = _arch_model(name, arch, num_classes, kwargs)
  targets = _target_shapes(model, int(state["patch_embed.proj.weight"].shape[1]),
                           kwargs["image_size"])
  return _assemble(name, state, targets, _timm_vit_key)


# ---------------------------------------------------------------------------------------------
# Google ViT .npz (google-research/vision_transformer and big_vision)

# Sub-module names inside `Transformer/encoderblock_{i}` of the two code bases.
_NPZ_LAYOUTS = {
    "vision_transformer": dict(ln1="LayerNorm_0", mha="MultiHeadDotProductAttention_1",
                               ln2="LayerNorm_2", mlp="MlpBlock_3"),
    "big_vision": dict(ln1="LayerNorm_0", mha="MultiHeadDotProductAttention_0",
                       ln2="LayerNorm_1", mlp="MlpBlock_0"),
}


def _heads_merge_in(w: Array) -> Array:
  # query/key/value kernels (D, H, Dh) -> (D, H*Dh); biases (H, Dh) -> (H*Dh,)
  return w.reshape(w.shape[0], -1) if w.ndim == 3 else w.reshape(-1)


def _npz_spec_fn(prefix: str, names: Mapping[str, str], pos_key: str):
  def spec(path: tuple[str, ...]) -> _Spec:
    _, *mods, leaf = path
    ident = lambda w: w
    if mods == ["patch_embed"]:
      return ((f"{prefix}embedding/{leaf}",), ident)
    if not mods and leaf == "cls_token":
      return ((f"{prefix}cls",), ident)
    if not mods and leaf == "pos_embed":
      return ((pos_key,), ident)
    if mods == ["norm"]:
      return ((f"{prefix}Transformer/encoder_norm/{leaf}",), ident)
    if mods == ["head"]:
      return ((f"{prefix}head/{leaf}",), ident)
    block = re.fullmatch(r"blocks_(\d+)", mods[0])
    if block is None:
      raise AssertionError(f"unmapped parameter {'/'.join(path)}")
    bp = f"{prefix}Transformer/encoderblock_{block.group(1)}/"
    sub = "/".join(mods[1:])
    if sub in ("norm1", "norm2"):
      return ((f"{bp}{names['ln1' if sub == 'norm1' else 'ln2']}/{leaf}",), ident)
    if sub in ("mlp/fc1", "mlp/fc2"):
      return ((f"{bp}{names['mlp']}/Dense_{0 if sub == 'mlp/fc1' else 1}/{leaf}",), ident)
    mha = f"{bp}{names['mha']}/"
    if sub == "attn/qkv":
      keys = tuple(f"{mha}{n}/{leaf}" for n in ("query", "key", "value"))
      return (keys, lambda q, k, v: np.concatenate(
          [_heads_merge_in(q), _heads_merge_in(k), _heads_merge_in(v)], axis=-1))
    if sub == "attn/proj":
      # out kernel (H, Dh, D) -> (H*Dh, D); bias (D,) unchanged.
      return ((f"{mha}out/{leaf}",),
              (lambda w: w.reshape(-1, w.shape[-1])) if leaf == "kernel" else ident)
    raise AssertionError(f"unmapped parameter {'/'.join(path)}")
  return spec


def load_big_vision_vit_npz(path: str | os.PathLike, *, arch: str = "vit_b16",
                            **model_kwargs) -> dict[str, Any]:
  """Converts a Google ViT `.npz` checkpoint (cls-token models) into `{'params'}`.

  Reads the `Transformer/encoderblock_{i}/...` layout of google-research/vision_transformer
  (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3; optional
  `opt/target/` prefix) and of big_vision (LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0; `pos_embedding` without a cls row, which is equivalent to a zero
  cls position since big_vision prepends the cls token after adding positions). GAP-pooled
  models (no `cls`), scanned blocks and in21k `pre_logits` representation layers are rejected.
  """
  name = Path(path).name
  if Path(path).suffix.lower() != ".npz":
    raise ValueError(f"path: expected a .npz file, got {name!r}")
  if not Path(path).is_file():
    raise FileNotFoundError(f"path: no such checkpoint file {str(path)!r}")
  try:
    with np.load(path, allow_pickle=False) as f:
      if not hasattr(f, "files"):
        raise ValueError("a single .npy array, not an archive")
      raw = {k: f[k] for k in f.files}
  except Exception as e:  # noqa: BLE001  (zipfile, pickle and numpy raise many types)
    raise ValueError(f"{name}: not a readable .npz archive "
                     f"({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None
  prefix = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in raw),
                None)
  if prefix is None:
    raise ValueError(f"{name}: missing key 'embedding/kernel' (not a Google ViT checkpoint)")
  if f"{prefix}cls" not in raw:
    raise ValueError(f"{name}: missing key {prefix + 'cls'!r} (GAP-pooled ViTs are not "
                     f"supported; the timm layout pools the cls token)")
  if f"{prefix}Transformer/encoderblock/{_NPZ_LAYOUTS['big_vision']['ln1']}/scale" in raw:
    raise ValueError(f"{name}: unexpected key {prefix + 'Transformer/encoderblock'!r} "
                     f"(scanned blocks are not supported; save with scan=False)")
  if f"{prefix}pre_logits/kernel" in raw:
    raise ValueError(f"{name}: unexpected key {prefix + 'pre_logits/kernel'!r} (representation "
                     f"layer of in21k checkpoints is not supported)")
  layout = ("vision_transformer"
            if f"{prefix}Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in raw
            else "big_vision")

  source = {k: v for k, v in raw.items() if k.startswith(prefix)}
  pos_key = f"{prefix}Transformer/posembed_input/pos_embedding"
  if pos_key not in source:
    pos_key = f"{prefix}pos_embedding"
  if pos_key not in source:
    raise ValueError(f"{name}: missing key {prefix + 'Transformer/posembed_input/pos_embedding'!r}")
  pos = source[pos_key]
  if pos.ndim == 2:
    pos = pos[None]
  g = int(round(pos.shape[1] ** 0.5))
  if g * g == pos.shape[1]:
    # big_vision: positions cover the patch grid only; the cls token gets none.
    pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  source[pos_key] = pos

  kernel = source[f"{prefix}embedding/kernel"]
  # Google ViTs: no registers, no LayerScale, a class-token position row.
  kwargs = _vit_geometry(name, {"pos_embed": pos, "patch_embed.proj.weight": kernel.T},
                         {"class_pos_embed": True, **model_kwargs})
  head_key = f"{prefix}head/bias"
  num_classes = int(source[head_key].shape[-1]) if head_key in source else 0
  model = _arch_model(name, arch, num_classes, kwargs)
  targets = _target_shapes(model, int(kernel.shape[2]), kwargs["image_size"])
  return _assemble(name, source, targets, _npz_spec_fn(prefix, _NPZ_LAYOUTS[layout], pos_key))


__all__ = ["load_torchvision_resnet", "load_keras_resnet", "load_timm_vit",
           "load_big_vision_vit_npz"]
