"""Files of the repository that are not in a package (experiments/, benchmarks/, configs/, other
test files), loaded as modules for the tests."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path: str, name: str = ""):
  """The module at `path` (relative to the repository root), executed afresh under `name`
  (default: the file's stem)."""
  name = name or os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
