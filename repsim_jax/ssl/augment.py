"""On-device views for self-supervised pretraining (DESIGN §8).

Every op works on one image (H, W, C) in [0, 1] with its own PRNG key and is vmapped over the
batch by `make_views`, inside the jitted step. An example's key is `fold_in(step_key, i)` with
`i` its position in the *global* batch, so its views are the same on 1 or 8 devices and after a
resumption. Grayscale inputs (C = 1, or C = 3 with equal channels) pass the colour ops unchanged
where colour is needed (saturation, hue, grayscale). The host pipeline only decodes and batches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One view's recipe; probabilities are per example."""
  size: int                                  # output side (pixels)
  scale: tuple[float, float] = (0.08, 1.0)   # random resized crop: area fraction
  ratio: tuple[float, float] = (3 / 4, 4 / 3)  # and aspect ratio (w / h), log-uniform
  flip: float = 0.5
  jitter: float = 0.8                        # colour jitter (all four below) with this p
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  gray: float = 0.2
  blur: float = 0.0                          # Gaussian blur p; sigma ~ U(blur_sigma), kernel 10% of side
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  solarize: float = 0.0
  solarize_threshold: float = 0.5


# -- the ops (one image) ------------------------------------------------------------------------
def crop_box(key, height: int, width: int, scale, ratio):
  """(y0, x0, h, w) in pixels of a random resized crop: area fraction ~ U(scale), aspect
  ratio log-uniform in `ratio`, sides clipped to the image, position uniform."""
  ka, kr, ky, kx = jax.random.split(key, 4)
  area = jax.random.uniform(ka, minval=scale[0], maxval=scale[1])
  r = jnp.exp(jax.random.uniform(kr, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  w = jnp.minimum(jnp.sqrt(area * r), 1.0) * width
  h = jnp.minimum(jnp.sqrt(area / r), 1.0) * height
  y0 = jax.random.uniform(ky) * (height - h)
  x0 = jax.random.uniform(kx) * (width - w)
  return y0, x0, h, w


def resized_crop(image, box, size: int):
  """The box of `image` resampled to (size, size) (bilinear, antialiased when shrinking)."""
  y0, x0, h, w = box
  sy, sx = size / h, size / w
  return jax.image.scale_and_translate(
      image, (size, size, image.shape[-1]), (0, 1), jnp.stack([sy, sx]),
      jnp.stack([-y0 * sy, -x0 * sx]), method="linear", antialias=True)


def flip(image):
  return image[:, ::-1]


def grayscale(image):
  if image.shape[-1] == 1:
    return image
  g = image @ jnp.asarray(_LUMA, image.dtype)
  return jnp.broadcast_to(g[..., None], image.shape)


def rgb_to_hsv(rgb):
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc, minc = rgb.max(-1), rgb.min(-1)
  delta = maxc - minc
  s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  safe = jnp.where(delta > 0, delta, 1.0)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return jnp.stack([h, s, maxc], -1)


def hsv_to_rgb(hsv):
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = i.astype(jnp.int32) % 6
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  pick = lambda *c: jnp.choose(i, c, mode="clip")  # noqa: E731
  return jnp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], -1)


def adjust_hue(image, delta):
  if image.shape[-1] == 1:
    return image
  hsv = rgb_to_hsv(image)
  return hsv_to_rgb(hsv.at[..., 0].set((hsv[..., 0] + delta) % 1.0))


def color_jitter(key, image, brightness, contrast, saturation, hue):
  """torchvision's ColorJitter factors, applied in that order (each result clipped to [0, 1])."""
  kb, kc, ks, kh = jax.random.split(key, 4)
  factor = lambda k, a: jax.random.uniform(k, minval=1 - a, maxval=1 + a)  # noqa: E731
  x = jnp.clip(image * factor(kb, brightness), 0, 1)
  m = jnp.mean(grayscale(x)[..., 0])
  x = jnp.clip((x - m) * factor(kc, contrast) + m, 0, 1)
  g = grayscale(x)
  x = jnp.clip(g + (x - g) * factor(ks, saturation), 0, 1)
  return jnp.clip(adjust_hue(x, jax.random.uniform(kh, minval=-hue, maxval=hue)), 0, 1)


def _blur_taps(size: int) -> np.ndarray:
  """(2R + 1, size, size) one-hot matrices of each tap offset, reflect-padded (R: 5% of side)."""
  radius = max(1, int(size * 0.1) // 2)
  idx = np.arange(size)[None, :] + np.arange(-radius, radius + 1)[:, None]
  idx = np.abs(idx)
  idx = np.where(idx > size - 1, 2 * (size - 1) - idx, idx)
  return np.eye(size, dtype=np.float32)[idx]


def gaussian_blur(image, sigma):
  """Separable Gaussian blur with standard deviation `sigma` pixels (kernel 10% of the side)."""
  taps = _blur_taps(image.shape[0]), _blur_taps(image.shape[1])

  def matrix(t):
    r = (t.shape[0] - 1) // 2
    d = jnp.arange(-r, r + 1, dtype=jnp.float32)
    w = jnp.exp(-0.5 * (d / sigma) ** 2)
    return jnp.einsum("d,dij->ij", w / w.sum(), t)

  return jnp.einsum("ij,jkc,lk->ilc", matrix(taps[0]), image, matrix(taps[1]))


def solarize(image, threshold: float = 0.5):
  return jnp.where(image > threshold, 1.0 - image, image)


# -- a view, and the views of a batch ----------------------------------------------------------
def random_view(key, image, spec: ViewSpec):
  """One augmented view of one image: crop, flip, jitter, grayscale, blur, solarise."""
  kc, kf, kj, kj2, kg, kb, kb2, ks = jax.random.split(key, 8)
  coin = lambda k, p: jax.random.uniform(k) < p  # noqa: E731
  x = resized_crop(image.astype(jnp.float32), crop_box(kc, *image.shape[:2], spec.scale,
                                                       spec.ratio), spec.size)
  x = jnp.clip(x, 0.0, 1.0)
  x = jnp.where(coin(kf, spec.flip), flip(x), x)
  if spec.jitter:
    jittered = color_jitter(kj2, x, spec.brightness, spec.contrast, spec.saturation, spec.hue)
    x = jnp.where(coin(kj, spec.jitter), jittered, x)
  if spec.gray:
    x = jnp.where(coin(kg, spec.gray), grayscale(x), x)
  if spec.blur:
    sigma = jax.random.uniform(kb2, minval=spec.blur_sigma[0], maxval=spec.blur_sigma[1])
    x = jnp.where(coin(kb, spec.blur), gaussian_blur(x, sigma), x)
  if spec.solarize:
    x = jnp.where(coin(ks, spec.solarize), solarize(x, spec.solarize_threshold), x)
  return x


def example_keys(key, n: int, offset=0):
  """The per-example keys of n examples at global positions offset .. offset + n - 1."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(offset + jnp.arange(n))


def make_views(key, images, specs: Sequence[ViewSpec], offset=0):
  """One (n, size, size, C) array in [0, 1] per spec: view v of example i is made with
  `fold_in(fold_in(key, offset + i), v)`."""
  keys = example_keys(key, images.shape[0], offset)
  return [jax.vmap(lambda k, x, v=v, s=s: random_view(jax.random.fold_in(k, v), x, s))(keys, images)
          for v, s in enumerate(specs)]
