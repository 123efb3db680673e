"""SSL objectives: what the trainer's SSL step computes for `config.objective` (DESIGN §8).

An objective owns the heads on the backbone, the views it needs and the state beside the
parameters (the EMA target / teacher network, DINO's centre, the heads' BatchNorm statistics).
Its `loss` runs inside the per-device jitted step, where `parallel.AXIS` is bound; `update_state`
runs after the optimiser step (the EMA sees the new online weights, as in BYOL and DINO).
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import numpy as np

from repsim_jax import parallel
from repsim_jax.ssl import augment, heads as heads_lib, losses

AXIS = parallel.AXIS


def momentum_at(base: float, step, num_steps: int):
  """The EMA momentum at `step`: from `base` at 0 to 1 at `num_steps` on a cosine (BYOL, DINO)."""
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / max(num_steps, 1), 1.0)
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0


def ema(target, online, momentum):
  """m * target + (1 - m) * online, leaf by leaf."""
  return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o, target, online)


def _apply(module, params, stats, x, *args):
  """Train-mode forward; returns (output, new BatchNorm statistics or `stats` when it has none)."""
  variables = {"params": params, **({"batch_stats": stats} if stats else {})}
  out, new = module.apply(variables, x, *args, train=True, mutable=["batch_stats"])
  return out, new.get("batch_stats", stats)


def _features(model, params, stats, x):
  (_, reps), stats = _apply(model, params, stats, x)
  return reps["pre_logits"].astype(jnp.float32), stats


def _spec(cfg, size: int, **kw) -> augment.ViewSpec:
  """A view at `size` with the colour jitter scaled by `config.ssl.color_strength` (SimCLR's s,
  relative to DESIGN §8's amplitudes)."""
  d, st = augment.ViewSpec(size), cfg.color_strength
  return augment.ViewSpec(size, brightness=d.brightness * st, contrast=d.contrast * st,
                          saturation=d.saturation * st, hue=min(0.5, d.hue * st), **kw)


class Objective(abc.ABC):
  """The interface; `supervised` is the trainer's own step and has no objective object.
  Subclasses give `view_specs`, `heads` and `loss`, and `init_state` / `update_state` when
  they keep more than the heads' BatchNorm statistics."""
  name = ""

  def __init__(self, cfg, image_size: int, num_steps: int, multiple: int = 1):
    self.cfg, self.image_size, self.num_steps = cfg, image_size, num_steps
    self.multiple = multiple  # crop sides must be multiples of this (a ViT's patch)

  @abc.abstractmethod
  def view_specs(self) -> list[augment.ViewSpec]:
    """The views of every example, global ones first."""

  @abc.abstractmethod
  def heads(self) -> dict:
    """{name: flax module} on the backbone's pre_logits (BYOL's predictor on the projector)."""

  @abc.abstractmethod
  def loss(self, model, params, model_stats, state, views, step):
    """(loss, aux) inside the per-device step; aux holds the new BatchNorm statistics."""

  def init(self, rng, model_variables: dict, feature_dim: int):
    """(head parameters, objective state) for a backbone with these variables."""
    params, stats = {}, {}
    for (name, head), key in zip(self.heads().items(), jax.random.split(rng, len(self.heads()))):
      dim = feature_dim if name != "predictor" else self.heads()["projector"].features[-1]
      v = jax.jit(lambda k, head=head, dim=dim: head.init(k, jnp.zeros((2, dim)),
                                                          train=False))(key)
      params[name] = jax.tree.map(np.asarray, v["params"])
      if "batch_stats" in v:
        stats[name] = jax.tree.map(np.asarray, v["batch_stats"])
    return params, self.init_state(model_variables, params, stats)

  def init_state(self, model_variables, head_params, head_stats) -> dict:
    return {"head_stats": head_stats}

  def update_state(self, state, params, aux, step) -> dict:
    del params, step
    return {**state, "head_stats": aux["head_stats"]}


class SimCLR(Objective):
  """NT-Xent between two views, negatives from the global batch; projection MLP."""
  name = "simclr"

  def view_specs(self):
    s = _spec(self.cfg, self.image_size, scale=tuple(self.cfg.crop_scale),
                         blur=0.5 if self.cfg.blur else 0.0)
    return [s, s]

  def heads(self):
    dims = (self.cfg.hidden_dim or 2048, self.cfg.proj_dim or 128)
    return {"projector": heads_lib.MLP(dims, bn_axis_name=AXIS)}

  def loss(self, model, params, model_stats, state, views, step):
    del step
    n = views[0].shape[0]
    f, model_stats = _features(model, params["model"], model_stats, jnp.concatenate(views))
    z, proj_stats = _apply(self.heads()["projector"], params["ssl"]["projector"],
                           state["head_stats"]["projector"], f)
    gather = lambda x: jax.lax.all_gather(x, AXIS, tiled=True)  # noqa: E731
    loss = losses.nt_xent(gather(z[:n]), gather(z[n:]), self.cfg.temperature)
    return loss, {"model_stats": model_stats, "head_stats": {"projector": proj_stats},
                  "metrics": {}}


class BYOL(Objective):
  """Online (backbone + projector + predictor) regresses the EMA target's projection of the
  other view; symmetrised over the two views."""
  name = "byol"

  def view_specs(self):
    common = dict(scale=tuple(self.cfg.crop_scale))
    blur = 1.0 if self.cfg.blur else 0.0
    return [_spec(self.cfg, self.image_size, blur=blur, solarize=0.0, **common),
            _spec(self.cfg, self.image_size, blur=0.1 * blur, solarize=0.2, **common)]

  def heads(self):
    dims = (self.cfg.hidden_dim or 4096, self.cfg.proj_dim or 256)
    return {"projector": heads_lib.MLP(dims, bn_axis_name=AXIS),
            "predictor": heads_lib.MLP(dims, bn_axis_name=AXIS)}

  def init_state(self, model_variables, head_params, head_stats):
    return {"head_stats": head_stats,
            "target": {"params": {"model": model_variables["params"],
                                  "projector": head_params["projector"]},
                       "batch_stats": {"model": model_variables.get("batch_stats", {}),
                                       "projector": head_stats["projector"]}}}

  def loss(self, model, params, model_stats, state, views, step):
    del step
    h, n, x = self.heads(), views[0].shape[0], jnp.concatenate(views)
    hs, tgt = state["head_stats"], state["target"]
    f, model_stats = _features(model, params["model"], model_stats, x)
    z, proj_stats = _apply(h["projector"], params["ssl"]["projector"], hs["projector"], f)
    p, pred_stats = _apply(h["predictor"], params["ssl"]["predictor"], hs["predictor"], z)
    tf, t_model_stats = _features(model, tgt["params"]["model"], tgt["batch_stats"]["model"], x)
    tz, t_proj_stats = _apply(h["projector"], tgt["params"]["projector"],
                              tgt["batch_stats"]["projector"], tf)
    tz = jax.lax.stop_gradient(tz)
    loss = losses.byol_loss(p[:n], tz[n:]) + losses.byol_loss(p[n:], tz[:n])
    return loss, {"model_stats": model_stats,
                  "head_stats": {"projector": proj_stats, "predictor": pred_stats},
                  "target_stats": {"model": t_model_stats, "projector": t_proj_stats},
                  "metrics": {}}

  def update_state(self, state, params, aux, step):
    m = momentum_at(self.cfg.momentum, step, self.num_steps)
    online = {"model": params["model"], "projector": params["ssl"]["projector"]}
    target = {"params": ema(state["target"]["params"], online, m),
              "batch_stats": jax.lax.stop_gradient(aux["target_stats"])}
    return {"head_stats": aux["head_stats"], "target": target}


class DINO(Objective):
  """Self-distillation: the student's outputs on every crop match the EMA teacher's centred,
  sharpened outputs on the *other* global crops; multi-crop (2 global + M local)."""
  name = "dino"

  @property
  def local_size(self) -> int:
    if self.cfg.local_size:
      return self.cfg.local_size
    m = self.multiple  # 96/224 of the input (DINO's 96 px at 224), a multiple of the patch
    return max(m, int(round(self.image_size * 96 / 224 / m)) * m, 8 if m == 1 else m)

  def view_specs(self):
    blur = 1.0 if self.cfg.blur else 0.0
    g = dict(scale=tuple(self.cfg.global_scale))
    local = _spec(self.cfg, self.local_size, scale=tuple(self.cfg.local_scale), blur=0.5 * blur)
    return ([_spec(self.cfg, self.image_size, blur=blur, **g),
             _spec(self.cfg, self.image_size, blur=0.1 * blur, solarize=0.2, **g)]
            + [local] * self.cfg.local_crops)

  def heads(self):
    return {"head": heads_lib.DINOHead(self.cfg.out_dim, self.cfg.hidden_dim or 2048,
                                       self.cfg.proj_dim or 256)}

  def init_state(self, model_variables, head_params, head_stats):
    return {"head_stats": head_stats,
            "target": {"params": {"model": model_variables["params"], "head": head_params["head"]},
                       "batch_stats": {"model": model_variables.get("batch_stats", {})}},
            "center": np.zeros((1, self.cfg.out_dim), np.float32)}

  def teacher_temp(self, step):
    c = self.cfg
    if not c.teacher_temp_warmup_steps:
      return jnp.asarray(c.teacher_temp, jnp.float32)
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / c.teacher_temp_warmup_steps, 1.0)
    return c.warmup_teacher_temp + frac * (c.teacher_temp - c.warmup_teacher_temp)

  def loss(self, model, params, model_stats, state, views, step):
    head, n, tgt = self.heads()["head"], views[0].shape[0], state["target"]
    split = lambda y, k: [y[i * n:(i + 1) * n] for i in range(k)]  # noqa: E731
    glob = jnp.concatenate(views[:2])
    f, model_stats = _features(model, params["model"], model_stats, glob)
    student = split(head.apply({"params": params["ssl"]["head"]}, f), 2)
    if len(views) > 2:
      fl, model_stats = _features(model, params["model"], model_stats,
                                  jnp.concatenate(views[2:]))
      student += split(head.apply({"params": params["ssl"]["head"]}, fl), len(views) - 2)
    tf, t_stats = _features(model, tgt["params"]["model"], tgt["batch_stats"]["model"], glob)
    teacher = jax.lax.stop_gradient(head.apply({"params": tgt["params"]["head"]}, tf))
    loss = losses.dino_loss(student, split(teacher, 2), state["center"],
                            self.cfg.student_temp, self.teacher_temp(step))
    batch_mean = jax.lax.pmean(jnp.mean(teacher, axis=0, keepdims=True), AXIS)
    return loss, {"model_stats": model_stats, "head_stats": {},
                  "target_stats": {"model": t_stats}, "batch_mean": batch_mean,
                  "metrics": {"teacher_temp": self.teacher_temp(step)}}

  def update_state(self, state, params, aux, step):
    m = momentum_at(self.cfg.momentum, step, self.num_steps)
    online = {"model": params["model"], "head": params["ssl"]["head"]}
    return {"head_stats": {},
            "target": {"params": ema(state["target"]["params"], online, m),
                       "batch_stats": jax.lax.stop_gradient(aux["target_stats"])},
            "center": losses.dino_center(state["center"], (), self.cfg.center_momentum,
                                         batch_mean=aux["batch_mean"])}


OBJECTIVES = {o.name: o for o in (SimCLR, BYOL, DINO)}
NAMES = ("supervised", *OBJECTIVES)


def get_objective(name: str, cfg, image_size: int, num_steps: int,
                  multiple: int = 1) -> Objective | None:
  """The objective for `config.objective` (None for supervised: the trainer's own loss);
  `multiple`: the model's patch size, which every crop side must be a multiple of."""
  if name == "supervised":
    return None
  if name not in OBJECTIVES:
    raise ValueError(f"config.objective={name!r}: expected one of {list(NAMES)}")
  objective = OBJECTIVES[name](cfg, image_size, num_steps, multiple)
  for spec in objective.view_specs():
    if spec.size % multiple:
      raise ValueError(f"config.ssl.local_size={spec.size}: crops must be multiples of the "
                       f"model's patch size {multiple}")
  return objective
