"""A small conv net with BatchNorm, for tests and quick CPU runs."""

from __future__ import annotations

import collections
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


class ConvBlock(nn.Module):
  """3x3 conv (no bias) -> BatchNorm -> ReLU -> 2x2 max-pool. (N, H, W, C) -> (N, H/2, W/2, F)."""

  features: int
  train: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype, param_dtype=jnp.float32, axis_name=self.bn_axis_name,
                     name="bn")(x)
    return nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))


class SmallCNN(nn.Module):
  """`len(widths)` ConvBlocks, global average pool, Dense head.

  Call: `logits, reps = model.apply(variables, x, train=False)` with x (N, H, W, C),
  H, W >= 2**len(widths). reps: `block1`.. (NHWC, computation dtype), `pre_logits`
  (N, widths[-1]) float32. num_classes=0: no head, logits = pre_logits.
  """

  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  precision: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim != 4:
      raise ValueError(f"x: expected NHWC images of rank 4, got shape {x.shape}")
    if min(x.shape[1:3]) < 2 ** len(self.widths):
      raise ValueError(f"x: spatial size {x.shape[1:3]} too small for {len(self.widths)} "
                       f"2x2 poolings (need >= {2 ** len(self.widths)})")
    # OrderedDict: jax keeps its key order through jit (plain dicts come back sorted).
    reps = collections.OrderedDict()
    x = x.astype(self.dtype)
    for i, f in enumerate(self.widths):
      x = ConvBlock(f, train, self.dtype, self.bn_axis_name, self.precision,
                    name=f"block{i + 1}")(x)
      reps[f"block{i + 1}"] = x
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    reps["pre_logits"] = pooled
    if self.num_classes:
      logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                        precision=self.precision, name="head")(pooled).astype(jnp.float32)
    else:
      logits = pooled
    return logits, reps
