"""Command line: `python -m repsim_jax.main --config=configs/X.py:k=v,... --workdir=DIR`.

`config.job` picks what runs (see `repsim_jax.jobs`). Errors in the input (config, data files,
checkpoints) end the run with one line naming what was wrong, and a non-zero exit status.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from repsim_jax import host

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:key=val,...]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from repsim_jax import jobs  # After flag parsing: XLA_FLAGS set by the user apply.
  try:
    jobs.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError, KeyError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  host.malloc_on_huge_pages()  # may re-exec this process, so before anything starts
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
