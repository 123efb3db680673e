"""Run directories (DESIGN §10): a run's identity, one writer per directory, finished runs.

A run directory belongs to one resolved config. Its identity is a hash of that config minus the
keys that do not change what is computed (`NOT_IDENTITY`); the devices, backend and process
count are recorded in `config.json` but are not part of it, so a preempted run may resume on
another slice. Re-running in a directory that holds a run (a checkpoint or a results.json)
resumes only when the identity matches, and stops with one line naming the differing keys
otherwise. Jobs that run many trainings (the default run, studies, sweeps) name each run
directory by its identity (`run_dir`), so a changed hyper-parameter makes a new run and a
finished one is never re-run or overwritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket

import jax

# Keys (dotted; a trailing '.' is a whole block) that change no computed number.
NOT_IDENTITY = ("name", "job", "train.log_every", "train.tensorboard", "train.checkpoint_every",
                "train.keep_checkpoints", "data.worker_count", "data.mmap",
                "analysis.source_data.worker_count", "analysis.source_data.mmap", "parallel.",
                "launch.", "train.population")


class RunMismatch(ValueError):
  """A run directory that holds a run of another config."""


class RunLocked(ValueError):
  """A run directory that another live process is writing."""


def flat_config(config) -> dict:
  """{dotted key: JSON value} of a ConfigDict or of a loaded config.json dict."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  d = json.loads(json.dumps(d, sort_keys=True, default=str))  # tuples -> lists, as on disk
  out = {}

  def walk(prefix, node):
    if isinstance(node, dict):  # an empty block (model.kwargs = {}) is no key
      for k, v in node.items():
        walk(f"{prefix}{k}.", v)
    else:
      out[prefix[:-1]] = node
  walk("", d)
  return out


def _identity_items(flat: dict) -> dict:
  return {k: v for k, v in flat.items()
          if not any(k == n or (n.endswith(".") and k.startswith(n)) for n in NOT_IDENTITY)}


def identity(config) -> str:
  """The run's identity: 12 hex digits of a hash of its identity keys."""
  items = _identity_items(flat_config(config))
  return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:12]


def run_dir(parent: str, name: str, config) -> str:
  """`<parent>/<name>-<identity>`: where a job that runs many trainings puts this one."""
  return os.path.join(parent, f"{name}-{identity(config)}")


def link(path: str, target: str) -> None:
  """Points the symlink `path` at `target` (relative, replaced atomically); a real file or
  directory at `path` (a run made before runs were named by identity) is left alone."""
  if os.path.exists(path) and not os.path.islink(path):
    return
  tmp = f"{path}.tmp.{os.getpid()}"
  if os.path.lexists(tmp):
    os.remove(tmp)
  os.symlink(os.path.relpath(target, os.path.dirname(path) or "."), tmp)
  os.replace(tmp, path)


def holds_run(workdir: str) -> bool:
  ckpts = os.path.join(workdir, "checkpoints")
  return (os.path.exists(os.path.join(workdir, "results.json"))
          or (os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts))))


def check_identity(workdir: str, config) -> None:
  """Raises RunMismatch when `workdir` holds a run whose config differs in identity keys."""
  path = os.path.join(workdir, "config.json")
  if not holds_run(workdir) or not os.path.exists(path):
    return
  with open(path) as f:
    old = _identity_items(flat_config(json.load(f)))
  new = _identity_items(flat_config(config))
  diff = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
  if not diff:
    return
  shown = ", ".join(f"{k}: {_short(old.get(k, '<absent>'))} -> {_short(new.get(k, '<absent>'))}"
                    for k in diff[:4])
  more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
  raise RunMismatch(f"--workdir={workdir} holds a run of another config ({shown}{more}); "
                    f"start a fresh run in another --workdir (or delete this one)")


def _short(v) -> str:
  s = json.dumps(v)
  return s if len(s) <= 40 else s[:37] + "..."


def check_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir={workdir}: is a file, expected a directory")


@contextlib.contextmanager
def exclusive(workdir: str):
  """Holds `<workdir>/.lock` (process 0 of a multi-host run) while the body writes the run.

  An flock, so the kernel releases it when its holder dies however it dies: a lock left by a
  killed process is free for the next one (which says it took it over). A second live process
  gets a one-line RunLocked naming the holder.
  """
  if jax.process_index() != 0:
    yield
    return
  check_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, ".lock")
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
    os.close(fd)
    raise RunLocked(f"--workdir={workdir}: in use by {holder}; wait for it to end or stop it "
                    "(one process per run directory)") from None
  stale = os.pread(fd, 200, 0).decode(errors="replace").strip()
  if stale:
    print(f"note: {workdir}: taking over the lock of {stale}, which ended without releasing it",
          flush=True)
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
  try:
    yield
  finally:
    os.ftruncate(fd, 0)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def read_results(workdir: str) -> dict | None:
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
