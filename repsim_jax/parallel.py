"""Data parallelism: one pure per-device step, run on every device.

The step functions in `train.py` are written per device: they see their shard of the batch and
average gradients, BatchNorm statistics and metrics with `lax.pmean` over `AXIS`. This module
runs such a function either with `jax.shard_map` on a 1-D `Mesh` (the current form of pmap) or
with `jax.pmap` (`config.parallel.backend`), and moves host data in and out of either layout.
Multi-host works the same way: each process feeds its own slice of the global batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from repsim_jax import cpu

AXIS = "data"
BACKENDS = ("shard_map", "pmap")


def initialize_distributed(cfg) -> None:
  """Joins a multi-process run when `cfg.coordinator_address` is set (jax.distributed).

  A peer silent for `cfg.heartbeat_timeout_seconds` (jax's default: 100 s) aborts the others;
  the command line turns that into one line (`repsim_jax.peers`).
  """
  if not cfg.get("coordinator_address"):
    return
  jax.distributed.initialize(
      coordinator_address=cfg.coordinator_address,
      num_processes=cfg.num_processes,
      process_id=cfg.process_id,
      heartbeat_timeout_seconds=int(cfg.get("heartbeat_timeout_seconds", 30)),
  )
  # Each host's log says which part of the run it is (a SLURM job's task logs look alike).
  print(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} of {jax.device_count()} devices", flush=True)


class DataParallel:
  """Places state/batches and compiles per-device steps for one backend."""

  def __init__(self, backend: str = "shard_map", num_devices: int = -1):
    if backend not in BACKENDS:
      raise ValueError(f"config.parallel.backend={backend!r}: expected one of {list(BACKENDS)}")
    self.backend = backend
    if num_devices > 0:
      if jax.process_count() > 1:
        raise ValueError("config.parallel.num_devices must be -1 (all devices) in a multi-process run")
      if num_devices > jax.device_count():
        raise ValueError(f"config.parallel.num_devices={num_devices}: only {jax.device_count()} devices")
      devices = jax.devices()[:num_devices]
    else:
      devices = jax.devices()
    self.devices = devices
    self.local_devices = [d for d in devices if d.process_index == jax.process_index()]
    self.mesh = Mesh(np.asarray(devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P(AXIS))
    # pmap's layout: a leading axis of local devices, one slice per device.
    self._stacked = NamedSharding(Mesh(np.asarray(self.local_devices), ("local",)), P("local"))

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def check_batch_size(self, global_batch_size: int, key: str = "config.train.batch_size") -> None:
    if global_batch_size % self.num_devices:
      raise ValueError(f"{key}={global_batch_size}: must be divisible by the {self.num_devices} devices")

  # -- compiling ----------------------------------------------------------------------------
  def compile(self, fn: Callable, *, donate_state: bool = True, sharded_out: bool = False):
    """Compiles `fn(state, batch, rng) -> (state_or_metrics, out)` for all devices.

    `state` and `rng` are replicated; `batch` is split along its leading axis. The first output
    is replicated (it is `pmean`-ed inside), the second is replicated too unless `sharded_out`
    (e.g. per-example logits at evaluation).
    """
    out2 = P(AXIS) if sharded_out else P()
    if self.backend == "shard_map":
      # check_vma=False gives pmap's semantics (explicit pmean of gradients), so one step
      # function is exact under both backends.
      mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(AXIS), P()), out_specs=(P(), out2),
                             check_vma=False)
      on_cpu = self.devices[0].platform == "cpu"
      return jax.jit(mapped, donate_argnums=(0,) if donate_state else (),
                     compiler_options=cpu.compiler_options() if on_cpu else None)
    pmapped = jax.pmap(fn, axis_name=AXIS, devices=self.local_devices if jax.process_count() == 1
                       else None, donate_argnums=(0,) if donate_state else (), in_axes=(0, 0, 0))
    options = cpu.compiler_options(pmap=True) if self.devices[0].platform == "cpu" else None
    return _CompiledWith(pmapped, options) if options else pmapped

  # -- data movement --------------------------------------------------------------------------
  def put_replicated(self, tree):
    """Host pytree -> replicated on every device, in the backend's layout.

    Every leaf gets buffers of its own, even a leaf that already is a device array or appears
    twice in `tree` (the trained parameters and the frozen pretrained copy start as the same
    arrays): the train state is donated to each step, and donating a buffer that another leaf or
    the caller still holds deletes it under them.
    """
    if self.backend == "shard_map":
      if jax.process_count() == 1:
        return jax.device_put(tree, self.replicated, may_alias=False)
      return jax.tree.map(
          lambda x: jax.make_array_from_callback(np.shape(x), self.replicated,
                                                 lambda _: np.array(x)),  # a copy: see above
          tree)
    n = len(self.local_devices)
    # The broadcast is a stride-0 view: without may_alias=False the devices' shards could all
    # be that one host buffer.
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), self._stacked,
                                 may_alias=False),
        tree)

  def put_batch(self, batch):
    """This process's slice of the global batch -> device layout (split along the batch axis)."""
    if self.backend == "shard_map":
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(self.sharded, np.asarray(x)), batch)
    n = len(self.local_devices)

    def split(x):
      x = np.asarray(x)
      return jax.device_put(x.reshape((n, x.shape[0] // n) + x.shape[1:]), self._stacked)
    return jax.tree.map(split, batch)

  def get_replicated(self, tree):
    """Replicated device pytree -> NumPy on the host (one copy)."""
    if self.backend == "shard_map":
      return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), tree)

  def get_sharded(self, tree):
    """Per-example device outputs -> the full global array on every host."""
    if self.backend == "shard_map":
      if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
      return multihost_utils.process_allgather(tree, tiled=True)
    local = jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]), tree)
    if jax.process_count() == 1:
      return local
    return multihost_utils.process_allgather(local, tiled=True)


def gather_host(tree):
  """Host arrays of this process's slice of a global batch -> the whole global batch.

  Process p holds the contiguous slice p, so a process-major concatenation is the global order;
  with one process this is the identity (no device round trip for labels and masks).
  """
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def pmean(tree, axis_name: str = AXIS):
  return jax.tree.map(lambda x: jax.lax.pmean(x, axis_name), tree)


def global_mean(x, mask, axis_name: str = AXIS):
  """Mean over the *global* batch of per-example values, weighting by `mask` (padding = 0)."""
  num = jax.lax.psum(jnp.sum(x * mask), axis_name)
  den = jax.lax.psum(jnp.sum(mask), axis_name)
  return num / jnp.maximum(den, 1.0)


class _CompiledWith:
  """A pmapped function compiled with XLA options: `jax.pmap` takes none, its lowered programs
  do. Compiles once per argument signature, as pmap's own dispatch does."""

  def __init__(self, pmapped: Callable, options: dict):
    self._pmapped, self._options, self._compiled = pmapped, options, {}

  def __call__(self, *args):
    leaves, treedef = jax.tree.flatten(args)
    key = (treedef, tuple(jax.typeof(x) for x in leaves))
    if key not in self._compiled:
      self._compiled[key] = self._pmapped.lower(*args).compile(self._options)
    return self._compiled[key](*args)
