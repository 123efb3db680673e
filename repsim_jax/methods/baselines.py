"""The baselines RepSim is compared with, in the same trainer (DESIGN §1)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import optax

from repsim_jax import parallel
from repsim_jax.methods.base import BACKBONE, LAMBDA, Method, check_layers, gather, lam_at, layer_weights, pool
from repsim_jax.optim import optimizers


class FullFineTuning(Method):
  name = "full_ft"


class LinearProbe(Method):
  """Only the head learns; the backbone (weights and BatchNorm statistics) stays bit-identical."""
  name = "linear_probe"
  summary = "only the head trains; backbone and BatchNorm statistics stay bit-identical"

  def optimizer(self, make_tx, params):
    return optimizers.freeze(make_tx(), params, BACKBONE)

  def bn_train(self, step):
    return False


class LPFT(Method):
  """LP-FT (Kumar et al. 2022): linear probing for `lp_steps`, then full fine-tuning.

  During the probe the backbone gets no updates, its optimiser state stays empty and BatchNorm
  runs in eval mode; the backbone's schedule starts at `lp_steps`.
  """
  name = "lp_ft"
  summary = "linear probe for lp_steps, then full fine-tuning"
  uses = ("lp_steps",)

  def optimizer(self, make_tx, params):
    rx = re.compile(BACKBONE)
    labels = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda p, _: "backbone" if rx.search(optimizers.path_str(p)) else "head", tree)
    return optax.multi_transform({"head": make_tx(),
                                  "backbone": optax.conditionally_mask(
                                      make_tx(offset=self.cfg.lp_steps),
                                      lambda count: count >= self.cfg.lp_steps)}, labels)

  def bn_train(self, step):
    return step >= self.cfg.lp_steps


def _split(tree):
  """(backbone leaves, head leaves) of the model params, as lists."""
  rx = re.compile(r"^(?!head/)")
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  back = [v for p, v in flat if rx.search(optimizers.path_str(p))]
  head = [v for p, v in flat if not rx.search(optimizers.path_str(p))]
  return back, head


class L2SP(Method):
  """½α‖w − w₀‖² on the backbone (w₀: pretrained) + ½β‖w‖² on the head (Li et al. 2018)."""
  name = "l2sp"
  summary = "½α‖w − w₀‖² on the backbone + ½β‖w‖² on the head"
  needs_reference = True
  uses = ("alpha", "beta")

  def loss(self, params, reps, ref_reps, ref_variables, step):
    back, head = _split(params["model"])
    back0, _ = _split(ref_variables["params"])
    sp = sum(jnp.sum((w - w0) ** 2) for w, w0 in zip(back, back0))
    l2 = sum(jnp.sum(w ** 2) for w in head)
    return 0.5 * self.cfg.alpha * sp + 0.5 * self.cfg.beta * l2, {"l2sp/distance": jnp.sqrt(sp)}


class DELTA(Method):
  """DELTA-style feature regularisation (Li et al. 2019): ‖FM − FM₀‖² on the chosen layers'
  feature maps (mean over examples and positions, summed over channels, unweighted channel
  attention) + ½β‖w‖² on the head."""
  name = "delta"
  summary = "feature-map distance to the pretrained model on `layers` + ½β‖w_head‖²"
  needs_reference = True
  reference_forward = True
  uses = (*LAMBDA, "layers", "layer_weights", "beta")

  def loss(self, params, reps, ref_reps, ref_variables, step):
    del ref_variables
    check_layers(self.cfg, reps)
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for layer, w in layer_weights(self.cfg).items():
      a, b = reps[layer].astype(jnp.float32), ref_reps[layer].astype(jnp.float32)
      d = jnp.sum((a - b) ** 2, axis=-1).mean()
      metrics[f"delta/{layer}"] = jax.lax.stop_gradient(d)
      total = total + w * d
    _, head = _split(params["model"])
    l2 = sum(jnp.sum(w ** 2) for w in head)
    return lam_at(self.cfg, step) * total + 0.5 * self.cfg.beta * l2, metrics


class BSS(Method):
  """Batch Spectral Shrinkage (Chen et al. 2019): η Σ_{i≤k} σ²_{-i}, the k smallest singular
  values of the (global) batch of `pre_logits` features."""
  name = "bss"
  summary = "shrinks the bss_k smallest singular values of the batch features"
  uses = (*LAMBDA, "bss_k")

  def loss(self, params, reps, ref_reps, ref_variables, step):
    f = gather(pool(reps["pre_logits"]))
    term, smallest = smallest_singular_energy(f, self.cfg.bss_k)
    return lam_at(self.cfg, step) * term, {"bss/smallest_sv": jax.lax.stop_gradient(smallest)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def smallest_singular_energy(f, k: int):
  """(Σ of the k smallest σᵢ² of f, the smallest σ). Its gradient is d Σσᵢ² = 2 Σ σᵢ uᵢ vᵢᵀ, the
  rule autodiff derives for the SVD, written out so the SVD runs one matrix at a time under vmap
  (population members): a batched LAPACK SVD on several XLA:CPU devices at once can deadlock in
  jaxlib's batch thread pool (see repsim._one_at_a_time). Only the first output has a gradient."""
  return _smallest_singular_fwd(f, k)[0]


def _smallest_singular_fwd(f, k):
  u, s, vt = jax.custom_batching.sequential_vmap(
      lambda a: jnp.linalg.svd(a, full_matrices=False))(f)  # descending
  u, s, vt = u[:, -k:], s[-k:], vt[-k:]
  return (jnp.sum(s ** 2), s[-1]), (u, s, vt)


def _smallest_singular_bwd(k, res, cts):
  del k
  u, s, vt = res
  return (2.0 * cts[0] * (u * s) @ vt,)


smallest_singular_energy.defvjp(_smallest_singular_fwd, _smallest_singular_bwd)


class SAM(Method):
  """SAM (Foret et al. 2021) and ASAM (`name='asam'`, Kwon et al. 2021) as gradient rules.

  The ascent direction uses the *global* batch gradient, so the step is the same on any number of
  devices: ε = ρ g/‖g‖ (SAM) or ε = ρ T²g/‖T g‖ with T = |w| + η (ASAM), then the gradient at
  w + ε. Only model parameters are perturbed, and only their gradient sets the ball (a method's
  own parameters, such as RepSim's Q, are not part of the network being flattened).
  """
  name = "sam"
  summary = "sharpness-aware gradients (ascent step on the global batch; asam: adaptive)"

  def __init__(self, cfg):
    super().__init__(cfg)
    self.uses = ("rho", "eta") if cfg.name == "asam" else ("rho",)

  def gradients(self, grad_fn, params):
    g, aux = grad_fn(params)  # BatchNorm statistics and metrics come from the unperturbed pass.
    g = parallel.pmean(g)["model"]
    w = params["model"]
    rho, eta = self.cfg.rho, self.cfg.eta
    if self.cfg.name == "asam":
      t = jax.tree.map(lambda x: jnp.abs(x) + eta, w)
      tg = jax.tree.map(jnp.multiply, t, g)
      eps = optax.tree.scale(rho / (optax.tree.norm(tg) + 1e-12), jax.tree.map(jnp.multiply, t, tg))
    else:
      eps = optax.tree.scale(rho / (optax.tree.norm(g) + 1e-12), g)
    perturbed = {**params, "model": optax.tree.add(w, eps)}
    grads, _ = grad_fn(perturbed)
    return parallel.pmean(grads), aux
