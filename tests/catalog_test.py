"""`python -m repsim_jax.catalog` and `python -m repsim_jax.models.export`, as a user runs them."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from repsim_jax import config_lib, jobs, methods, models
from repsim_jax.data import medmnist
from repsim_jax.models import convert, export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


def test_catalog_lists_what_the_configs_accept():
  out = _cli("repsim_jax.catalog")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  names = {l.split()[0] for l in lines if l.startswith("  ")}
  assert set(models.MODEL_NAMES) <= names
  assert set(methods.METHODS) <= names
  assert set(jobs.JOBS) <= names
  from repsim_jax import ssl
  from repsim_jax.data import confounders
  assert set(ssl.NAMES) <= names and set(confounders.KINDS) <= names
  derma = next(l for l in lines if "dermamnist" in l)
  assert "multiclass, 7 classes, 3 channels" in derma and medmnist.CATALOGUE["dermamnist"][0] == 7
  # Each method's keys are the ones it reads: setting any other one draws a warning.
  repsim = next(l for l in lines if l.strip().startswith("repsim "))
  keys = [k.split("=")[0] for k in repsim.split("keys: ")[1].split(", ")]
  cfg = config_lib.method_config("repsim")
  assert methods.unused_keys(cfg) == [] and set(keys) <= set(cfg)
  # ... at the method's own defaults (DELTA's λ is not RepSim's).
  delta = next(l for l in lines if l.strip().startswith("delta "))
  assert "lam=0.01," in delta and config_lib.method_config("delta").lam == 0.01
  bad = _cli("repsim_jax.catalog", "modles")
  assert bad.returncode == 2 and bad.stderr.strip() == (
      "error: unknown section 'modles'; expected some of models, datasets, methods, "
      "objectives, confounders, jobs, weights")


def test_export_writes_a_file_the_trainer_reads(tmp_path):
  state = dict(np.load(os.path.join(REPO, "tests", "fixtures", "resnet_small_torchvision.npz")))
  path = str(tmp_path / "w" / "r.safetensors")
  got = export.write(state, path, "resnet_small")
  again = convert.load_torchvision_resnet(path, arch="resnet_small")
  for a, b in zip(np.concatenate([np.ravel(x) for x in _leaves(got)]),
                  np.concatenate([np.ravel(x) for x in _leaves(again)])):
    assert a == b
  assert sorted(os.listdir(tmp_path / "w")) == ["r.safetensors"]  # no temporary left
  with pytest.raises(ValueError, match="r2.safetensors: missing key"):
    export.write({k: v for k, v in state.items() if k != "layer1.0.conv1.weight"},
                 str(tmp_path / "r2.safetensors"), "resnet_small")


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                    reason="torchvision is installed")
def test_export_without_torchvision_says_what_to_install(tmp_path):
  out = _cli("repsim_jax.models.export", "torchvision:resnet18", str(tmp_path / "r18.safetensors"))
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      "error: torchvision:resnet18: needs torch (pip install torch torchvision, or timm)"] or \
      out.stderr.strip().splitlines() == [
      "error: torchvision:resnet18: needs torchvision (pip install torch torchvision, or timm)"]
  unknown = _cli("repsim_jax.models.export", "timm:convnext_tiny", str(tmp_path / "c.safetensors"))
  assert unknown.returncode == 1 and "give --arch" in unknown.stderr
