"""Vision Transformer in the timm layout (cls token, pre-norm blocks, head on CLS), Flax linen.

Module names mirror timm's state-dict keys (`patch_embed`, `cls_token`, `reg_token`,
`pos_embed`, `blocks_3/attn/qkv`, `blocks_3/ls1/gamma`, `blocks_3/mlp/fc1`, `norm`, `head`), so
conversion is a renaming + transposition. Drop rates are 0, so no dropout rng is needed.
DINOv2's variant (register tokens, LayerScale, position embeddings over patches only) is the
same module with `num_registers`, `layer_scale` and `class_pos_embed=False`. An input of another
size than `image_size` gets its position embeddings resampled the way timm does it
(`dynamic_img_size`: bicubic, antialiased, PyTorch's kernel), so a checkpoint runs at any
multiple of its patch size.
"""

from __future__ import annotations

import collections
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


class LayerScale(nn.Module):
  """Per-channel residual scale (CaiT / DINOv2): x * gamma."""

  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],),
                       jnp.float32)
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) (each branch
  scaled by a LayerScale when `layer_scale`)."""

  heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  precision: Any = None
  layer_norm_eps: float = 1e-6
  layer_scale: bool = False

  @nn.compact
  def __call__(self, x):
    ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                   param_dtype=jnp.float32, name=name)
    scale = (lambda name, y: LayerScale(name=name)(y)) if self.layer_scale else (lambda _, y: y)
    x = x + scale("ls1", Attention(self.heads, self.dtype, self.precision, name="attn")(
        ln("norm1")(x)))
    x = x + scale("ls2", Mlp(self.mlp_dim, self.dtype, self.precision, name="mlp")(
        ln("norm2")(x)))
    return x


def _cubic(x, a: float):
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def resize_matrix(in_size: int, out_size: int, a: float = -0.5) -> np.ndarray:
  """(out, in) weights of PyTorch's `interpolate(mode="bicubic", align_corners=False,
  antialias=True)` along one axis: the cubic kernel (its antialiasing path uses a = -0.5, as
  PIL) stretched by the scale when shrinking, taps outside the input dropped, rows normalised."""
  scale = in_size / out_size
  support = 2.0 * max(scale, 1.0)
  inv = 1.0 / max(scale, 1.0)
  w = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    taps = _cubic((np.arange(lo, hi) - center + 0.5) * inv, a)
    w[i, lo:hi] = taps / taps.sum()
  return w.astype(np.float32)


def resample_pos_embed(pos, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       num_prefix: int):
  """(1, num_prefix + old h*w, D) position embeddings resampled to the new patch grid (the
  prefix rows, class / register tokens, unchanged), as timm's `resample_abs_pos_embed`."""
  if tuple(old_grid) == tuple(new_grid):
    return pos
  prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
  grid = grid.reshape(old_grid[0], old_grid[1], -1).astype(jnp.float32)
  mh = jnp.asarray(resize_matrix(old_grid[0], new_grid[0]))
  mw = jnp.asarray(resize_matrix(old_grid[1], new_grid[1]))
  grid = jnp.einsum("ih,hwd,jw->ijd", mh, grid, mw, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([prefix, grid.reshape(1, -1, pos.shape[-1]).astype(pos.dtype)], axis=1)


class ViT(nn.Module):
  """timm-style ViT classifier.

  Attributes:
    num_classes: head outputs; 0 = no head (logits are the CLS features).
    image_size: the side pos_embed is laid out for ((image_size // patch_size)**2 rows, plus the
      class and register rows when `class_pos_embed`); other inputs whose sides are multiples of
      patch_size get it resampled (`resample_pos_embed`).
    num_registers: register tokens after the class token (DINOv2 with registers).
    layer_scale: LayerScale on both residual branches (DINOv2).
    class_pos_embed: the class (and register) tokens have position embeddings too (classic
      ViT); False: only the patches do (timm's `no_embed_class`, DINOv2 with registers).
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
  num_registers: int = 0
  layer_scale: bool = False
  class_pos_embed: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm, no dropout
    p = self.patch_size
    if self.image_size % p:
      raise ValueError(f"patch_size: {p} does not divide image_size {self.image_size}")
    if x.ndim != 4 or x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"x: expected (N, H, W, C) images with H and W multiples of the patch "
                       f"size {p}, got shape {x.shape}")
    n = x.shape[0]
    grid = self.image_size // p
    new_grid = (x.shape[1] // p, x.shape[2] // p)
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, precision=self.precision,
                name="patch_embed")(x.astype(self.dtype))
    x = x.reshape(n, new_grid[0] * new_grid[1], self.width)
    prefix = [self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width),
                         jnp.float32)]
    if self.num_registers:
      prefix.append(self.param("reg_token", nn.initializers.normal(1e-6),
                               (1, self.num_registers, self.width), jnp.float32))
    num_prefix = (1 + self.num_registers) if self.class_pos_embed else 0
    pos = self.param("pos_embed", _dense_init, (1, grid * grid + num_prefix, self.width),
                     jnp.float32)
    pos = resample_pos_embed(pos, (grid, grid), new_grid, num_prefix).astype(self.dtype)
    prefix = jnp.concatenate([jnp.broadcast_to(t, (n,) + t.shape[1:]) for t in prefix],
                             axis=1).astype(self.dtype)
    if self.class_pos_embed:
      x = jnp.concatenate([prefix, x], axis=1) + pos
    else:
      x = jnp.concatenate([prefix, x + pos], axis=1)

    # OrderedDict: jax keeps its key order through jit (plain dicts come back sorted).
    reps = collections.OrderedDict()
    mlp_dim = self.mlp_dim or 4 * self.width
    for i in range(self.depth):
      x = Block(self.heads, mlp_dim, self.dtype, self.precision, self.layer_norm_eps,
                self.layer_scale, name=f"blocks_{i}")(x)
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
