"""Seconds per transferability score at n=10,000, d=2048, C=10 on this CPU.

    python benchmarks/transferability_scores.py [--n 10000] [--d 2048] [--classes 10]

Features are float32 (as a network emits them): a 256-d latent with a power-law spectrum,
class-dependent means, mapped to d dimensions, plus isotropic noise. LEEP/NCE use a 1000-way
source classifier's softmax / argmax. LP runs the documented tractable NCA (PCA to 256 d,
minibatch 1024, 200 Adam steps) + exact 5-NN; FU runs a small flax CNN on 32x32 images.
JAX kernels are compiled on a small input first, so the figures are steady-state times.
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repsim_jax import transferability as T


def make_features(n, d, c, seed=0):
  rng = np.random.default_rng(seed)
  y = np.concatenate([np.arange(c), rng.integers(0, c, n - c)])
  latent_dim = 256
  scales = (1.0 + np.arange(latent_dim)) ** -0.7
  means = rng.standard_normal((c, latent_dim)) * scales * 0.4
  latent = means[y] + rng.standard_normal((n, latent_dim)) * scales
  mix = rng.standard_normal((latent_dim, d)) / np.sqrt(latent_dim)
  f = latent @ mix + 0.05 * rng.standard_normal((n, d))
  return np.maximum(f, 0).astype(np.float32), y  # ReLU-like, non-negative as pooled features


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2, name="layer1_conv")(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2, name="layer2_conv")(x))
    pre = x.mean(axis=(1, 2))
    return nn.Dense(10, name="head")(pre), {"pre_logits": pre}


def timeit(fn):
  """(wall seconds, process CPU seconds, result). CPU time helps read runs on a busy machine."""
  t, c = time.perf_counter(), time.process_time()
  out = fn()
  return time.perf_counter() - t, time.process_time() - c, out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=10_000)
  ap.add_argument("--d", type=int, default=2048)
  ap.add_argument("--classes", type=int, default=10)
  ap.add_argument("--fu-images", type=int, default=512)
  args = ap.parse_args()
  n, d, c = args.n, args.d, args.classes

  f, y = make_features(n, d, c)
  rng = np.random.default_rng(1)
  src_logits = (f[:, :64] @ rng.standard_normal((64, 1000)).astype(np.float32)) * 0.1
  probs = np.exp(src_logits - src_logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)

  # Compile the JAX kernels on small inputs first.
  fs, ys = make_features(300, 64, c, seed=2)
  T.leep(probs[:300], ys)
  T.lp_score(fs, ys, steps=2)

  print(f"transferability scores: n={n} d={d} C={c} features float32, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  results = {}
  for name, fn in [
      ("logme", lambda: T.logme(f, y)),
      ("leep (Z=1000)", lambda: T.leep(probs, y)),
      ("nce (Z=1000)", lambda: T.nce(probs.argmax(1), y)),
      ("nleep (diag GMM)", lambda: T.nleep(f, y, seed=0)),
      ("h_score", lambda: T.h_score(f, y)),
      ("regularized_h_score", lambda: T.regularized_h_score(f, y)),
      ("gbc (spherical, PCA 64)", lambda: T.gbc(f, y)),
      ("transrate", lambda: T.transrate(f, y)),
      ("lp (PCA256 + minibatch NCA + 5-NN)", lambda: T.lp_score(f, y, seed=0)),
  ]:
    secs, cpu, val = timeit(fn)
    results[name] = (secs, val)
    print(f"  {name:<36s} {secs:8.2f} s  (cpu {cpu:6.2f} s)   value {val:.6g}", flush=True)

  model = SmallCNN()
  images = rng.standard_normal((args.fu_images, 32, 32, 3)).astype(np.float32)
  img_labels = np.concatenate([np.arange(c), rng.integers(0, c, args.fu_images - c)])
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(images[:1]))
  apply_fn = jax.jit(model.apply)
  kw = dict(early_layer="layer1_conv", first_layer="conv1", batch_size=64)
  T.fu_score(apply_fn, params, images[:64], img_labels[:64], **kw)  # compile
  secs, cpu, val = timeit(lambda: T.fu_score(apply_fn, params, images, img_labels, **kw))
  print(f"  {'fu (3-conv CNN, %d imgs 32x32, B=64)' % args.fu_images:<36s} {secs:8.2f} s  (cpu {cpu:6.2f} s)"
        f"   value {val:.6g}")
  logme_s = results["logme"][0]
  print(f"LogME target <= 2 s: {'met' if logme_s <= 2.0 else 'NOT met'} ({logme_s:.2f} s)")


if __name__ == "__main__":
  main()
