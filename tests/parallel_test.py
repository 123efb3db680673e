"""XLA options of `parallel.DataParallel.compile` on CPU."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax import lax

from repsim_jax import checkpoint, cpu, parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R18 = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "torchvision_resnet18.safetensors")


def _loss_and_grads(x, w):
  def loss(x, w):
    y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (y * y).mean()
  return jax.value_and_grad(loss, argnums=(0, 1))(x, w)


def _ynn_convolutions(compiled) -> int:
  return sum(1 for line in compiled.as_text().splitlines()
             if '"__ynn_fusion"' in line and re.search(r'op_name="[^"]*conv_general_dilated"', line))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")
def test_cpu_options_move_convolutions_off_ynnpack_with_same_values():
  opts = cpu.compiler_options()
  if opts is None:
    pytest.skip("this jaxlib has no YNNPACK fusion options")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 16, 16, 64)).astype(np.float32)
  w = rng.normal(size=(3, 3, 64, 64)).astype(np.float32) / 24
  default = jax.jit(_loss_and_grads).lower(x, w).compile()
  ours = jax.jit(_loss_and_grads, compiler_options=opts).lower(x, w).compile()
  assert _ynn_convolutions(default) > 0  # what the options are for: XLA's default
  assert _ynn_convolutions(ours) == 0
  for a, b in zip(jax.tree.leaves(default(x, w)), jax.tree.leaves(ours(x, w))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # and a float64 reference for both
  with jax.enable_x64():
    ref = jax.jit(_loss_and_grads)(x.astype(np.float64), w.astype(np.float64))
  for a, r in zip(jax.tree.leaves(ours(x, w)), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu" or cpu.compiler_options() is None,
                    reason="CPU compiler options")
def test_data_parallel_compile_uses_the_cpu_options():
  dp = parallel.DataParallel("shard_map", 1)

  def step(state, batch, rng):
    return _loss_and_grads(batch, state)

  x = np.ones((8, 16, 16, 64), np.float32)
  w = np.full((3, 3, 64, 64), 0.01, np.float32)
  compiled = dp.compile(step, donate_state=False).lower(
      dp.put_replicated(w), dp.put_batch(x), dp.put_replicated(np.zeros(2, np.uint32))).compile()
  assert _ynn_convolutions(compiled) == 0


def _repsim_covariance_on_eight_devices(tmp_path, backend):
  """(results.json, final variables) of a 3-step ResNet-18 RepSim (covariance Q) run through the
  command line on 8 CPU devices; in a subprocess so a crash fails the test, not the worker."""
  wd = tmp_path / backend
  cmd = [sys.executable, "-m", "repsim_jax.main",
         "--config=configs/finetune.py:model=resnet18,source=synthetic,dataset=medical_gray,"
         f"size=16,steps=3,batch=16,method=repsim,init={R18}",
         "--config.method.q_mode=covariance", f"--config.parallel.backend={backend}",
         "--config.parallel.num_devices=8", f"--config.data.data_dir={tmp_path / 'data'}",
         "--config.data.train_size=64", "--config.data.val_size=16", "--config.data.test_size=16",
         "--config.data.num_classes=3", "--config.analysis.max_examples=16",
         "--config.train.tensorboard=False", f"--workdir={wd}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, (backend, out.returncode, out.stderr[-2000:])
  return json.loads((wd / "results.json").read_text()), checkpoint.load_run_variables(str(wd))


def test_pmap_runs_repsim_covariance_on_eight_cpu_devices(tmp_path):
  """Its step segfaulted in XLA:CPU's in-process all-reduce under XLA's default CPU scheduler
  (`cpu/compiler.py`). That pmap trains what one device trains is train_test's; the same for
  this run against shard_map is the slow case below."""
  res, variables = _repsim_covariance_on_eight_devices(tmp_path, "pmap")
  assert res["step"] == 3 and res["skipped_steps"] == 0
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))
  cka = res["similarity"]["linear_cka"]
  assert cka and all(0.0 <= v <= 1.0 + 1e-6 for v in cka.values()), cka


@pytest.mark.slow
def test_pmap_trains_what_shard_map_trains_repsim_covariance(tmp_path):
  res_p, var_p = _repsim_covariance_on_eight_devices(tmp_path, "pmap")
  res_s, var_s = _repsim_covariance_on_eight_devices(tmp_path, "shard_map")
  for a, b in zip(jax.tree.leaves(var_p), jax.tree.leaves(var_s)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert res_p["similarity"]["linear_cka"].keys() == res_s["similarity"]["linear_cka"].keys()
  for layer, v in res_s["similarity"]["linear_cka"].items():
    assert abs(res_p["similarity"]["linear_cka"][layer] - v) < 1e-4, layer
