"""Multi-host liveness: a dead peer ends every other process with one line, in bounded time.

When a process of a `jax.distributed` run dies, the others wait in their next collective until
jax's coordination service misses its heartbeats and aborts them with a C++ stack trace (its
callback for this cannot be set from Python). Here each process instead bumps a counter in the
service's key-value store every second, from a daemon thread (so compiling, checkpointing or
waiting in a collective does not stop it), and watches the others' counters: one that has not
moved for `timeout` seconds, or a coordinator that no longer answers, ends the process with an
`error:` line naming the last checkpoint and exit status 1. jax's own heartbeat timeout is set
past ours (`JAX_HEARTBEAT_SLACK`) so that this check speaks first. A process that finishes marks
itself done, so the others do not mistake a finished peer for a dead one.

When the coordinator's process (0) dies, jax's client aborts the others at once from C++, before
any Python runs. So the command line runs a multi-process job in a child process (`supervise`)
and turns that abort into the same one line.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time

import jax

PREFIX = "repsim_peers/"
_SUPERVISED = "REPSIM_SUPERVISED"
_JAX_ABORT = "Terminating process because the JAX distributed service detected fatal errors"
_TROUBLE = ("coordination_service", "preemption_sync_manager", "grpc_status")
JAX_HEARTBEAT_SLACK = 30  # seconds jax's heartbeat timeout exceeds ours


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def last_checkpoint(workdir: str) -> str:
  ckpts = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(ckpts) else []
  return f"step {steps[-1]} in {ckpts}" if steps else "none yet"


def _message(process: int, reason: str, workdir: str) -> str:
  return (f"error: process {process}: {reason}; stopping. Last checkpoint: "
          f"{last_checkpoint(workdir)}; run the same command on every host to resume")


def _stop(reason: str, workdir: str) -> None:
  sys.stderr.write(_message(jax.process_index(), reason, workdir) + "\n")
  sys.stderr.flush()
  os._exit(1)  # the main thread may be blocked in a collective that will never complete


def stale_peers(beats: dict[int, tuple[str, float]], values: dict[int, str], now: float,
                timeout: float) -> tuple[dict[int, tuple[str, float]], list[int]]:
  """Updates {peer: (last value, when it changed)} with the values just read; returns it and
  the peers whose value has not changed for more than `timeout` seconds (pure; tested alone)."""
  out, stale = {}, []
  for peer, (old, since) in beats.items():
    value = values.get(peer)
    if value is not None and value != old:
      out[peer] = (value, now)
    else:
      out[peer] = (old, since)
      if now - since > timeout:
        stale.append(peer)
  return out, stale


def watch(timeout: float, workdir: str, period: float = 1.0) -> None:
  """Starts the beat-and-watch thread of this process (call after jax.distributed.initialize)."""
  client, me, n = _client(), jax.process_index(), jax.process_count()
  if client is None or n == 1:
    return
  exiting = threading.Event()

  def at_exit():  # runs before jax's own shutdown (atexit is last-in, first-out)
    exiting.set()
    _quietly(client.key_value_set, f"{PREFIX}done/{me}", "1", True)

  atexit.register(at_exit)

  def loop():
    start = time.monotonic()
    beats = {p: ("", start) for p in range(n) if p != me}
    count = 0
    while True:
      count += 1
      try:
        client.key_value_set(f"{PREFIX}beat/{me}", str(count), True)
        entries = dict(client.key_value_dir_get(PREFIX))
      except Exception:  # noqa: BLE001  (the coordinator's process is gone)
        if exiting.is_set():
          return
        _stop("the coordinator (process 0) of this multi-host run no longer answers (killed or "
              "preempted?)", workdir)
      done = {int(k.rsplit("/", 1)[1]) for k in entries if k.startswith(f"{PREFIX}done/")}
      values = {int(k.rsplit("/", 1)[1]): v for k, v in entries.items()
                if k.startswith(f"{PREFIX}beat/")}
      beats = {p: b for p, b in beats.items() if p not in done}
      beats, stale = stale_peers(beats, values, time.monotonic(), timeout)
      if stale and not exiting.is_set():
        _stop(f"process {stale[0]} of this multi-host run sent no heartbeat for {timeout:g} s "
              "(killed or preempted?)", workdir)
      time.sleep(period)

  threading.Thread(target=loop, name="repsim-peers", daemon=True).start()


def _quietly(fn, *args):
  try:
    fn(*args)
  except Exception:  # noqa: BLE001  (at exit, the coordinator may already be gone)
    pass


def supervise(process_id: int, workdir: str) -> None:
  """Runs this command line again as a child and exits with its status; a jax abort after a
  lost coordinator becomes one `error:` line. Returns at once inside the child."""
  if os.environ.get(_SUPERVISED):
    return
  child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], stderr=subprocess.PIPE,
                           env={**os.environ, _SUPERVISED: "1"}, preexec_fn=_die_with_parent)
  for sig in (signal.SIGTERM, signal.SIGINT):  # a scheduler's stop reaches the job
    signal.signal(sig, lambda s, _: child.send_signal(s))
  aborted, held = False, []
  for raw in child.stderr:
    line = raw.decode(errors="replace")
    aborted = aborted or _JAX_ABORT in line
    if aborted:  # jax's abort line, its C++ stack and a Python traceback: replaced below
      continue
    # jax's client logs a lost coordinator over a few lines before it aborts: hold them until
    # it is clear whether the abort follows.
    if held or any(w in line for w in _TROUBLE):
      held.append(line)
      if len(held) < 100:
        continue
    sys.stderr.write("".join(held) or line)
    sys.stderr.flush()
    held = []
  if not aborted:
    sys.stderr.write("".join(held))
  rc = child.wait()
  if aborted:
    sys.stderr.write(_message(process_id, "lost the coordinator (process 0) of this multi-host "
                              "run (killed or preempted?)", workdir) + "\n")
    sys.exit(1)
  sys.exit(rc if rc >= 0 else 128 - rc)


def _die_with_parent():
  """The child gets SIGKILL when the supervisor dies (Linux prctl; elsewhere a no-op)."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass
