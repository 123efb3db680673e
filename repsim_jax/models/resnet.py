"""ResNet in the torchvision layout (BasicBlock / Bottleneck v1.5), Flax linen.

Module names mirror torchvision's state-dict keys (`conv1`, `bn1`, `layer1_0/conv1`,
`layer1_0/downsample_conv`, ...; the classifier is `head` instead of `fc`), so that
`repsim_jax.models.convert` is a pure renaming + transposition and parameter paths read well
when flattened with '/' (e.g. `layer3_1/bn2/scale`). Keras' ResNet-50 (v1: stride in the first
1x1 conv, biased convs, BatchNorm epsilon 1.001e-5; RadImageNet's layout) is the same module
with `block="bottleneck_v1"`, `conv_bias=True`, `bn_epsilon=1.001e-5`.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from repsim_jax import cpu

ModuleDef = Callable[..., nn.Module]

# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # torchvision pads symmetrically by k // 2; 'SAME' would pad (0, 1) for stride-2 convs
  # on even inputs and so disagree with pretrained weights.
  return ((k // 2, k // 2), (k // 2, k // 2))


class BasicBlock(nn.Module):
  """Two 3x3 convs; stride on the first. (N, H, W, C) -> (N, H/s, W/s, planes)."""

  planes: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x):
    out_ch = self.planes * self.expansion
    y = self.conv(self.planes, (3, 3), (self.strides, self.strides), padding=_pad(3),
                  name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(out_ch, (3, 3), padding=_pad(3), name="conv2")(y)
    y = self.norm(name="bn2")(y)
    residual = x
    if self.strides != 1 or x.shape[-1] != out_ch:
      residual = self.conv(out_ch, (1, 1), (self.strides, self.strides), padding="VALID",
                           name="downsample_conv")(x)
      residual = self.norm(name="downsample_bn")(residual)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride here: torchvision's v1.5) -> 1x1 (x4 channels)."""

  planes: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  expansion: ClassVar[int] = 4
  stride_in_1x1: ClassVar[bool] = False

  @nn.compact
  def __call__(self, x):
    out_ch = self.planes * self.expansion
    s1, s3 = ((self.strides, 1) if self.stride_in_1x1 else (1, self.strides))
    y = self.conv(self.planes, (1, 1), (s1, s1), padding="VALID", name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.planes, (3, 3), (s3, s3), padding=_pad(3), name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(out_ch, (1, 1), padding="VALID", name="conv3")(y)
    y = self.norm(name="bn3")(y)
    residual = x
    if self.strides != 1 or x.shape[-1] != out_ch:
      residual = self.conv(out_ch, (1, 1), (self.strides, self.strides), padding="VALID",
                           name="downsample_conv")(x)
      residual = self.norm(name="downsample_bn")(residual)
    return nn.relu(y + residual)


class BottleneckV1(Bottleneck):
  """The original ResNet v1 bottleneck (Keras' ResNet-50): the stride is on the first 1x1."""

  stride_in_1x1: ClassVar[bool] = True


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck, "bottleneck_v1": BottleneckV1}


class ResNet(nn.Module):
  """Generic torchvision-style ResNet.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for resnet18, (3, 4, 6, 3) for resnet50.
    block: "basic", "bottleneck" (v1.5) or "bottleneck_v1" (or a block class with an
      `expansion` ClassVar).
    num_classes: classifier outputs; 0 = no head (logits are the pooled features).
    width: channels of the stem and first stage; stage i has width * 2**i planes.
    stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool, torchvision) or "cifar" (3x3/1 conv, no
      pool; for 28-32 px inputs). Pretrained torchvision weights need "imagenet".
    dtype: computation dtype; parameters stay float32.
    bn_axis_name: axis name for synchronised BatchNorm statistics under shard_map/pmap/vmap.
    precision: matmul/conv precision (e.g. jax.lax.Precision.HIGHEST).
    conv_bias: convolutions with biases (Keras' ResNet-50); torchvision's have none.
    bn_epsilon: BatchNorm epsilon (torchvision 1e-5, Keras 1.001e-5).

  Call: `logits, reps = model.apply(variables, x, train=False)` with x (N, H, W, C).
  reps: `stem` (after the max-pool), `layer1`.. (stage outputs, NHWC, computation dtype),
  `pre_logits` (N, C_last) global-average-pooled, float32. logits (N, num_classes) float32.
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: Any = "basic"
  num_classes: int = 1000
  width: int = 64
  stem: str = "imagenet"
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  precision: Any = None
  conv_bias: bool = False
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim != 4:
      raise ValueError(f"x: expected NHWC images of rank 4, got shape {x.shape}")
    block_cls = BLOCKS.get(self.block, self.block) if isinstance(self.block, str) else self.block
    if isinstance(block_cls, str):
      raise ValueError(f"block: expected one of {sorted(BLOCKS)}, got {self.block!r}")
    if self.stem not in ("imagenet", "cifar"):
      raise ValueError(f"stem: expected 'imagenet' or 'cifar', got {self.stem!r}")

    conv = functools.partial(nn.Conv, use_bias=self.conv_bias, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=_conv_init,
                             precision=self.precision,
                             conv_general_dilated=cpu.conv_general_dilated)
    # momentum 0.9 = torchvision's BatchNorm2d(momentum=0.1).
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=jnp.float32,
                             axis_name=self.bn_axis_name)
    # OrderedDict: jax keeps its key order through jit (plain dicts come back sorted).
    reps = collections.OrderedDict()
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = conv(self.width, (7, 7), (2, 2), padding=_pad(7), name="conv1")(x)
      x = nn.relu(norm(name="bn1")(x))
      # = nn.max_pool (-inf padding, like torch's MaxPool2d(3, 2, padding=1)) without its
      # costly reduce-window gradient on CPU; see cpu/pooling.py.
      x = cpu.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    else:
      x = conv(self.width, (3, 3), padding=_pad(3), name="conv1")(x)
      x = nn.relu(norm(name="bn1")(x))
    reps["stem"] = x

    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(planes=self.width * 2**i, conv=conv, norm=norm, strides=strides,
                      name=f"layer{i + 1}_{j}")(x)
      reps[f"layer{i + 1}"] = x

    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    reps["pre_logits"] = pooled
    if self.num_classes:
      logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                        precision=self.precision, name="head")(pooled)
      logits = logits.astype(jnp.float32)
    else:
      logits = pooled
    return logits, reps
