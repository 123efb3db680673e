"""Model registry: torchvision- and Keras-layout ResNets, timm-layout ViTs and a small CNN.

Every model is called as `logits, reps = model.apply(variables, x, train=False)` with x NHWC;
`reps` is an insertion-ordered dict of named representations ending in `pre_logits`. The
classifier is the top-level submodule `head`; everything else is the backbone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from repsim_jax.models.resnet import BasicBlock, Bottleneck, BottleneckV1, ResNet
from repsim_jax.models.small_cnn import SmallCNN
from repsim_jax.models.vit import ViT

_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "resnet18": (ResNet, dict(stage_sizes=(2, 2, 2, 2), block="basic")),
    "resnet50": (ResNet, dict(stage_sizes=(3, 4, 6, 3), block="bottleneck")),
    # Keras applications' ResNet50 (RadImageNet's release): v1 blocks, biased convs.
    "resnet50_keras": (ResNet, dict(stage_sizes=(3, 4, 6, 3), block="bottleneck_v1",
                                    conv_bias=True, bn_epsilon=1.001e-5)),
    "resnet_small": (ResNet, dict(stage_sizes=(1, 1, 1, 1), block="basic", width=16)),
    "vit_ti16": (ViT, dict(patch_size=16, width=192, depth=12, heads=3, mlp_dim=768)),
    "vit_s16": (ViT, dict(patch_size=16, width=384, depth=12, heads=6, mlp_dim=1536)),
    "vit_b16": (ViT, dict(patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072)),
    # DINOv2 (facebookresearch/dinov2 and timm's `vit_*_patch14[_reg4]_dinov2`), native 518 px.
    **{f"vit_{size}14{reg}_dinov2": (ViT, dict(patch_size=14, image_size=518, width=w, depth=d,
                                               heads=h, mlp_dim=4 * w, layer_scale=True,
                                               num_registers=4 if reg else 0,
                                               class_pos_embed=not reg))
       for size, w, d, h in (("s", 384, 12, 6), ("b", 768, 12, 12), ("l", 1024, 24, 16))
       for reg in ("", "_reg4")},
    "small_cnn": (SmallCNN, dict()),
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_model(name: str, num_classes: int, *, dtype: Any = jnp.float32, **kwargs) -> nn.Module:
  """Builds a registry model.

  Args:
    name: one of MODEL_NAMES.
    num_classes: head outputs; 0 builds no head (logits = pre_logits).
    dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32.
    **kwargs: module attributes overriding the registry defaults, e.g. `stage_sizes`, `block`,
      `width`, `stem`, `bn_axis_name`, `precision` (ResNet); `image_size`, `patch_size`,
      `depth`, `width`, `heads`, `mlp_dim` (ViT); `widths` (small_cnn).
  """
  if name not in _REGISTRY:
    raise ValueError(f"name: unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
    raise ValueError(f"num_classes: expected an int >= 0, got {num_classes!r}")
  cls, defaults = _REGISTRY[name]
  allowed = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "num_classes",
                                                         "dtype"}
  unknown = sorted(set(kwargs) - allowed)
  if unknown:
    raise ValueError(f"kwargs: {name} does not take {unknown[0]!r}; expected some of "
                     f"{sorted(allowed)}")
  cfg = {**defaults, **kwargs}
  for key in ("stage_sizes", "widths"):
    if key in cfg:
      cfg[key] = tuple(int(v) for v in cfg[key])  # hashable module attributes
  return cls(num_classes=num_classes, dtype=dtype, **cfg)


def replace_head(params: Mapping[str, Any], num_classes: int, rng: jax.Array, *,
                 feature_dim: int | None = None,
                 kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
                 ) -> dict[str, Any]:
  """Returns `params` with a freshly initialised `head` for a new task.

  Backbone leaves are the same arrays (bit-identical, not copied). The new head is
  nn.Dense(num_classes): kernel (feature_dim, num_classes) from `kernel_init`, zero bias.
  Build the matching model with `get_model(name, num_classes)`.

  Args:
    params: the model's `variables['params']`.
    num_classes: new number of outputs; 0 removes the head (feature extractor).
    rng: PRNG key for the kernel.
    feature_dim: input width of the head; inferred from the old head when omitted.
    kernel_init: initializer for the kernel (e.g. nn.initializers.zeros).
  """
  if not isinstance(params, Mapping):
    raise ValueError(f"params: expected a mapping of parameters, got {type(params).__name__}")
  if "params" in params:
    raise ValueError("params: got a variables dict (has a 'params' key); pass "
                     "variables['params']")
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
    raise ValueError(f"num_classes: expected an int >= 0, got {num_classes!r}")
  new = {k: v for k, v in params.items() if k != "head"}
  if num_classes == 0:
    return new
  if feature_dim is None:
    if "head" not in params:
      raise ValueError("feature_dim: params have no head to infer it from; pass feature_dim=")
    feature_dim = int(params["head"]["kernel"].shape[0])
  new["head"] = {
      "kernel": kernel_init(rng, (feature_dim, num_classes), jnp.float32),
      "bias": jnp.zeros((num_classes,), jnp.float32),
  }
  return new


__all__ = [
    "MODEL_NAMES", "get_model", "replace_head", "ResNet", "BasicBlock", "Bottleneck",
    "BottleneckV1", "ViT",
    "SmallCNN",
]
