"""Fine-tuning from every weight source with every method, end to end, as a user runs it.

The bug this guards: weights read from a state dict became device arrays shared by the trained
parameters and the frozen pretrained copy, so donating the train state to the jitted step
deleted the copy ("Array has been deleted" in the final similarity) or donated one buffer twice
(methods with a reference model died at step 1; segfault on 8 devices). Runs from a run
directory never showed it, hence every source here.
"""

import hashlib
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from repsim_jax import config_lib, jobs
import _modules
from _tiny import FIXTURE, REPO, finetune_config

R18 = os.path.join(FIXTURE, "torchvision_resnet18.safetensors")
LAYERS = ["stem", "layer1", "layer2", "layer3", "layer4", "pre_logits"]
METHODS = [("full_ft", {}), ("linear_probe", {}), ("lp_ft", {"method.lp_steps": 1}),
           ("l2sp", {}), ("delta", {}), ("bss", {}), ("sam", {}), ("asam", {}),
           ("repsim", {"method.q_mode": "learned"}), ("repsim", {"method.q_mode": "procrustes"}),
           ("repsim", {"method.q_mode": "covariance"})]


def _sha(path):
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _check(res, wd, layers=LAYERS, first=0.9):
  saved = json.load(open(os.path.join(wd, "results.json")))
  assert saved["final"]["test"]["num_examples"] == 16
  cka = saved["similarity"]["linear_cka"]
  assert list(cka) == layers
  # Two steps from the pretrained weights: every layer still resembles them, the stem most.
  assert all(0.3 < v <= 1.0 + 1e-6 for v in cka.values()), cka
  assert cka[layers[0]] > first
  assert res["similarity"] == saved["similarity"]


# Slow (and in the slow weight matrix): the default selection reads this file through the
# command line with RepSim on 2 devices, which fails on both symptoms of the bug.
@pytest.mark.parametrize("method,devices,backend", [
    pytest.param("full_ft", 8, "shard_map", marks=pytest.mark.slow),
    pytest.param("repsim", 8, "shard_map", marks=pytest.mark.slow),
    pytest.param("l2sp", 8, "pmap", marks=pytest.mark.slow)])
def test_finetune_from_torchvision_safetensors(tmp_path, shared_dir, method, devices, backend):
  before = _sha(R18)
  c = finetune_config(R18, tmp_path, method,
                      **{"parallel.num_devices": devices, "parallel.backend": backend})
  wd = str(tmp_path / "run")
  _check(jobs.run(c, wd), wd)
  assert _sha(R18) == before


PTH = os.path.join(REPO, "tests", "fixtures", "resnet_small_torchvision.pth")


def test_finetune_from_a_pth_file_without_torch(tmp_path):
  # L2-SP: a method holding a pretrained copy (every method, 1 and 8 devices: the slow matrix).
  c = finetune_config(PTH, tmp_path, "l2sp", model="resnet_small")
  wd = str(tmp_path / "run")
  _check(jobs.run(c, wd), wd)


@pytest.mark.parametrize("method", ["delta", "bss"])
def test_delta_and_bss_defaults_keep_the_pretrained_representation(tmp_path, method):
  # At λ = 1 (RepSim's scale) two steps took every ResNet-18 block to CKA 0.1-0.2 (BSS's layer4
  # to 0.0); at the method's own default λ every layer passes the bound the other methods do.
  c = finetune_config(R18, tmp_path, method)
  assert c.method.lam == config_lib.DEFAULT_LAM[method]
  wd = str(tmp_path / "run")
  _check(jobs.run(c, wd), wd)


KERAS = os.path.join(REPO, "tests", "fixtures", "keras_resnet_tiny_notop.h5")
KERAS_MODEL = {"model.kwargs": ml_collections.ConfigDict({"width": 8,
                                                          "stage_sizes": (2, 1, 1, 1)})}


def test_finetune_from_a_keras_h5(tmp_path):
  # RadImageNet's layout (a headless Keras ResNet-50, here with tiny stages), read with h5py.
  c = finetune_config(KERAS, tmp_path, "l2sp", model="resnet50_keras", **KERAS_MODEL)
  wd = str(tmp_path / "run")
  # The fixture's BatchNorm statistics are random, not the data's, so two train steps (each
  # moving them a tenth of the way to the batch's) change the stem's output more than the
  # torchvision weights' do.
  _check(jobs.run(c, wd), wd, first=0.7)


def test_finetune_from_safetensors_on_the_command_line(tmp_path, shared_dir):
  wd = tmp_path / "cli"
  out = subprocess.run(
      [sys.executable, "-m", "repsim_jax.main",
       "--config=configs/finetune.py:model=resnet18,source=synthetic,dataset=medical_gray,"
       f"size=16,steps=2,batch=8,method=repsim,init={R18}",
       f"--config.data.data_dir={tmp_path / 'data'}", "--config.data.train_size=32",
       "--config.data.val_size=16", "--config.data.test_size=16", "--config.data.num_classes=3",
       "--config.analysis.max_examples=16", "--config.train.tensorboard=False",
       f"--workdir={wd}"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"done: {wd}/results.json" in out.stdout
  saved = json.load(open(wd / "results.json"))
  assert list(saved["similarity"]["linear_cka"]) == LAYERS


def _sources(tmp_path):
  """name -> (init, model, extra config): every weight format config.model.init reads."""
  ct = _modules.load("tests/convert_test.py")
  from repsim_jax.models import convert
  vit = os.path.join(FIXTURE, "timm_vit_tiny_patch16_224.safetensors")
  npz = tmp_path / "ViT-Ti_16.npz"
  np.savez(npz, **ct._to_google_npz(convert.load_timm_vit(vit, arch="vit_ti16")["params"],
                                    heads=3))
  vit_data = {"data.size": 224, "train.batch_size": 8}
  out = {"torchvision": (R18, "resnet18", {}), "timm": (vit, "vit_ti16", vit_data),
         "npz": (str(npz), "vit_ti16", vit_data)}
  # A run directory: what a repsim_jax pretraining leaves (here: 1 step from the fixture).
  rd = str(tmp_path / "rundir")
  jobs.run(finetune_config(R18, tmp_path, "full_ft", **{"train.num_steps": 1}), rd)
  out["rundir"] = (rd, "resnet18", {})
  out["pth"] = (PTH, "resnet_small", {})  # written by torch.save, read without torch
  out["keras"] = (KERAS, "resnet50_keras", KERAS_MODEL)  # written by Keras, read with h5py
  return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(1, "shard_map"), (8, "shard_map"), (8, "pmap")],
                         ids=lambda l: f"{l[0]}-{l[1]}")
def test_every_source_every_method_both_backends(tmp_path, shared_dir, request, layout):
  # One case per device layout, so that `-k pmap` selects one and xdist spreads them.
  # The same programs again for each source: reading them back from the session's persistent
  # compilation cache (tests/conftest.py) segfaulted in jax's deserialization once
  # (rundir-repsim-learned-1-shard_map); compile them afresh here.
  import jax
  previous = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  request.addfinalizer(lambda: jax.config.update("jax_enable_compilation_cache", previous))
  devices, backend = layout
  sources = _sources(tmp_path)
  failures = []
  for src, (init, model, extra) in sources.items():
    vit = model.startswith("vit")
    if vit and layout != (1, "shard_map"):  # ViT-Ti at 224 px on one layout, at 32 px on the others
      extra = {**extra, "data.size": 32}
    for (method, keys) in METHODS:
      name = f"{src}-{method}-{keys.get('method.q_mode', '')}-{devices}-{backend}"
      c = finetune_config(init, tmp_path, method, model, **{
          "parallel.num_devices": devices, "parallel.backend": backend, **extra, **keys})
      if vit:
        c.method.layers = ("pre_logits",)
      wd = str(tmp_path / name)
      try:
        res = jobs.run(c, wd)
        layers = list(res["similarity"]["linear_cka"])
        _check(res, wd, layers, first=0.7 if src == "keras" else 0.9)
      except Exception as e:  # noqa: BLE001  (collect every failing combination)
        failures.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
  assert not failures, "\n".join(failures)
