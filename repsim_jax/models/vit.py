"""Vision Transformer in the timm layout (cls token, pre-norm blocks, head on CLS), Flax linen.

Module names mirror timm's state-dict keys (`patch_embed`, `cls_token`, `pos_embed`,
`blocks_3/attn/qkv`, `blocks_3/mlp/fc1`, `norm`, `head`), so conversion is a renaming +
transposition. Drop rates are 0, so no dropout rng is needed.
"""

from __future__ import annotations

import collections
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_dense_init = nn.initializers.truncated_normal(0.02)  # timm's trunc_normal_(std=.02)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection. (N, T, D) -> (N, T, D)."""

  heads: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    n, t, d = x.shape
    if d % self.heads:
      raise ValueError(f"heads: width {d} is not divisible by heads={self.heads}")
    dh = d // self.heads
    dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=jnp.float32,
                                     precision=self.precision, kernel_init=_dense_init,
                                     name=name)
    # timm's qkv output is laid out (3, heads, head_dim) along the feature axis.
    qkv = dense(3 * d, "qkv")(x).reshape(n, t, 3, self.heads, dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("nqhd,nkhd->nhqk", q * dh**-0.5, k, precision=self.precision)
    # Softmax in float32 even when computing in bf16.
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", attn, v, precision=self.precision).reshape(n, t, d)
    return dense(d, "proj")(out)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2. (N, T, D) -> (N, T, D)."""

  hidden: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=jnp.float32,
                                     precision=self.precision, kernel_init=_dense_init,
                                     name=name)
    x = nn.gelu(dense(self.hidden, "fc1")(x), approximate=False)  # torch nn.GELU() is exact
    return dense(d, "fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  precision: Any = None
  layer_norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                   param_dtype=jnp.float32, name=name)
    x = x + Attention(self.heads, self.dtype, self.precision, name="attn")(ln("norm1")(x))
    x = x + Mlp(self.mlp_dim, self.dtype, self.precision, name="mlp")(ln("norm2")(x))
    return x


class ViT(nn.Module):
  """timm-style ViT classifier.

  Attributes:
    num_classes: head outputs; 0 = no head (logits are the CLS features).
    image_size: input side; pos_embed has (image_size // patch_size)**2 + 1 rows, so inputs
      must be exactly (N, image_size, image_size, C).
    patch_size, depth, width, heads: the usual; mlp_dim defaults to 4 * width.
    dtype: computation dtype; parameters, LayerNorm statistics and softmax stay float32.
    bn_axis_name: accepted for interface parity with the CNNs and ignored (no BatchNorm).
    precision: matmul precision (e.g. jax.lax.Precision.HIGHEST).

  Call: `logits, reps = model.apply(variables, x, train=False)`; `train` has no effect.
  reps: `block0`..`block{depth-1}` token outputs (N, T, D) incl. CLS (computation dtype),
  `pre_logits` (N, D) = CLS token after the final norm, float32.
  """

  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  depth: int = 12
  width: int = 768
  heads: int = 12
  mlp_dim: int | None = None
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  precision: Any = None
  layer_norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm, no dropout
    if x.ndim != 4 or x.shape[1] != self.image_size or x.shape[2] != self.image_size:
      raise ValueError(f"x: expected (N, {self.image_size}, {self.image_size}, C) images, got "
                       f"shape {x.shape} (build the ViT with image_size=... to change)")
    if self.image_size % self.patch_size:
      raise ValueError(f"patch_size: {self.patch_size} does not divide image_size "
                       f"{self.image_size}")
    n = x.shape[0]
    grid = self.image_size // self.patch_size
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, precision=self.precision,
                name="patch_embed")(x.astype(self.dtype))
    x = x.reshape(n, grid * grid, self.width)
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width), jnp.float32)
    pos = self.param("pos_embed", _dense_init, (1, grid * grid + 1, self.width), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)).astype(self.dtype), x],
                        axis=1)
    x = x + pos.astype(self.dtype)

    # OrderedDict: jax keeps its key order through jit (plain dicts come back sorted).
    reps = collections.OrderedDict()
    mlp_dim = self.mlp_dim or 4 * self.width
    for i in range(self.depth):
      x = Block(self.heads, mlp_dim, self.dtype, self.precision, self.layer_norm_eps,
                name=f"blocks_{i}")(x)
      reps[f"block{i}"] = x
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                     name="norm")(x)
    pre_logits = x[:, 0].astype(jnp.float32)
    reps["pre_logits"] = pre_logits
    if self.num_classes:
      logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                        precision=self.precision, kernel_init=_dense_init,
                        name="head")(pre_logits).astype(jnp.float32)
    else:
      logits = pre_logits
    return logits, reps
