"""Command line: `python -m repsim_jax.main --config=configs/X.py:k=v,... --workdir=DIR`.

`config.job` picks what runs (see `repsim_jax.jobs`). Errors in the input (config, data files,
checkpoints) end the run with one line naming what was wrong, and a non-zero exit status.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from repsim_jax import cpu

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:key=val,...]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")


def _exit_with_error(e: Exception, cause: bool) -> None:
  """Prints `error: ` and the first line of `e` (with its last, the cause, if `cause`); exits 1."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
  print(f"error: {lines[0]}" + (f" {lines[-1]}" if cause and len(lines) > 1 else ""),
        file=sys.stderr)
  sys.exit(1)


def _parse_flags(argv):
  """absl's parser, but a bad flag or an override of a key the config does not have
  (`--config.optim.nme=x`, which ml_collections raises as AttributeError/KeyError) ends with one
  line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a bad value, or get_config raised (its traceback is in the text)
    _exit_with_error(e, cause=True)
  except (AttributeError, KeyError) as e:
    text = str(e).encode().decode("unicode_escape")  # ml_collections nests repr()s
    key = re.search(r"'([^'\\]+)'", text)
    hint = re.search(r"Did you mean [^?]*\?", text)
    overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
    print(f"error: {overrides}: the config has no key {key[1] if key else text!r}"
          + (f" ({hint[0]})" if hint else ""), file=sys.stderr)
    sys.exit(1)


def _config():
  """The parsed config; a `--config.method.name` override renames the config file's method the
  way `config_lib.set_keys` does (λ follows the new method's default unless set)."""
  from repsim_jax import config_lib  # pylint: disable=g-import-not-at-top
  cfg, flag = _CONFIG.value, flags.FLAGS["config"]
  overrides = config_flags.get_override_values(flag)
  if "method.name" in overrides and "method" in cfg:
    path, _, arg = config_flags.get_config_filename(flag).partition(":")
    fresh = config_lib.set_keys(config_lib.load_config(path, arg or None),
                                {k: v for k, v in overrides.items() if k.startswith("method.")})
    with cfg.unlocked():
      cfg.method = fresh.method
  return cfg


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from repsim_jax import jobs  # After flag parsing: XLA_FLAGS set by the user apply.
  par = None
  try:
    config = _config()  # (loads the config file: errors are caught below)
    par = config.get("parallel")
    if par is not None and par.get("coordinator_address") and par.get("num_processes", 1) > 1:
      from repsim_jax import peers  # pylint: disable=g-import-not-at-top
      peers.supervise(par.get("process_id", 0), _WORKDIR.value,
                      int(par.get("heartbeat_timeout_seconds", 30)))
    jobs.run(config, _WORKDIR.value)
  except Exception as e:  # pylint: disable=broad-except
    par = par or {}
    if par.get("num_processes", 1) > 1 and ("Gloo" in str(e) or "closed by peer" in str(e)):
      # A peer's connection closed under a collective: it died, and this process cannot go on.
      from repsim_jax import peers  # pylint: disable=g-import-not-at-top
      print(peers.message(par.get("process_id", 0), "another process of this multi-host run "
                          "closed its connection (killed or preempted?)", _WORKDIR.value),
            file=sys.stderr)
      os._exit(1)  # not sys.exit: jax's shutdown would wait for the dead peer
    if not isinstance(e, (ValueError, OSError, FloatingPointError, KeyError)):
      raise
    # ml_collections reports a config file it could not load on first use, the cause last.
    _exit_with_error(e, cause=isinstance(e, OSError))


if __name__ == "__main__":
  cpu.malloc_on_huge_pages()  # may re-exec this process, so before anything starts
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=_parse_flags)
