"""The trainer: pretraining and fine-tuning are the same loop with different configs.

`train_step` and `eval_step` are pure per-device functions (see `parallel.py`); the host loop
feeds batches, logs, evaluates, checkpoints and resumes. Everything a run needs to continue
after preemption (parameters, optimiser, method state, data iterator, step; the RNG is derived
from the step) is in the checkpoint, so re-running the same command resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from repsim_jax import checkpoint as ckpt_lib, evaluation
from repsim_jax import config_lib, data, metric_writers, models, parallel
from repsim_jax import cpu, io, probes, progress as progress_lib, runs, sharpness, similarity, ssl
from repsim_jax import methods as methods_lib
from repsim_jax.optim import optimizers

AXIS = parallel.AXIS


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any             # {'model': model params, 'method': method params}
  batch_stats: Any        # the model's BatchNorm running statistics
  opt_state: Any
  ref_variables: Any      # frozen pretrained variables ({} when the method needs none)
  nonfinite_step: jax.Array  # first step with a NaN/Inf loss, gradient, parameter or BN statistic; -1 if none
  skipped_steps: jax.Array   # steps whose update was skipped (config.train.skip_nonfinite_steps)
  # SSL objectives: the EMA target / teacher, DINO's centre, the heads' BatchNorm statistics.
  objective_state: Any = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Losses and steps (pure, per device).
# ---------------------------------------------------------------------------------------------
def _correct(logits, labels, task: str):
  if task == "multilabel":
    return ((logits > 0) == (labels > 0)).mean(-1).astype(jnp.float32)
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def make_train_step(model, method: methods_lib.Method, tx, task: str, log_every: int = 1,
                    num_steps: int = 0, in_step_similarity: bool = False,
                    skip_nonfinite: bool = False, in_step_sharpness: str = "",
                    sharpness_cfg=None, diagnose: bool | None = None):
  """Per-device `train_step(state, batch, rng) -> (state, metrics)`.

  The local objective is the local mean task loss plus the method's term (computed from
  global-batch statistics); gradients are `pmean`-ed over AXIS, which gives exactly the gradient
  of the global-batch objective, also through synchronised BatchNorm and all-gathered features.

  On the steps the host logs (every `log_every`-th and step `num_steps`) the metrics also hold
  the method's diagnostics and, with `in_step_similarity`, `cka/<layer>`: linear CKA of every
  representation to the frozen pretrained model on the global batch, vmapped over layers of
  equal shape, and with `in_step_sharpness` ("sam" | "asam"), `sharpness/<kind>`: the SAM-style
  sharpness of the global batch at the step's starting weights (BatchNorm in eval mode;
  m-sharpness over sub-batches of `sharpness_cfg.m` when it is set). A `lax.cond` skips that
  work (including a pretrained forward pass the method does not need) on the other steps, whose
  values are NaN and never read. `diagnose=True / False` computes them on every step / none
  instead, for a host that compiles a logged and an unlogged step: on XLA:CPU a convolution
  inside a `lax.cond` branch ran 22x slower than outside one (benchmarks/train_step.py +sharp).

  Every step checks its loss, gradients, new parameters and BatchNorm statistics for NaN/Inf
  (fused reductions, the same on every device after the pmeans). The first bad step is recorded
  in `state.nonfinite_step` (the host stops there and never checkpoints a bad state) or, with
  `skip_nonfinite`, its update is dropped and counted in `state.skipped_steps`.
  """

  def logged(step):
    return (step % log_every == 0) | (step == num_steps)

  def train_step(state: TrainState, batch, rng):
    del rng  # No stochastic layers; methods that need noise derive it from (rng, step).
    images, labels = batch["image"], batch["label"]
    ref_reps = None
    if method.reference_forward:
      _, ref_reps = model.apply(state.ref_variables, images, train=False)
      ref_reps = jax.lax.stop_gradient(ref_reps)
    bn_train = method.bn_train(state.step)

    def forward(params):
      variables = {"params": params["model"], "batch_stats": state.batch_stats}

      def train_mode(_):
        (logits, reps), new_vars = model.apply(variables, images, train=True,
                                               mutable=["batch_stats"])
        return logits, reps, new_vars.get("batch_stats", state.batch_stats)

      def eval_mode(_):
        logits, reps = model.apply(variables, images, train=False)
        return logits, reps, state.batch_stats

      if isinstance(bn_train, bool):
        return train_mode(None) if bn_train else eval_mode(None)
      return jax.lax.cond(bn_train, train_mode, eval_mode, None)

    def loss_fn(params):
      logits, reps, new_stats = forward(params)
      task_loss = jnp.mean(evaluation.per_example_loss(logits, labels, task))
      reg, reg_metrics = method.loss(params, reps, ref_reps, state.ref_variables, state.step)
      return task_loss + reg, (task_loss, reg_metrics, logits, new_stats, reps)

    grads, (task_loss, reg_metrics, logits, new_stats, reps) = method.gradients(
        jax.grad(loss_fn, has_aux=True), state.params)
    loss = jax.lax.pmean(task_loss, AXIS)
    new_state, finite_metrics = _apply_update(state, tx, grads, loss, new_stats, skip_nonfinite)
    metrics = {"loss": loss,
               "accuracy": jax.lax.pmean(jnp.mean(_correct(logits, labels, task)), AXIS),
               **finite_metrics}
    metrics.update(parallel.pmean(reg_metrics))

    def diagnostics():
      reps_ = jax.lax.stop_gradient(reps)
      out = parallel.pmean(method.diagnostics(state.params, reps_, ref_reps))
      if in_step_similarity:
        out.update(_layerwise_cka(model, state, images, reps_, ref_reps))
      if in_step_sharpness:
        out[f"sharpness/{in_step_sharpness}"] = _in_step_sharpness(
            model, task, state, {"image": images, "label": labels}, in_step_sharpness,
            sharpness_cfg)
      return out

    if diagnose is None:
      metrics.update(_only_if(logged(state.step + 1), diagnostics))
    elif diagnose:
      metrics.update(diagnostics())
    return new_state, metrics

  return train_step


def _apply_update(state: TrainState, tx, grads, loss, new_stats, skip_nonfinite: bool,
                  objective_fn=None):
  """The optimiser step and the finiteness check shared by the supervised and SSL steps:
  (new state, metrics). `objective_fn(params) -> objective_state` runs on the new parameters
  (the EMA target follows the updated online network)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_stats = parallel.pmean(new_stats)  # already equal with synced BN; keeps replicas exact
  objective_state = objective_fn(params) if objective_fn else state.objective_state
  grad_norm = optax.tree.norm(grads)
  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
            & _all_finite(new_stats) & _all_finite(objective_state))
  nonfinite, skipped = state.nonfinite_step, state.skipped_steps
  metrics = {"grad_norm": grad_norm}
  if skip_nonfinite:
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    params, new_stats = keep(params, state.params), keep(new_stats, state.batch_stats)
    opt_state = keep(opt_state, state.opt_state)
    objective_state = keep(objective_state, state.objective_state)
    skipped = skipped + (~finite).astype(skipped.dtype)
    metrics["skipped_steps"] = skipped.astype(jnp.float32)
  else:
    nonfinite = jnp.where((nonfinite < 0) & ~finite, state.step, nonfinite)
  return state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                       opt_state=opt_state, nonfinite_step=nonfinite, skipped_steps=skipped,
                       objective_state=objective_state), metrics


def make_ssl_train_step(model, objective, tx, mean, std, skip_nonfinite: bool = False):
  """Per-device `train_step(state, batch, rng) -> (state, metrics)` of an SSL objective.

  `batch["image"]` holds undecorated pixels in [0, 1]: the objective's views are made here,
  vmapped over the batch and keyed by (rng, step, global position), then normalised by
  `mean`/`std`. Gradients are `pmean`-ed as in the supervised step; the loss itself is the
  global batch's where the objective gathers (SimCLR's negatives).
  """
  specs = objective.view_specs()

  def train_step(state: TrainState, batch, rng):
    images = batch["image"]
    channels = images.shape[-1]
    m = jnp.asarray(data.pipeline.channel_vector(mean, channels, "config.data.mean"))
    s = jnp.asarray(data.pipeline.channel_vector(std, channels, "config.data.std"))
    offset = jax.lax.axis_index(AXIS) * images.shape[0]
    views = ssl.augment.make_views(jax.random.fold_in(rng, state.step), images, specs, offset)
    views = [(v - m) / s for v in views]

    def loss_fn(params):
      return objective.loss(model, params, state.batch_stats, state.objective_state, views,
                            state.step)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = parallel.pmean(grads)
    aux = {**aux, "head_stats": parallel.pmean(aux["head_stats"])}
    if "target_stats" in aux:
      aux["target_stats"] = parallel.pmean(aux["target_stats"])
    loss = jax.lax.pmean(loss, AXIS)
    new_state, metrics = _apply_update(
        state, tx, grads, loss, aux["model_stats"], skip_nonfinite,
        lambda params: objective.update_state(state.objective_state, params, aux, state.step))
    return new_state, {"loss": loss, **metrics, **parallel.pmean(aux["metrics"])}

  return train_step


def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _only_if(pred, fn):
  """`fn()` where `pred`, NaNs of the same structure elsewhere, computing nothing there."""
  shapes = jax.eval_shape(fn)
  if not shapes:
    return {}
  nans = lambda: jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)  # noqa: E731
  return jax.lax.cond(pred, fn, nans)


def _in_step_sharpness(model, task, state, batch, kind: str, cfg):
  loss_fn = jax.tree_util.Partial(evaluation.eval_loss, model, task, state.batch_stats)
  adaptive = kind == "asam"
  return sharpness.sam_sharpness(
      loss_fn, state.params["model"], batch, rho=cfg.asam_rho if adaptive else cfg.rho,
      steps=cfg.asam_steps if adaptive else cfg.sam_steps, m=cfg.m or None, adaptive=adaptive,
      eta=cfg.eta, axis_name=AXIS)


def _layerwise_cka(model, state, images, reps, ref_reps):
  if ref_reps is None:
    ref_reps = model.apply(state.ref_variables, images, train=False)[1]
  gather = lambda r: jax.lax.all_gather(  # noqa: E731
      similarity.pool_features(r.astype(jnp.float32)), AXIS, tiled=True)
  a = {k: gather(v) for k, v in reps.items()}
  b = {k: gather(ref_reps[k]) for k in reps}
  return {f"cka/{k}": v for k, v in similarity.layerwise_similarity(a, b).items()}


# ---------------------------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------------------------
def num_train_steps(cfg, train_size: int) -> int:
  if cfg.train.num_steps > 0:
    return int(cfg.train.num_steps)
  return max(1, int(math.ceil(cfg.train.num_epochs * train_size / cfg.train.batch_size)))


def init_model_variables(model, cfg, image_shape, rng) -> dict:
  """The model's initial variables, as NumPy. With `config.model.init` (pretrained weights,
  `load_init_variables`) only the head is drawn, as the whole init draws it: the other leaves
  are `jax.ShapeDtypeStruct`s, since the file replaces them."""
  head_only = bool(cfg.model.init)
  variables = flax.core.unfreeze(_jitted_init(model, tuple(image_shape), head_only)(rng))
  return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else np.asarray(x),
                      variables)


@functools.lru_cache(maxsize=16)
def _jitted_init(model, image_shape: tuple[int, ...], head_only: bool):
  # One compiled init per model and input shape in a process: the members of a population (and
  # the runs of an inline study) differ only in the key, and compiling an init (its random
  # draws) takes seconds on XLA:CPU. Head only: XLA drops the other leaves' draws, and the
  # head's are the same operations as in the whole init.
  dummy = jnp.zeros((1,) + image_shape, jnp.float32)
  init = lambda r: flax.core.unfreeze(model.init(r, dummy, train=False))  # noqa: E731
  if not head_only:
    return jax.jit(init)
  head = jax.jit(lambda r: init(r)["params"].get("head", {}))
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))

  def init_head(r):
    out = jax.tree.map(lambda s: s, shapes)  # fresh containers: callers add to them
    if "head" in out["params"]:
      out["params"]["head"] = head(r)
    return out

  return init_head


@functools.lru_cache(maxsize=16)
def _jitted_features(model):
  # `model.apply` in eval mode as one program (per model, per process): run op by op it would
  # compile each of its ops on first use, seconds on XLA:CPU.
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def load_init_variables(cfg, model_variables: dict) -> dict:
  """Pretrained variables for `config.model.init`, head re-initialised when the task differs."""
  pretrained = ckpt_lib.load_pretrained(cfg.model.init, cfg.model.name, **dict(cfg.model.kwargs))
  pretrained.setdefault("batch_stats", {})
  fresh = model_variables
  where = f"config.model.init={cfg.model.init}"
  ckpt_lib.check_compatible(
      {k: v for k, v in pretrained.items() if k in ("params", "batch_stats")},
      {k: v for k, v in fresh.items() if k in ("params", "batch_stats")},
      where, ignore="params/head")
  params = dict(pretrained["params"])
  head_ok = ("head" in params and "head" in fresh["params"] and
             jax.tree.map(np.shape, params["head"]) == jax.tree.map(np.shape, fresh["params"]["head"]))
  if cfg.model.reset_head or not head_ok:
    if "head" in fresh["params"]:
      params["head"] = fresh["params"]["head"]
    else:
      params.pop("head", None)
  return {"params": params, "batch_stats": pretrained.get("batch_stats", {})}


def make_tx(method, cfg, num_steps: int, params) -> optax.GradientTransformation:
  """The run's optimiser: `config.optim` through the method's transform (freezing, Stiefel
  leaves, phases)."""
  return method.optimizer(
      lambda offset=0: optimizers.make_optimizer(cfg.optim, num_steps - offset, params)[0], params)


@dataclasses.dataclass
class Outcome:
  """What a training run leaves: its results (plain data, as in results.json) and its final state
  on the host (None when the run had finished before and was only read back)."""
  results: dict
  state: TrainState | None


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per `cfg` in `workdir` (or resumes it, or reads back its results when it finished
  before), writing metrics, checkpoints and results.json; returns the results."""
  return fit(cfg, workdir).results


@cpu.single_threaded_blas()
def fit(cfg: ml_collections.ConfigDict, workdir: str) -> Outcome:
  """`train_and_evaluate`, also returning the final state. The run directory is checked first:
  one writer at a time (`runs.exclusive`), and one config (`runs.check_identity`)."""
  validate(cfg)
  runs.check_workdir(workdir)
  with runs.exclusive(workdir):
    runs.check_identity(workdir, cfg)
    done = runs.read_results(workdir)
    if done is not None:
      print(f"{cfg.get('name') and f'[{cfg.name}] '}already finished: {workdir}/results.json",
            flush=True)
      return Outcome(done, None)
    cpu.drop_compiled_programs_near_map_limit()
    return _Run(cfg, workdir).train()


class _Run:
  """One training run: built from the config, then `train()`; its state lives in attributes."""

  def __init__(self, cfg, workdir: str):
    self.cfg, self.workdir = cfg, workdir
    if jax.process_index() == 0:
      config_lib.write_config(cfg, workdir)
    self.dp = dp = parallel.DataParallel(cfg.parallel.backend, cfg.parallel.num_devices)
    dp.check_batch_size(cfg.train.batch_size)
    dp.check_batch_size(cfg.train.eval_batch_size or cfg.train.batch_size,
                        "config.train.eval_batch_size")
    self.splits, self.info = splits, info = data.load_dataset(cfg.data)
    check_splits(cfg, splits)
    # Which images carry the confounder (an `attribute` rule: which it keeps): auditable.
    audit = {"carried": {k: np.flatnonzero(v.carried).tolist() for k, v in splits.items()
                         if hasattr(v, "carried")},
             "kept": {k: np.asarray(v.kept).tolist() for k, v in splits.items()
                      if hasattr(v, "kept")}}
    audit = {k: v for k, v in audit.items() if v}
    if audit and jax.process_index() == 0:
      io.write_text(os.path.join(workdir, "confounded.json"), json.dumps(
          {"confounder": cfg.data.confounder.to_dict(), **audit}) + "\n")
    self.num_steps = num_train_steps(cfg, len(splits["train"]))
    # SSL trains the backbone alone (no classifier: its features are what the heads see).
    num_classes = (cfg.model.num_classes or info.num_classes) if cfg.objective == "supervised" else 0
    self.model = model = models.get_model(cfg.model.name, num_classes,
                                          dtype=jnp.dtype(cfg.model.dtype), bn_axis_name=AXIS,
                                          **dict(cfg.model.kwargs))
    self.objective = objective = ssl.get_objective(
        cfg.objective, cfg.ssl, data.input_shape(cfg, info)[0], self.num_steps,
        multiple=getattr(model, "patch_size", 1))
    rng = jax.random.PRNGKey(cfg.seed)
    init_rng, method_rng, self.step_rng = jax.random.split(rng, 3)
    variables = init_model_variables(model, cfg, data.input_shape(cfg, info), init_rng)
    if cfg.model.init:
      variables = load_init_variables(cfg, variables)
    variables.setdefault("batch_stats", {})
    self.init_variables = variables

    self.source_eval = None
    if cfg.analysis.source_data.source:
      self.source_eval = _source_task(cfg, data.input_shape(cfg, info))

    self.method = method = methods_lib.get_method(cfg.method)
    # SSL: the host only decodes and batches ([0, 1] pixels); the step makes the views.
    self.train_iter, self.eval_iter_fn = data.make_iters(cfg, splits, info, seed=cfg.seed,
                                                         raw_train=objective is not None)
    # Method parameters are initialised from a few batches of a separate iterator, so the
    # training stream (and hence resumption) is the same with or without them.
    init_iter = data.make_iters(cfg, splits, info, seed=cfg.seed + 1)[0]
    init_batches = [next(init_iter) for _ in range(cfg.method.get("init_batches", 1))]
    method_params = method.init_params(method_rng, variables, init_batches, _jitted_features(model))
    params = {"model": variables["params"], "method": method_params}
    objective_state = {}
    if objective:
      dummy = jnp.zeros((1,) + data.input_shape(cfg, info), jnp.float32)
      feature_dim = jax.eval_shape(lambda v: model.apply(v, dummy, train=False),
                                   variables)[1]["pre_logits"].shape[-1]
      params["ssl"], objective_state = objective.init(jax.random.fold_in(method_rng, 1),
                                                      variables, feature_dim)
    # (jitted: the host evaluates it to log the rate; op by op it would compile each op.)
    self.schedule = jax.jit(optimizers.learning_rate_schedule(cfg.optim, self.num_steps))
    self.tx = make_tx(method, cfg, self.num_steps, params)
    keep_ref = (method.needs_reference or method.reference_forward
                or cfg.analysis.in_step_similarity)
    self.state = TrainState(
        step=np.asarray(0, np.int32), params=params, batch_stats=variables["batch_stats"],
        opt_state=jax.tree.map(np.asarray, jax.jit(self.tx.init)(params)),
        ref_variables=({"params": variables["params"], "batch_stats": variables["batch_stats"]}
                       if keep_ref else {}),
        nonfinite_step=np.asarray(-1, np.int32), skipped_steps=np.asarray(0, np.int32),
        objective_state=objective_state)
    self.fresh_state = self.state
    # Carried across segments of a resumed run, so its results equal an uninterrupted one's.
    self.history, self.train_seconds, self.metrics_rows = [], 0.0, 0
    self.ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
    self.last_saved = None

  # -- checkpoints ----------------------------------------------------------------------------
  def resume(self, at: int | None = None) -> int:
    """Restores the newest intact checkpoint, or that of step `at` (0: none, the fresh state);
    returns the step the run continues from."""
    var_t = {"params": self.fresh_state.params["model"], "batch_stats": self.fresh_state.batch_stats}
    train_t = _train_item(self.fresh_state)
    if at is None:
      found = self.ckpt.restore_latest(var_t, train_t)
    else:
      found = (at, *self.ckpt.restore(at, var_t, train_t)) if at else None
    if found is None:
      self.state, self.history, self.train_seconds, self.metrics_rows = self.fresh_state, [], 0.0, 0
      return 0
    step, var_r, train_r, meta = found
    self.state = _from_items(var_r, train_r)
    self.train_iter.set_state(meta["data_iter"])
    self.history = meta.get("history", [])
    self.train_seconds = float(meta.get("train_seconds", 0.0))
    self.metrics_rows = int(meta.get("metrics_rows", 0))
    self.last_saved = step
    print(f"resumed from {self.ckpt.directory} at step {step}", flush=True)
    return step

  def check_finite(self, nonfinite_step, step: int) -> None:
    """Stops the run (FloatingPointError) when the state recorded a non-finite step."""
    bad = int(nonfinite_step)
    if bad >= 0:
      last = (f"step {self.last_saved} in {self.ckpt.directory}" if self.last_saved is not None
              else "none yet")
      raise FloatingPointError(
          f"non-finite loss, gradient, parameter or BatchNorm statistic at step {bad + 1}; "
          f"stopped at step {step}; last good checkpoint: {last}")

  def save(self, h, step: int, seconds: float) -> None:
    """Checkpoints the host state `h` (checked finite first) at `step`."""
    self.check_finite(h.nonfinite_step, step)
    self.ckpt.save(step, {"params": h.params["model"], "batch_stats": h.batch_stats},
                   _train_item(h), {"data_iter": self.train_iter.get_state(),
                                    "model": self.cfg.model.name, "step": step,
                                    "history": self.history, "train_seconds": seconds,
                                    "metrics_rows": self.writer.rows})
    self.last_saved = step

  # -- pieces of the loop, shared with population training (repsim_jax.population) ----------
  def open(self, start: int, name: str = "", like: "_Run | None" = None) -> None:
    """The metrics writer (from `start`) and the evaluation steps (those of `like`, a run of
    the same model, when given: compiled once); `name` prefixes progress lines."""
    cfg = self.cfg
    self.name = name or (cfg.get("name", "") and f"[{cfg.name}] ")
    self.writer = metric_writers.MetricWriter(self.workdir, tensorboard=cfg.train.tensorboard,
                                              resume_step=start, keep_rows=self.metrics_rows)
    if like is not None:
      self.p_eval, self.p_features = like.p_eval, like.p_features
    else:
      self.p_eval = self.dp.compile(evaluation.make_step(self.model), donate_state=False,
                                    sharded_out=True)
      self.p_features = self.dp.compile(evaluation.make_step(self.model, ("pre_logits",)),
                                        donate_state=False, sharded_out=True)
    self.probe = None
    if cfg.analysis.sharpness_every:
      # A fixed probe set (first batches of the ordered val split), drawn once.
      probe_iter = self.eval_iter_fn("val" if "val" in self.splits else "train")
      self.probe = [{"image": b["image"], "label": b["label"]}
                    for b, _ in zip(probe_iter, range(cfg.analysis.probe_batches))]

  def train_steps(self, cfg=None):
    """(step for unlogged steps, step for logged steps), per device, not yet compiled. With
    `cfg` (this run's config with other values of the scalars that population members may
    differ in, possibly traced), the method and optimiser are built from it."""
    method, tx = self.method, self.tx
    if cfg is not None:
      method = methods_lib.get_method(cfg.method)
      tx = make_tx(method, cfg, self.num_steps, self.state.params)
    cfg = self.cfg
    if self.objective:
      step = make_ssl_train_step(self.model, self.objective, self.tx, tuple(cfg.data.mean),
                                 tuple(cfg.data.std), cfg.train.skip_nonfinite_steps)
      return step, step
    # In-step analyses (model forward and backward passes) get a step of their own for the
    # logged steps rather than a lax.cond branch (slow on XLA:CPU, see make_train_step).
    split = bool(cfg.analysis.in_step_similarity or cfg.analysis.in_step_sharpness)
    make = lambda diagnose: make_train_step(  # noqa: E731
        self.model, method, tx, self.info.task, cfg.train.log_every, self.num_steps,
        cfg.analysis.in_step_similarity, cfg.train.skip_nonfinite_steps,
        cfg.analysis.in_step_sharpness, cfg.analysis.sharpness, diagnose)
    if split:
      return make(False), make(True)
    step = make(None)
    return step, step

  def log_train(self, step: int, m: dict) -> None:
    m = {**m, "lr": float(self.schedule(step - 1))}
    self.writer.write(step, "train", m)

  def sharpness(self, h, step: int) -> dict:
    """Sharpness of the host state `h` on the probe set, logged."""
    info = self.info
    loss_fn = jax.tree_util.Partial(evaluation.eval_loss, self.model, info.task, h.batch_stats)
    m = sharpness.sharpness_report(loss_fn, h.params["model"], self.probe,
                                   jax.random.PRNGKey(self.cfg.seed), self.cfg.analysis.sharpness)
    self.writer.write(step, "sharpness", m)
    return m

  def _knn_monitor(self, variables, split):
    # SSL runs: k-NN accuracy of the backbone's features, the labelled bank split voting.
    cfg = self.cfg
    feats = lambda s, cap: evaluation.run(  # noqa: E731
        self.dp, self.p_features, variables, self.eval_iter_fn(s), max_examples=cap,
        desc=f"{self.name}k-NN {s}")
    bank, query = feats(cfg.ssl.knn_bank_split, cfg.ssl.knn_bank_size), feats(split, 0)
    acc = ssl.knn.knn_accuracy(bank["pre_logits"], bank["label"], query["pre_logits"],
                               query["label"], self.info.num_classes, cfg.ssl.knn_k,
                               cfg.ssl.knn_temperature, self.info.task == "multilabel")
    return {"knn_accuracy": acc, "num_examples": int(query["label"].shape[0])}

  def _source_quality(self, variables):
    # DESIGN §9: the source task through the current backbone (its train split votes / fits).
    cfg = self.cfg
    eval_iter, src_info = self.source_eval
    feats = lambda s, cap: evaluation.run(  # noqa: E731
        self.dp, self.p_features, variables, eval_iter(s), max_examples=cap,
        desc=f"{self.name}source {s}")
    bank, query = feats("train", cfg.analysis.source_bank_size), feats("val", 0)
    return probes.quality(bank["pre_logits"], bank["label"], query["pre_logits"],
                          query["label"], src_info.num_classes, k=cfg.ssl.knn_k,
                          temperature=cfg.ssl.knn_temperature)

  def _similarity(self, h, step):
    # Every representation against the initial (pretrained) weights, on config.analysis.split.
    cfg = self.cfg
    split = cfg.analysis.split if cfg.analysis.split in self.splits else "val"
    sim = evaluation.similarity_to(
        self.dp, self.model, {"params": h.params["model"], "batch_stats": h.batch_stats},
        {"params": self.init_variables["params"],
         "batch_stats": self.init_variables["batch_stats"]},
        lambda: self.eval_iter_fn(split), cfg.analysis.measures, cfg.analysis.max_examples)
    self.writer.write(step, "similarity", {f"{m}/{k}": v for m, d in sim.items()
                                           for k, v in d.items()})
    return sim

  def evaluate(self, state, step: int, final: bool = False, host=None):
    """Evaluates the placed `state` (`host`: its host copy, fetched here when needed) at
    `step`: (row of split metrics, similarity), both logged."""
    cfg, row = self.cfg, {}
    variables = {"params": state.params["model"], "batch_stats": state.batch_stats}
    for split in cfg.train.eval_splits:
      if self.objective:
        m = self._knn_monitor(variables, split)
      else:
        m = evaluation.evaluate(self.dp, self.p_eval, variables, self.eval_iter_fn(split),
                                self.info.task, desc=f"{self.name}eval {split}")
      self.writer.write(step, split, m)
      row[split] = m
    if self.source_eval:
      row["source"] = self._source_quality(variables)
      self.writer.write(step, "source", row["source"])
    sim = {}
    if cfg.model.init and (cfg.analysis.eval_similarity or
                           (final and cfg.analysis.final_similarity)):
      sim = self._similarity(host if host is not None else self.dp.get_replicated(state), step)
    self.history.append({"step": step, **row})
    return row, sim

  def finish(self, state, host, seconds: float, extra: dict | None = None) -> Outcome:
    """The final evaluation of the placed `state` (host copy `host`) and results.json."""
    cfg, num_steps = self.cfg, self.num_steps
    final, sim = self.evaluate(state, num_steps, final=True, host=host)
    if self.probe:
      final["sharpness"] = self.sharpness(host, num_steps)
    self.writer.close()
    results = {"step": num_steps, "model": cfg.model.name, "objective": cfg.objective,
               "method": cfg.method.name,
               "task": self.info.task, "dataset": self.info.name, "identity": runs.identity(cfg),
               "train_seconds": seconds, "skipped_steps": int(host.skipped_steps),
               "final": final, "best_val": _best_by_val(self.history), "similarity": sim,
               **(extra or {})}
    if jax.process_index() == 0:
      io.write_text(os.path.join(self.workdir, "results.json"),
                    json.dumps(results, indent=2, default=float) + "\n")
    return Outcome(results, host)

  # -- the loop -------------------------------------------------------------------------------
  def train(self) -> Outcome:
    try:
      return self._train()
    finally:
      self.ckpt.close()

  def _train(self) -> Outcome:
    cfg, dp = self.cfg, self.dp
    num_steps = self.num_steps
    start = self.resume()
    self.open(start)
    train_fn, logged_fn = self.train_steps()
    p_train = dp.compile(train_fn)
    p_logged = p_train if logged_fn is train_fn else dp.compile(logged_fn)
    state = dp.put_replicated(self.state)
    rng_dev = dp.put_replicated(np.asarray(self.step_rng))
    progress = progress_lib.Training(num_steps, cfg.train.batch_size, start, name=self.name)

    step = start
    t0 = time.perf_counter()
    elapsed = lambda: self.train_seconds + time.perf_counter() - t0  # noqa: E731
    for step in range(start + 1, num_steps + 1):
      batch = next(self.train_iter)
      logs = step % cfg.train.log_every == 0 or step == num_steps
      state, m = (p_logged if logs else p_train)(
          state, dp.put_batch({"image": batch["image"], "label": batch["label"]}), rng_dev)
      if step == start + 1:
        progress.reset_clock(step)
      if logs:
        m = {k: float(v) for k, v in dp.get_replicated(m).items()}
        self.check_finite(dp.get_replicated(state.nonfinite_step), step)
        self.log_train(step, m)
        progress.print(step, {"loss": m["loss"],
                              **({"acc": m["accuracy"]} if "accuracy" in m else {})})
      if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != num_steps:
        self.evaluate(state, step)
      if self.probe and step % cfg.analysis.sharpness_every == 0 and step != num_steps:
        self.sharpness(dp.get_replicated(state), step)
      if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
        self.save(dp.get_replicated(state), step, elapsed())
    host = dp.get_replicated(state)
    if self.last_saved != num_steps:
      self.save(host, num_steps, elapsed())
    return self.finish(state, host, elapsed())


def _source_task(cfg, shape):
  """(eval_iter, info) of `config.analysis.source_data`, checked against the model's input."""
  src = ml_collections.ConfigDict(cfg.to_dict())
  src.data = cfg.analysis.source_data
  splits, info = data.load_dataset(src.data)
  if info.task not in ("multiclass", "binary", "ordinal"):
    raise ValueError(f"config.analysis.source_data: a {info.task} task; the k-NN and linear "
                     "probes need single-label classes")
  for split in ("train", "val"):
    if split not in splits:
      raise ValueError(f"config.analysis.source_data: no {split!r} split (both are needed)")
  if data.input_shape(src, info) != shape:
    raise ValueError(f"config.analysis.source_data: the model sees {data.input_shape(src, info)} "
                     f"images from it but {shape} from config.data; set its image_size / channels")
  return data.make_iters(src, splits, info, seed=cfg.seed)[1], info


def check_splits(cfg, splits) -> None:
  """The splits the run evaluates on exist and are not empty (checked before any training)."""
  for split in ("train", *cfg.train.eval_splits):
    if split not in splits:
      raise ValueError(f"config.train.eval_splits: the dataset has no {split!r} split "
                       f"(it has {sorted(splits)})")
    if len(splits[split]) == 0:
      raise ValueError(f"config.data: the {split!r} split of {cfg.data.name!r} is empty")


def _best_by_val(history):
  rows = [h for h in history if "val" in h]
  if not rows:
    return {}
  # SSL runs have no val loss: their best is the highest k-NN accuracy.
  best = min(rows, key=lambda h: h["val"].get("loss", -h["val"].get("knn_accuracy", 0.0)))
  return {"step": best["step"], **{s: best[s] for s in best if s != "step"}}


def _train_item(state) -> dict:
  item = {"step": state.step, "method": state.params["method"], "opt_state": state.opt_state,
          "ref_variables": state.ref_variables, "nonfinite_step": state.nonfinite_step,
          "skipped_steps": state.skipped_steps}
  if "ssl" in state.params:  # SSL runs only, so supervised checkpoints keep their layout
    item["ssl"] = {"heads": state.params["ssl"], "state": state.objective_state}
  return item


def _from_items(variables, train) -> TrainState:
  params = {"model": variables["params"], "method": train["method"]}
  if "ssl" in train:
    params["ssl"] = train["ssl"]["heads"]
  return TrainState(step=train["step"], params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=train["opt_state"],
                    ref_variables=train["ref_variables"], nonfinite_step=train["nonfinite_step"],
                    skipped_steps=train["skipped_steps"],
                    objective_state=train["ssl"]["state"] if "ssl" in train else {})


def validate(cfg) -> None:
  config_lib.check_choice(cfg, "parallel.backend", parallel.BACKENDS)
  config_lib.check_choice(cfg, "optim.name", optimizers.OPTIMIZERS)
  config_lib.check_choice(cfg, "optim.schedule", optimizers.SCHEDULES)
  config_lib.check_choice(cfg, "method.name", methods_lib.METHODS)
  config_lib.check_choice(cfg, "objective", ssl.NAMES)
  if cfg.objective != "supervised":
    for key, plain in (("method.name", "full_ft"), ("analysis.sharpness_every", 0),
                       ("analysis.in_step_similarity", False),
                       ("analysis.in_step_sharpness", "")):
      if config_lib.lookup(cfg, key) != plain:
        raise ValueError(f"config.{key}={config_lib.lookup(cfg, key)!r}: SSL pretraining "
                         f"(config.objective={cfg.objective!r}) needs {plain!r}; fine-tuning "
                         "methods and task-loss analyses apply to supervised runs")
    config_lib.check_positive(cfg, "ssl.knn_k", "ssl.knn_temperature")
    if cfg.objective == "dino" and cfg.ssl.local_crops < 0:
      raise ValueError(f"config.ssl.local_crops={cfg.ssl.local_crops}: expected 0 or more")
  config_lib.check_choice(cfg, "model.name", models.MODEL_NAMES)
  config_lib.check_choice(cfg, "model.dtype", ("float32", "bfloat16"))
  config_lib.check_positive(cfg, "train.batch_size", "train.log_every", "optim.lr",
                            "train.keep_checkpoints")
  for key in ("data.image_size", "data.channels", "train.eval_batch_size", "train.num_steps",
              "train.checkpoint_every", "train.eval_every"):
    config_lib.check_non_negative(cfg, key)
  method = methods_lib.METHODS[cfg.method.name]
  if (method.needs_reference or method.reference_forward) and not cfg.model.init:
    raise ValueError(f"config.method.name={cfg.method.name!r} regularises toward the pretrained "
                     "model, but config.model.init is empty (random init); name the pretrained "
                     "weights (a run dir or a weights file) or use full_ft")
  if cfg.train.num_steps <= 0 and cfg.train.num_epochs <= 0:
    raise ValueError("config.train.num_steps / num_epochs: one of them must be positive")
  sharpness.check_config(cfg.analysis.sharpness, "config.analysis.sharpness")
  config_lib.check_choice(cfg, "analysis.in_step_sharpness", ("", "sam", "asam"))
  m = cfg.analysis.sharpness.get("m", 0)
  devices = cfg.parallel.num_devices if cfg.parallel.num_devices > 0 else jax.device_count()
  if cfg.analysis.in_step_sharpness and m and (cfg.train.batch_size // devices) % m:
    raise ValueError(f"config.analysis.sharpness.m={m}: in-step sharpness splits each device's "
                     f"{cfg.train.batch_size // devices} examples into sub-batches of m; pick a "
                     "divisor")
  unused = methods_lib.unused_keys(cfg.method)
  if unused and jax.process_index() == 0:
    print(f"warning: config.method.{unused[0]}={cfg.method[unused[0]]!r}"
          + (f" (and {', '.join(unused[1:])})" if unused[1:] else "")
          + f" not used by method {cfg.method.name!r}", file=sys.stderr, flush=True)
