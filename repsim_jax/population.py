"""Population training: K runs of one model trained by one compiled program.

The members are ordinary runs, each a config and a run directory, that differ only in `seed`
(head and method initialisation, data order, step RNG) and in the scalars of `SCALARS`. Their
train states are stacked on a leading member axis and one `vmap`ped step trains all of them
inside the data-parallel program (members x data shards): every member keeps its own BatchNorm
statistics, optimiser state, method state (RepSim's Stiefel transform) and RNG, and the scalars
it differs in enter the step as per-member values. The step counter stays shared (unbatched),
so the logged-step `lax.cond`s of the step stay branches rather than becoming selects.

Everything a member writes is what its standalone run would write, in the same layout:
config.json (the member's own config, so its identity is the standalone run's), metrics.jsonl,
checkpoints and results.json (plus a "population" entry saying it was trained as one of K).
A member directory therefore resumes, or is read back, by a standalone run and by a population
alike; the numbers agree with a standalone run's to float32 rounding (tests/population_test.py).

Members are evaluated one after another with one compiled evaluation step. A member whose loss
or weights turn non-finite stops (no checkpoint after its last good one) and the others go on;
the population then raises FloatingPointError naming it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import time

import jax
import ml_collections
import numpy as np

from repsim_jax import checkpoint as ckpt_lib, config_lib, cpu, io, progress as progress_lib, runs, train
from repsim_jax.cpu import conv

# The config keys (besides `seed`) population members may differ in: each enters the step as a
# per-member value.
SCALARS = ("optim.lr", "optim.weight_decay", "method.lam", "method.alpha", "method.beta",
           "method.rho")
KEYS = ("seed",) + SCALARS
_AXES = train.TrainState(step=None, params=0, batch_stats=0, opt_state=0, ref_variables=0,
                         nonfinite_step=0, skipped_steps=0, objective_state=0)


def parse(spec: str) -> list[dict]:
  """`"seed=0,1;optim.lr=0.01,0.1"` -> every combination, as {key: value} dicts in order (the
  last key varying fastest)."""
  axes = []
  for part in [p.strip() for p in spec.split(";") if p.strip()]:
    key, sep, values = part.partition("=")
    key = key.strip()
    if not sep or key not in KEYS:
      raise ValueError(f"config.train.population={spec!r}: {part!r} is not key=v1,v2,... with a "
                       f"key of {list(KEYS)}")
    try:
      vals = [int(v) if key == "seed" else float(v) for v in values.split(",") if v.strip()]
    except ValueError:
      raise ValueError(f"config.train.population={spec!r}: {key} takes numbers, got "
                       f"{values!r}") from None
    if not vals or len(set(vals)) != len(vals):
      raise ValueError(f"config.train.population={spec!r}: {key} needs distinct values")
    axes.append([(key, v) for v in vals])
  if not axes:
    raise ValueError(f"config.train.population={spec!r}: no members")
  return [dict(c) for c in itertools.product(*axes)]


def label(overrides: dict) -> str:
  return ",".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in overrides.items())


def members(cfg, workdir: str) -> list[tuple[ml_collections.ConfigDict, str]]:
  """(config, run directory) of every member of `config.train.population`: the config with
  the member's values and no population, in `<workdir>/<label>-<identity>`."""
  out = []
  for overrides in parse(cfg.train.population):
    c = config_lib.set_keys(copy.deepcopy(cfg), {
        "train.population": "",
        **{k: type(config_lib.lookup(cfg, k))(v) for k, v in overrides.items()}})
    out.append((c, runs.run_dir(workdir, label(overrides), c)))
  return out


def varying_keys(cfgs) -> tuple[str, ...]:
  """The `SCALARS` the members' configs differ in; a ValueError naming any other difference."""
  flats = [runs.flat_config(c) for c in cfgs]
  keys = sorted(set().union(*flats))
  varying = []
  for k in keys:
    values = [json.dumps(f.get(k)) for f in flats]
    if len(set(values)) == 1 or k in ("seed", "name"):
      continue
    if k not in SCALARS:
      raise ValueError(f"population members differ in config.{k} ({', '.join(sorted(set(values)))}); "
                       f"they may differ only in {', '.join(KEYS)}")
    varying.append(k)
  return tuple(varying)


def check(cfgs) -> tuple[str, ...]:
  """Validates each member config; returns the keys they differ in."""
  for c in cfgs:
    train.validate(c)
    if c.objective != "supervised":
      raise ValueError(f"config.objective={c.objective!r}: population training is for "
                       "supervised runs (pretraining or fine-tuning); train SSL runs one by one")
    if c.train.get("population"):
      raise ValueError("config.train.population: a member config must not itself be a population")
  return varying_keys(cfgs)


@cpu.single_threaded_blas()  # as train.fit; concurrent LAPACK calls of 8 devices also deadlock OpenBLAS
def fit(cfgs, workdirs) -> list[train.Outcome]:
  """Trains the runs (configs, directories) as one population; a finished member is read back,
  a lone unfinished one trains standalone. Each directory is locked and identity-checked as a
  standalone run's is."""
  cfgs, workdirs = list(cfgs), list(workdirs)
  varying = check(cfgs)
  for w in workdirs:
    runs.check_workdir(w)
  with contextlib.ExitStack() as stack:
    done = []
    for c, w in zip(cfgs, workdirs):
      stack.enter_context(runs.exclusive(w))
      runs.check_identity(w, c)
      done.append(runs.read_results(w))
    out: list = [train.Outcome(d, None) if d is not None else None for d in done]
    todo = [i for i, d in enumerate(done) if d is None]
    for i in range(len(cfgs)):
      if i not in todo:
        print(f"already finished: {workdirs[i]}/results.json", flush=True)
    if todo:
      cpu.drop_compiled_programs_near_map_limit()
    if len(todo) == 1:
      out[todo[0]] = train._Run(cfgs[todo[0]], workdirs[todo[0]]).train()
    elif todo:
      members_ = [train._Run(cfgs[i], workdirs[i]) for i in todo]
      try:
        for i, o in zip(todo, _train(members_, varying)):
          out[i] = o
      finally:
        for m in members_:
          m.ckpt.close()
    return out


def run(cfg, workdir: str) -> list[dict]:
  """The `train` job with `config.train.population` set: trains the members and writes
  `<workdir>/population.json` (each member's overrides, directory and final metrics)."""
  pairs = members(cfg, workdir)
  outcomes = fit([c for c, _ in pairs], [w for _, w in pairs])
  if jax.process_index() == 0:
    rows = [{**ov, "run_dir": os.path.relpath(w, workdir), "final": o.results["final"]}
            for ov, (_, w), o in zip(parse(cfg.train.population), pairs, outcomes)]
    io.write_text(os.path.join(workdir, "population.json"), json.dumps(rows, indent=2) + "\n")
  return [o.results for o in outcomes]


# ---------------------------------------------------------------------------------------------
def _member_cfg(cfg, varying, hp):
  """`cfg` with the varying scalars replaced by this member's (traced) values."""
  c = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)
  for key in varying:
    block, leaf = key.split(".")
    c[block][leaf] = hp[key]
  return c


def _population_step(lead, varying, logged: bool):
  """The per-device step of the whole population: `vmap` of a member's step over the member
  axis (batch axis 1: axis 0 stays the one the data-parallel program splits)."""

  def member_step(hp, state, batch, rng):
    # `hp`: the member's values of `varying` (traced), which the method and optimiser read.
    fns = lead.train_steps(_member_cfg(lead.cfg, varying, hp) if varying else None)
    return fns[1 if logged else 0](state, batch, rng)

  def step(pstate, batch, rng):
    with conv.member_batched():  # (at trace time)
      new, metrics = jax.vmap(member_step, in_axes=(0, _AXES, 1, 0), out_axes=(_AXES, 0))(
          pstate["hp"], pstate["members"], batch, rng)
    return {"hp": pstate["hp"], "members": new}, metrics

  return step


def _stack(trees, step):
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)
  return stacked.replace(step=np.asarray(step, np.int32))


def _member(stacked, i: int):
  return jax.tree.map(lambda x: x[i], stacked.replace(step=None)).replace(step=stacked.step)


def _common_start(members) -> int:
  """Resumes every member from the newest step all of them have checkpointed (members saved
  together, so a kill between their saves leaves at most one save of difference)."""
  while True:
    common = set.intersection(*(set(m.ckpt.manager.all_steps()) for m in members))
    at = max(common, default=0)
    try:
      for m in members:
        m.resume(at)
      return at
    except ckpt_lib.CorruptCheckpoint as e:
      bad = next(m for m in members if str(m.ckpt.directory) in str(e))
      print(f"warning: {e}; moved to {bad.ckpt.quarantine(at)}, trying the one before",
            flush=True)


def _train(members, varying) -> list[train.Outcome]:
  lead, k = members[0], len(members)
  cfg, dp, num_steps = lead.cfg, lead.dp, lead.num_steps
  start = _common_start(members)
  name = f"[{cfg.get('name') or 'run'} x{k}] "
  lead.open(start, name)
  for m in members[1:]:
    m.open(start, name, like=lead)
  train_fn, logged_fn = lead.train_steps()
  p_train = dp.compile(_population_step(lead, varying, logged=False))
  p_logged = (p_train if logged_fn is train_fn
              else dp.compile(_population_step(lead, varying, logged=True)))
  hp = {key: np.asarray([config_lib.lookup(m.cfg, key) for m in members], np.float32)
        for key in varying}
  state = dp.put_replicated({"hp": hp, "members": _stack([m.state for m in members], start)})
  rng = dp.put_replicated(np.stack([np.asarray(m.step_rng) for m in members]))
  progress = progress_lib.Training(num_steps, cfg.train.batch_size * k, start, name=name)
  failed: dict[int, str] = {}

  def host_members():
    h = dp.get_replicated(state["members"])
    return [_member(h, i) for i in range(k)]

  t0 = time.perf_counter()
  elapsed = lambda: lead.train_seconds + time.perf_counter() - t0  # noqa: E731
  for step in range(start + 1, num_steps + 1):
    batches = [next(m.train_iter) for m in members]
    batch = {key: np.stack([b[key] for b in batches], axis=1) for key in ("image", "label")}
    logs = step % cfg.train.log_every == 0 or step == num_steps
    state, metrics = (p_logged if logs else p_train)(state, dp.put_batch(batch), rng)
    if step == start + 1:
      progress.reset_clock(step)
    if logs:
      metrics = dp.get_replicated(metrics)
      bad = dp.get_replicated(state["members"].nonfinite_step)
      for i, m in enumerate(members):
        if i in failed:
          continue
        try:
          m.check_finite(bad[i], step)
        except FloatingPointError as e:
          failed[i] = str(e)
          print(f"{name}member {m.workdir}: {e}; the others go on", flush=True)
          continue
        m.log_train(step, {key: float(v[i]) for key, v in metrics.items()})
      live = [i for i in range(k) if i not in failed]
      if not live:
        break
      progress.print(step, {"loss": float(np.mean(metrics["loss"][live])),
                            "acc": float(np.mean(metrics["accuracy"][live]))})
    evals = cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != num_steps
    sharp = lead.probe and step % cfg.analysis.sharpness_every == 0 and step != num_steps
    saves = cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
    if evals or sharp or saves:
      hosts = host_members()
      for i, m in enumerate(members):
        if i in failed:
          continue
        if evals:
          m.evaluate(dp.put_replicated(hosts[i]), step, host=hosts[i])
        if sharp:
          m.sharpness(hosts[i], step)
        if saves:
          m.save(hosts[i], step, elapsed())
  out = []
  hosts = host_members()
  for i, m in enumerate(members):
    if i in failed:
      out.append(None)
      m.writer.close()
      continue
    if m.last_saved != num_steps:
      m.save(hosts[i], num_steps, elapsed())
    out.append(m.finish(dp.put_replicated(hosts[i]), hosts[i], elapsed(),
                        extra={"population": {"members": k, "index": i}}))
  if failed:
    raise FloatingPointError(f"{len(failed)} of {k} population members stopped: "
                             + "; ".join(f"{members[i].workdir}: {why}" for i, why in failed.items()))
  return out
