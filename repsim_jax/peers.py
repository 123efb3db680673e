"""Multi-host liveness: a dead peer ends every other process with one line, in bounded time.

When a process of a `jax.distributed` run dies, jax's coordination service notices within its
heartbeat timeout (`config.parallel.heartbeat_timeout_seconds`; at once when the dead process is
the coordinator, process 0) and aborts every other process from C++, with a stack trace: its
error callback cannot be set from Python, and a Python watchdog thread can be held off for as long
as the main thread sits in a collective. So the command line runs a multi-process job in a child
process (`supervise`): the child's stderr passes through, and jax's abort, with the log lines
leading up to it, becomes one `error:` line naming the last checkpoint, and exit status 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

_SUPERVISED = "REPSIM_SUPERVISED"
_JAX_ABORT = "Terminating process because the JAX distributed service detected fatal errors"
# jax's client logs a lost peer over a few lines before it aborts; they are held until it is
# clear whether the abort follows.
_TROUBLE = ("coordination_service", "preemption_sync_manager", "grpc_status")


def last_checkpoint(workdir: str) -> str:
  ckpts = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(ckpts) else []
  return f"step {steps[-1]} in {ckpts}" if steps else "none yet"


def message(process: int, lost: str, workdir: str) -> str:
  return (f"error: process {process}: {lost}; stopping. Last checkpoint: "
          f"{last_checkpoint(workdir)}; run the same command on every host to resume")


def _what_was_lost(text: str, timeout: int) -> str:
  if "heartbeat" in text and "unhealthy" in text:
    return (f"another process of this multi-host run sent no heartbeat for {timeout} s (killed or "
            "preempted?)")
  return "lost the coordinator (process 0) of this multi-host run (killed or preempted?)"


def supervise(process_id: int, workdir: str, timeout: int) -> None:
  """Runs this command line again as a child and exits with its status; a jax abort after a
  lost peer becomes one `error:` line. Returns at once inside the child."""
  if os.environ.get(_SUPERVISED):
    return
  child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], stderr=subprocess.PIPE,
                           env={**os.environ, _SUPERVISED: "1"}, preexec_fn=_die_with_parent)
  for sig in (signal.SIGTERM, signal.SIGINT):  # a scheduler's stop reaches the job
    signal.signal(sig, lambda s, _: child.send_signal(s))
  aborted, held = False, []
  for raw in child.stderr:
    line = raw.decode(errors="replace")
    if aborted or _JAX_ABORT in line:  # the abort, its C++ stack and a Python traceback
      if not aborted:
        held.append(line)
      aborted = True
      continue
    if held or any(w in line for w in _TROUBLE):
      held.append(line)
      if len(held) < 100:
        continue
    sys.stderr.write("".join(held) or line)
    sys.stderr.flush()
    held = []
  rc = child.wait()
  if aborted:
    sys.stderr.write(message(process_id, _what_was_lost("".join(held), timeout), workdir) + "\n")
    sys.exit(1)
  sys.stderr.write("".join(held))
  sys.exit(rc if rc >= 0 else 128 - rc)


def _die_with_parent():
  """The child gets SIGKILL when the supervisor dies (Linux prctl; elsewhere a no-op)."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass
